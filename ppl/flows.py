r"""Normalizing flows in the DSL: a flow as a site's distribution (a density on data) and as a guide.

A flow is a bijection :math:`f: \mathbb{R}^D \to \mathbb{R}^D` pushed onto a standard normal base,
:math:`x = f(z),\ z \sim N(0, I_D)`, with the change-of-variables density

.. math::
    \log p(x) = \log N\big(f^{-1}(x); 0, I\big) - \log\big|\det \partial f / \partial z\big|_{z = f^{-1}(x)}.

Kinds (``Flow(kind, dim)``), all Pyro transforms except the continuous one:

    planar    Rezende & Mohamed 2015, :math:`z + u \tanh(w^\top z + b)` (Pyro ``Planar``); no inverse, so it
              scores only its own draws: a guide, not a likelihood
    realnvp   affine coupling layers (Dinh et al. 2017, Pyro ``AffineCoupling``) with fixed permutations between them
    maf       masked autoregressive flow (Papamakarios et al. 2017): Pyro's ``AffineAutoregressive`` used in the
              inverse direction, so the density of data is one network pass (sampling takes D passes)
    iaf       inverse autoregressive flow (Kingma et al. 2016): the same layer forward, so sampling and scoring
              its own draws are one pass (a guide)
    cnf       continuous normalizing flow (FFJORD, Grathwohl et al. 2019): :math:`dz/dt = g(z, t)` solved by
              torchdiffeq, :math:`\log|\det| = \int_0^1 \mathrm{tr}(\partial g / \partial z)\,dt` with the trace
              exact (D backward passes) or Hutchinson's estimate :math:`\epsilon^\top (\partial g/\partial z)\epsilon`

Use: ``ppl.sample("x", ppl.flow("realnvp", 64), obs=x)`` (the flow's parameters are registered with
``ppl.module``), and ``ppl.infer(model, ..., backend="svi", guide=ppl.flow_guide("iaf"))`` or the guide object
itself, ``FlowGuide(model, "iaf")``, in Pyro's SVI.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import pyro
import torch
from pyro.distributions import Normal, TransformedDistribution, constraints
from pyro.distributions.torch_transform import TransformModule
from pyro.distributions.transforms import (AffineAutoregressive, AffineCoupling, Planar, affine_autoregressive,
                                          affine_coupling)
from pyro.infer.autoguide import AutoContinuous, init_to_median
from torch import nn
from torch.distributions.transforms import ComposeTransform

from .primitives import module

KINDS = ("planar", "realnvp", "maf", "iaf", "cnf")
DENSITY_KINDS = ("realnvp", "maf", "cnf")  # those with an inverse: they score data


class Permutation(TransformModule):
    r"""A fixed permutation of the last dim, :math:`y = x_{[\pi]}` (log-det 0); a module so that ``.to(device)``
    moves the index with the flow's parameters."""

    domain = constraints.real_vector
    codomain = constraints.real_vector
    bijective = True
    volume_preserving = True

    def __init__(self, perm: torch.Tensor):
        super().__init__(cache_size=1)
        self.register_buffer("perm", perm)
        self.register_buffer("inverse_perm", torch.argsort(perm))

    def _call(self, x):
        return x[..., self.perm]

    def _inverse(self, y):
        return y[..., self.inverse_perm]

    def log_abs_det_jacobian(self, x, y):
        return x.new_zeros(x.shape[:-1])


class LearnedAffine(TransformModule):
    r"""Elementwise :math:`y = \mu + \sigma \odot x` with :math:`\sigma = \exp(s)` learned, ``loc: (D,)``;
    :math:`\log|\det| = \sum_d s_d`."""

    domain = constraints.real_vector
    codomain = constraints.real_vector
    bijective = True

    def __init__(self, loc: torch.Tensor, scale: float):
        super().__init__(cache_size=1)
        self.loc = nn.Parameter(loc.detach().clone())
        self.log_scale = nn.Parameter(torch.full_like(loc.detach(), math.log(scale)))

    def _call(self, x):
        return self.loc + self.log_scale.exp() * x

    def _inverse(self, y):
        return (y - self.loc) * torch.exp(-self.log_scale)

    def log_abs_det_jacobian(self, x, y):
        return self.log_scale.sum().expand(x.shape[:-1])


