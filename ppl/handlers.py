r"""The *tabulate / collapse* interpreter: marginalize chains exactly inside any model.

A ``markov_chain`` site takes as value its enumerated support ``arange(K)`` in a new leftmost
dim, so each child is evaluated at all K states at once and its log-density becomes a table
``log_lik: (..., T, K)``. A ``gaussian_chain`` site takes the value 0 (a leaf tensor); its
children's log-density, quadratic in x, is read off as Gaussian node potentials by autograd:

    \log p(y \mid x) = c + \sum_t h_t^\top x_t - \tfrac12 x_t^\top J_t x_t,\quad
    h = \nabla f(0),\ J = -\nabla^2 f(0),\ c = f(0).

The chain's own factors plus these tables are what the exact kernels need: the backends
(``ppl.inference.chains.collapse``) add their log normalizer to the model as one factor, so the
chain is marginalized exactly and the global parameters are fitted on the collapsed model. This
module only interprets the model; it runs no kernel.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, NamedTuple

import torch
from pyro.distributions import Independent, TorchDistribution
from pyro.poutine.messenger import Messenger

from .primitives import ModelInputError


class DiscreteTable(NamedTuple):
    """Factors of a collapsed ``markov_chain``: ``log_init (..., K)``, ``log_trans`` ``(..., K, K)``
    or ``(..., T-1, K, K)``, ``log_lik (..., T, K)``."""

    log_init: torch.Tensor
    log_trans: torch.Tensor
    log_lik: torch.Tensor
    time_varying: bool


class GaussianTable(NamedTuple):
    """Factors of a collapsed ``gaussian_chain``: the LDS prior (the chain's distribution) and the children's
    log-density as node potentials about ``center``, a fixed path ``(..., T, D)`` (None: 0),

        log p(children | x) = const + sum_t h_t'u_t - 1/2 u_t'J_t u_t,    u = x - center,

    with ``J (..., T, D, D)``, ``h (..., T, D)`` and ``const`` = log p(children | center) (a scalar, summed in
    float64). About 0 the constant and log Z are each of order sum_t y_t'R^-1 y_t / 2 with opposite signs,
    which float32 cannot hold to a nat on long sequences far from 0; about a path near the data both are O(T)
    (``ppl.inference.chains`` re-centers when it matters)."""

    prior: Any
    J: torch.Tensor
    h: torch.Tensor
    const: torch.Tensor
    center: torch.Tensor | None = None


@dataclass(frozen=True)
class CollapseSpec:
    """Which chains to collapse and which sites are their children (from the compiler)."""

    discrete: dict[str, tuple[str, ...]] = field(default_factory=dict)
    gaussian: dict[str, tuple[str, ...]] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.discrete or self.gaussian)


def elementwise_log_prob(fn: TorchDistribution, value: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Log-density before ``Independent`` sums its reinterpreted dims, and how many dims those are.

    A chain (``step_log_probs``) reports one term per step. Returns ``(log_prob, extra_dims)``.
    """
    extra = 0
    while isinstance(fn, Independent):
        extra += fn.reinterpreted_batch_ndims
        fn = fn.base_dist
    if hasattr(fn, "step_log_probs"):
        return fn.step_log_probs(value), extra + 1
    return fn.log_prob(value), extra


def _weighted(lp: torch.Tensor, msg: dict, extra: int) -> torch.Tensor:
    """Apply the site's mask and scale (given over batch dims) to an elementwise log-prob."""
    mask, scale = msg.get("mask"), msg.get("scale", 1.0)
    if isinstance(mask, torch.Tensor):
        mask = mask.reshape(mask.shape + (1,) * extra)
        lp = torch.where(mask, lp, torch.zeros_like(lp))
    elif mask is False:
        lp = torch.zeros_like(lp)
    if isinstance(scale, torch.Tensor):
        scale = scale.reshape(scale.shape + (1,) * extra)
    return lp * scale


class _Collapsed(TorchDistribution):
    """Stand-in for a latent child of a collapsed discrete chain: its density is counted in the
    chain's table, so here it scores 0; it samples the child at state 0 (initialization only)."""

    arg_constraints = {}
    has_rsample = True

    def __init__(self, fn: TorchDistribution, enum_dims: int):
        self.fn = fn
        super().__init__(fn.batch_shape[enum_dims:], fn.event_shape, validate_args=False)

    @property
    def support(self):
        return self.fn.support

    def rsample(self, sample_shape=torch.Size()):
        draw = self.fn.rsample(sample_shape) if self.fn.has_rsample else self.fn.sample(sample_shape)
        return draw[(slice(None),) * len(sample_shape) + (0,)].expand(
            torch.Size(sample_shape) + self.batch_shape + self.event_shape)

    def log_prob(self, value):
        return value.new_zeros(value.shape[: value.dim() - len(self.event_shape)])


class CollapseChains(Messenger):
    """Effect handler: enumerate/probe the chains in ``spec`` and tabulate their children.

    After the model ran under it, ``tables()`` returns one ``DiscreteTable`` or
    ``GaussianTable`` per chain.
    """

    def __init__(self, spec: CollapseSpec, centers: dict[str, torch.Tensor] | None = None):
        super().__init__()
        self.spec = spec
        self.centers = dict(centers or {})  # gaussian chain -> path (..., T, D) its potentials are taken about
        self.parent = {c: k for k, cs in {**spec.discrete, **spec.gaussian}.items() for c in cs}
        self.chains: dict[str, dict] = {}
        self.terms: dict[str, list] = {k: [] for k in self.parent.values()}
        self.pending: list = []

    def _pyro_sample(self, msg):
        name = msg["name"]
        if msg["is_observed"] and name not in self.parent:
            return
        if name in self.spec.discrete:
            self._enumerate(msg)
        elif name in self.spec.gaussian:
            self._probe(msg)
        elif name in self.parent:
            self._child(msg)

    def _enumerate(self, msg):
        fn = msg["fn"]
        shape = fn.batch_shape + fn.event_shape
        K = fn.num_states
        # the support at every position (K, *shape), not (K, 1, ...): a child built as ``rate[z]`` then has the
        # shape it has outside enumeration, so ``.to_event(1)`` over time reinterprets the time dim, as written
        support = torch.arange(K, device=fn.log_init.device).reshape((K,) + (1,) * len(shape)).expand((K,) + shape)
        self.chains[msg["name"]] = dict(fn=fn, shape=shape)
        msg.update(value=support, done=True, stop=True)

    def _probe(self, msg):
        fn = msg["fn"]
        shape = fn.batch_shape + fn.event_shape
        center = self.centers.get(msg["name"])
        x0 = fn.initial_loc.new_zeros(shape) if center is None else center.detach().to(fn.initial_loc).expand(shape)
        x0 = x0.clone().requires_grad_(True)
        self.chains[msg["name"]] = dict(fn=fn, shape=x0.shape, x0=x0, centered=center is not None)
        msg.update(value=x0, done=True, stop=True)

    def _child(self, msg):
        chain = self.parent[msg["name"]]
        if msg["is_observed"]:
            self.terms[chain].append((msg["fn"], msg["value"], dict(msg)))
            msg.update(done=True, stop=True)
            return
        if chain not in self.spec.discrete:
            raise ModelInputError(f"site '{msg['name']}': a latent child of gaussian_chain '{chain}' "
                                  "cannot be collapsed; use backend='svi'")
        self.pending.append((chain, msg))
        msg["fn"] = _Collapsed(msg["fn"], 1)

    def _pyro_post_sample(self, msg):
        for chain, pending in self.pending:
            if pending is msg:
                self.terms[chain].append((msg["fn"].fn, msg["value"], dict(msg)))

    def tables(self) -> dict[str, DiscreteTable | GaussianTable]:
        """The factors of every collapsed chain (call after the model ran)."""
        out = {}
        for name, info in self.chains.items():
            build = _discrete_table if name in self.spec.discrete else _gaussian_table
            out[name] = build(name, info, self.terms[name])
        return out


def _discrete_table(name: str, info: dict, terms: list) -> DiscreteTable:
    """Sum the children's tabulated log-densities into ``log_lik: (..., T, K)``."""
    fn, shape = info["fn"], info["shape"]
    K, n = fn.num_states, len(info["shape"])
    total = fn.log_init.new_zeros((K,) + tuple(shape))
    for child_fn, value, msg in terms:
        lp, extra = elementwise_log_prob(child_fn, value)
        lp = _weighted(lp, msg, extra)
        lp = lp.reshape((1,) * max(0, 1 + n - lp.dim()) + lp.shape)
        lp = lp.sum(tuple(range(1 + n, lp.dim()))) if lp.dim() > 1 + n else lp
        try:
            total = total + lp
        except RuntimeError:
            raise ModelInputError(
                f"site '{msg['name']}': its log-density, tabulated over the states of markov_chain '{name}', "
                f"has shape {tuple(lp.shape)}, which does not align with (states={K}, *{tuple(shape)}); "
                f"put the chain inside the same plates as its children") from None
    log_lik = total.movedim(0, -1)
    # float32 priors with float64 data (or the reverse): the table gets the wider dtype, as torch promotes
    dtype = torch.promote_types(torch.promote_types(fn.log_init.dtype, fn.log_trans.dtype), log_lik.dtype)
    return DiscreteTable(fn.log_init.to(dtype), fn.log_trans.to(dtype), log_lik.to(dtype), fn.time_varying)


def _gaussian_table(name: str, info: dict, terms: list) -> GaussianTable:
    """Gaussian node potentials of the children about the probe point x0 (0, or the chain's center) by
    autograd (exact for quadratic log-densities)."""
    x0 = info["x0"]
    f = x0.new_zeros((), dtype=torch.float64)
    for child_fn, value, msg in terms:
        lp, extra = elementwise_log_prob(child_fn, value)
        f = f + _weighted(lp, msg, extra).sum(dtype=torch.float64)
    if not info["centered"]:
        J, h = quadratic_potentials(f, x0)
        return GaussianTable(info["fn"], J, h, f)
    J, h = quadratic_potentials(f, x0, about=x0.detach())
    return GaussianTable(info["fn"], J, h, f, x0.detach())


def quadratic_potentials(f: torch.Tensor, x: torch.Tensor,
                         about: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Per-step Gaussian potentials of a scalar ``f`` that is quadratic in ``x: (..., T, D)``.

    Returns ``J = -\partial^2 f / \partial x_t^2: (..., T, D, D)`` (diagonal blocks of the Hessian)
    and ``h = \nabla f (x) + J (x - about): (..., T, D)`` (the linear term about ``about``; None: 0).
    Differentiable (``create_graph``), so gradients flow to whatever parameters ``f`` depends on.
    Cross-step Hessian blocks are assumed zero (the compiler checks it by probing).
    """
    if not f.requires_grad:
        zeros = x.new_zeros(x.shape + x.shape[-1:])
        return zeros, x.new_zeros(x.shape)
    (g,) = torch.autograd.grad(f, x, create_graph=True)
    cols = []
    for d in range(x.shape[-1]):
        (col,) = torch.autograd.grad(g[..., d].sum(), x, create_graph=True, allow_unused=True)
        cols.append(torch.zeros_like(x) if col is None else -col)
    J = torch.stack(cols, -1)
    J = 0.5 * (J + J.transpose(-1, -2))
    shift = x if about is None else x - about
    h = g + (J @ shift.unsqueeze(-1)).squeeze(-1)
    return J, h


def tabulate(model: Callable, args: tuple, kwargs: dict, spec: CollapseSpec,
             centers: dict[str, torch.Tensor] | None = None) -> dict:
    """Run ``model`` once under ``CollapseChains(spec, centers)`` and return the chains' tables."""
    handler = CollapseChains(spec, centers)
    with torch.enable_grad(), handler:  # Gaussian potentials are read off by autograd
        model(*args, **kwargs)
        return handler.tables()