class ODEField(nn.Module):
    r"""The velocity :math:`g(z, t)`: ``z (..., D), t () -> (..., D)``, an MLP on :math:`[z, t]` with tanh units."""

    def __init__(self, dim: int, hidden: int, layers: int = 2):
        super().__init__()
        sizes = [dim + 1] + [hidden] * layers
        blocks = [m for a, b in zip(sizes[:-1], sizes[1:]) for m in (nn.Linear(a, b), nn.Tanh())]
        self.net = nn.Sequential(*blocks, nn.Linear(hidden, dim))

    def forward(self, z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat([z, t.expand(z.shape[:-1] + (1,))], -1))


def divergence(field: torch.Tensor, z: torch.Tensor, noise: torch.Tensor | None) -> torch.Tensor:
    r""":math:`\mathrm{tr}(\partial g / \partial z)` per row: ``field, z: (B, D) -> (B,)``.

    ``noise=None``: exact, :math:`\sum_i \partial g_i / \partial z_i` by D backward passes; ``noise (B, D)``:
    Hutchinson's unbiased estimate :math:`\epsilon^\top (\partial g / \partial z)\,\epsilon` (one vector-Jacobian
    product), :math:`E[\epsilon\epsilon^\top] = I`. The rows of ``g`` must depend on their own row of ``z`` only.
    """
    if noise is not None:
        vjp = torch.autograd.grad(field, z, noise, create_graph=True)[0]
        return (vjp * noise).sum(-1)
    columns = [torch.autograd.grad(field[:, i].sum(), z, create_graph=True)[0][:, i] for i in range(z.shape[-1])]
    return torch.stack(columns, -1).sum(-1)


class ContinuousFlow(TransformModule):
    r"""FFJORD: :math:`y = z(T)` for :math:`dz/dt = g(z, t)`, :math:`z(0) = x`, solved by ``torchdiffeq.odeint``.

    The log-determinant integrates alongside, :math:`d a / dt = \mathrm{tr}(\partial g/\partial z)`,
    :math:`\log|\det \partial y/\partial x| = a(T) - a(0)`; the inverse solves from T back to 0. ``trace``:
    "exact" or "hutchinson" (Rademacher probes drawn once per solve from torch's generator: an unbiased
    log-density whose gradient trains the flow, as in FFJORD). Shapes: ``x: (..., D)``; log-det ``(...)``.
    ``method``, ``rtol``, ``atol``: torchdiffeq's solver options (gradients by backpropagation through the solver).
    """

    domain = constraints.real_vector
    codomain = constraints.real_vector
    bijective = True

    def __init__(self, dim: int, hidden: int = 32, time: float = 1.0, trace: str = "hutchinson",
                 method: str = "dopri5", rtol: float = 1e-5, atol: float = 1e-5):
        super().__init__(cache_size=1)
        if trace not in ("exact", "hutchinson"):
            raise ValueError(f"ContinuousFlow: trace must be 'exact' or 'hutchinson', got {trace!r}")
        self.field = ODEField(dim, hidden)
        self.time, self.trace, self.method, self.rtol, self.atol = float(time), trace, method, rtol, atol
        self._logdet = None  # (x, y, log-det) of the last solve

    def _solve(self, x: torch.Tensor, start: float, end: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(z(end), a(end) - a(start)) from z(start) = ``x (..., D)``."""
        import torchdiffeq  # optional extra "flows"

        flat = x.reshape(-1, x.shape[-1])
        noise = None if self.trace == "exact" else torch.randint(0, 2, flat.shape, device=x.device).to(x.dtype) * 2 - 1

        def dynamics(t, state):
            z = state[0]
            with torch.enable_grad():
                z = z if z.requires_grad else z.requires_grad_(True)
                g = self.field(z, t)
                return g, divergence(g, z, noise)

        times = torch.tensor([start, end], dtype=x.dtype, device=x.device)
        zs, acc = torchdiffeq.odeint(dynamics, (flat, flat.new_zeros(flat.shape[0])), times, method=self.method,
                                     rtol=self.rtol, atol=self.atol)
        return zs[-1].reshape(x.shape), acc[-1].reshape(x.shape[:-1])

    def _call(self, x):
        y, logdet = self._solve(x, 0.0, self.time)
        self._logdet = (x, y, logdet)
        return y

    def _inverse(self, y):
        x, minus_logdet = self._solve(y, self.time, 0.0)
        self._logdet = (x, y, -minus_logdet)
        return x

    def log_abs_det_jacobian(self, x, y):
        if self._logdet is None or x is not self._logdet[0] or y is not self._logdet[1]:
            self._call(x)
        return self._logdet[2]


def _layers(kind: str, dim: int, num_layers: int, hidden: int, cnf: dict) -> list[nn.Module]:
    """The flow's modules, base side first (see the module docstring for each kind)."""
    if kind == "planar":
        return [Planar(dim) for _ in range(num_layers)]
    if kind == "cnf":
        return [ContinuousFlow(dim, hidden, **cnf) for _ in range(num_layers)]
    layers: list[nn.Module] = []
    for _ in range(num_layers):
        if kind == "realnvp":
            layers.append(affine_coupling(dim, hidden_dims=[hidden, hidden]))
        else:
            layers.append(affine_autoregressive(dim, hidden_dims=[hidden, hidden]))
        layers.append(Permutation(torch.randperm(dim)))
    return layers[:-1]


class Flow(TransformModule):
    r"""A stack of bijections :math:`f = f_L \circ \dots \circ f_1: (\dots, D) \to (\dots, D)` (base side
    first), itself a Pyro ``TransformModule``: an ``nn.Module`` whose parameters ``ppl.module`` registers, and a
    transform for ``TransformedDistribution`` (``.distribution()``) or a guide (``FlowGuide``).

    Args:
        kind: one of ``KINDS``. dim: D. num_layers: layers (coupling / autoregressive / planar / ODE blocks).
        hidden: hidden units of each layer's network (default ``max(2 D, 16)``).
        seed: initial weights and permutations drawn from this seed (torch's generator is left untouched), so a
            model that builds its flow on every call builds the same one.
        **cnf: ``ContinuousFlow`` options (trace, method, rtol, atol, time) for ``kind="cnf"``.
    """

    domain = constraints.real_vector
    codomain = constraints.real_vector
    bijective = True

    def __init__(self, kind: str, dim: int, num_layers: int = 4, hidden: int | None = None, seed: int = 0, **cnf):
        super().__init__(cache_size=1)
        check_flow_args(kind, dim, num_layers, hidden)
        if cnf and kind != "cnf":
            raise TypeError(f"Flow('{kind}'): options {sorted(cnf)} are for kind='cnf' only")
        self.kind, self.dim = kind, dim
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.layers = nn.ModuleList(_layers(kind, dim, num_layers, hidden or max(2 * dim, 16), cnf))

    def parts(self) -> list:
        """The transforms in order; a MAF's autoregressive layers enter inverted (data -> base in one pass)."""
        invert = self.kind == "maf"
        return [m.inv if invert and isinstance(m, AffineAutoregressive) else m for m in self.layers]

    def _call(self, z):
        return ComposeTransform(self.parts())(z)

    def _inverse(self, x):
        if self.kind == "planar":
            raise NotImplementedError(
                f"a planar flow has no inverse: it scores only its own draws (use it as a guide); for a density "
                f"on data use one of {DENSITY_KINDS}")
        return ComposeTransform(self.parts()).inv(x)

    def log_abs_det_jacobian(self, z, x):
        return ComposeTransform(self.parts()).log_abs_det_jacobian(z, x)

    def distribution(self, base=None) -> TransformedDistribution:
        r"""The density :math:`x = f(z)`, ``base`` (default :math:`N(0, I_D)` on the flow's device and dtype) with
        event shape ``(D,)``."""
        if base is None:
            proto = next(self.parameters())
            base = Normal(proto.new_zeros(self.dim), proto.new_ones(self.dim)).to_event(1)
        if tuple(base.event_shape) != (self.dim,):
            raise ValueError(f"Flow('{self.kind}', dim={self.dim}): base must have event shape ({self.dim},), "
                             f"got {tuple(base.event_shape)}")
        return TransformedDistribution(base, [self])


@torch.no_grad()
def start_at_identity(flow: Flow) -> Flow:
    r"""Set ``flow``'s parameters so that each of its layers is the identity map, so that :math:`f(z) = z_{[\pi]}`
    (only the fixed permutations between layers remain), :math:`\log|\det| = 0`, and :math:`N(0, I)` is pushed to
    itself, from which training can move it; returns ``flow``. ``FlowGuide`` starts so: it begins as AutoNormal.

    Coupling / autoregressive layers: the last linear layer of the conditioner network is zeroed (shift 0,
    log-scale 0; the hidden layers keep their random weights, so the zeroed layer's gradient is not 0 and the
    hidden layers receive one once it has moved, as in Glow's zero initialization). Planar
    (Pyro's invertible form :math:`\hat u = u + (m(w^\top u) - w^\top u)\, w / \lVert w\rVert^2`,
    :math:`m(a) = \mathrm{softplus}(a) - 1`): :math:`u = \log(e - 1)\, w / \lVert w\rVert^2`, so that
    :math:`w^\top u = \log(e - 1)`, :math:`m = 0` and :math:`\hat u = 0`. Continuous: the velocity field's last layer
    is zeroed (:math:`g \equiv 0`).
    """
    for layer in flow.layers:
        if isinstance(layer, (AffineAutoregressive, AffineCoupling)):
            last = (layer.arn if isinstance(layer, AffineAutoregressive) else layer.nn).layers[-1]
            last.weight.zero_()
            last.bias.zero_()
        elif isinstance(layer, Planar):
            layer.u.copy_(math.log(math.e - 1) * layer.w / layer.w.pow(2).sum())
        elif isinstance(layer, ContinuousFlow):
            layer.field.net[-1].weight.zero_()
            layer.field.net[-1].bias.zero_()
    return flow


def check_flow_args(kind, dim, num_layers, hidden) -> None:
    """ValueError naming the argument, the expected and the actual value; ``dim=None``: not known yet (a guide's
    latent size, known at its first call), the checks that need it are left to ``Flow``."""
    if kind not in KINDS:
        raise ValueError(f"flow kind must be one of {KINDS}, got {kind!r}")
    sizes = ((("dim", dim),) if dim is not None else ()) + (("num_layers", num_layers),) + (
        (("hidden", hidden),) if hidden is not None else ())
    for name, value in sizes:
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"flow '{kind}': {name} must be a positive int, got {value!r}")
    if dim is None:
        return
    if kind in ("maf", "iaf") and hidden is not None and hidden < dim:
        raise ValueError(f"flow '{kind}': hidden must be >= dim={dim} (each hidden layer of the masked "
                         f"autoregressive network needs a unit per input degree), got hidden={hidden}")
    if kind == "realnvp" and dim < 2:
        raise ValueError(f"flow 'realnvp': dim must be >= 2 (a coupling layer splits the vector), got {dim}")


def flow(kind: str | Flow, dim: int | None = None, *, name: str = "flow", base=None, **options):
    r"""A flow density for a site: ``ppl.sample("x", ppl.flow("realnvp", D), obs=x)`` with ``x: (..., D)``.

    ``kind`` is a name of ``KINDS`` (a ``Flow(kind, dim, **options)`` is built; the same seed gives the same
    initial flow on every call) or a ``Flow`` built outside the model. Its parameters are registered with
    ``ppl.module(name, ...)``, so inference fits them (give each flow of a model its own ``name``). Returns
    ``TransformedDistribution(base, [flow])``, event shape ``(D,)``; a planar flow has no inverse and raises
    when asked for the density of data.
    """
    if isinstance(kind, Flow):
        if dim is not None and dim != kind.dim:
            raise ValueError(f"ppl.flow('{name}'): dim={dim} but the given Flow has dim {kind.dim}")
        return module(name, kind).distribution(base)
    return module(name, Flow(kind, dim, **options)).distribution(base)


class FlowGuide(AutoContinuous):
    r"""A normalizing-flow guide over all continuous latents (in the unconstrained space, packed in one vector):
    :math:`u = \mu + \sigma \odot f(\epsilon)`, :math:`\epsilon \sim N(0, I)`, ``f = Flow(kind, latent_dim)`` and
    a learned elementwise affine started at the ``init_loc_fn`` point with scale ``init_scale`` (as AutoNormal).
    ``f``'s layers start as the identity (``start_at_identity``), so the guide's first density is AutoNormal's,
    :math:`N(\mu_0, \sigma_0^2 I)`, and the flow moves away from it only where the ELBO's gradient asks.

    ``median()`` and ``quantiles()`` read the coordinatewise median and sd of 1000 draws (seeded) in the
    unconstrained space (the quantiles as a normal with those).

    ``num_particles``: draws averaged in each step's ELBO estimate (the svi backend reads it). A flow's
    one-draw gradient is noisy enough to lose to AutoNormal (banana KL 1.55 vs 0.71 with one draw, 0.06 with 8:
    ``tests/ppl/test_flows.py``), hence 8 by default.
    """

    def __init__(self, model, kind: str = "iaf", num_layers: int = 2, hidden: int | None = None,
                 init_loc_fn=init_to_median, init_scale: float = 0.1, seed: int = 0, num_particles: int = 8,
                 **cnf):
        check_flow_args(kind, None, num_layers, hidden)  # dim: the latent size, known at the first call
        if isinstance(num_particles, bool) or not isinstance(num_particles, int) or num_particles < 1:
            raise ValueError(f"flow guide: num_particles must be an integer >= 1, got {num_particles!r}")
        super().__init__(model, init_loc_fn=init_loc_fn)
        self.num_particles = num_particles
        self._flow_args = dict(kind=kind, num_layers=num_layers, hidden=hidden, seed=seed, **cnf)
        self._init_scale = init_scale
        self.transform = None

    def get_base_dist(self):
        proto = self.transform.loc
        return Normal(proto.new_zeros(self.latent_dim), proto.new_ones(self.latent_dim)).to_event(1)

    def get_transform(self, *args, **kwargs):
        return self.transform

    def get_posterior(self, *args, **kwargs):
        if self.transform is None:
            loc = self._init_loc()
            body = start_at_identity(Flow(dim=self.latent_dim, **self._flow_args)).to(device=loc.device,
                                                                                      dtype=loc.dtype)
            self.transform = ComposeFlow([body, LearnedAffine(loc, self._init_scale)])
        return super().get_posterior(*args, **kwargs)

    @torch.no_grad()
    def _loc_scale(self, *args, **kwargs):
        with torch.random.fork_rng(devices=[]), pyro.validation_enabled(False):
            torch.manual_seed(0)
            draws = self.get_posterior(*args, **kwargs).sample((1000,))
        return draws.median(0).values, draws.std(0)


class ComposeFlow(TransformModule):
    """Parts applied in order, as one module (its parameters registered by the guide)."""

    domain = constraints.real_vector
    codomain = constraints.real_vector
    bijective = True

    def __init__(self, parts: list):
        super().__init__(cache_size=1)
        self.parts = nn.ModuleList(parts)

    @property
    def loc(self) -> torch.Tensor:
        return self.parts[-1].loc

    def _call(self, x):
        return ComposeTransform(list(self.parts))(x)

    def _inverse(self, y):
        return ComposeTransform(list(self.parts)).inv(y)

    def log_abs_det_jacobian(self, x, y):
        return ComposeTransform(list(self.parts)).log_abs_det_jacobian(x, y)


@dataclass(frozen=True)
class FlowGuideSpec:
    """``ppl.flow_guide(...)``: builds a ``FlowGuide`` for a model, ``spec(model, init_loc_fn=...)``."""

    kind: str = "iaf"
    num_layers: int = 2
    hidden: int | None = None
    init_scale: float = 0.1
    seed: int = 0
    num_particles: int = 8

    def __call__(self, model, init_loc_fn=init_to_median) -> FlowGuide:
        return FlowGuide(model, self.kind, self.num_layers, self.hidden, init_loc_fn=init_loc_fn,
                         init_scale=self.init_scale, seed=self.seed, num_particles=self.num_particles)


def flow_guide(kind: str = "iaf", num_layers: int = 2, hidden: int | None = None, init_scale: float = 0.1,
               seed: int = 0, num_particles: int = 8) -> FlowGuideSpec:
    """A flow guide for ``guide=``: ``ppl.infer(model, data, backend="svi", guide=ppl.flow_guide("iaf"))``.

    Any kind of ``KINDS`` (a guide scores its own draws, so "planar" works too); see ``FlowGuide``.
    ``num_particles``: draws averaged per step in the ELBO estimate (8: see ``FlowGuide``).
    """
    check_flow_args(kind, None, num_layers, hidden)
    if isinstance(num_particles, bool) or not isinstance(num_particles, int) or num_particles < 1:
        raise ValueError(f"flow_guide: num_particles must be an integer >= 1, got {num_particles!r}")
    return FlowGuideSpec(kind, num_layers, hidden, init_scale, seed, num_particles)


__all__ = ["KINDS", "DENSITY_KINDS", "Flow", "ContinuousFlow", "FlowGuide", "flow", "flow_guide", "divergence",
           "start_at_identity"]
