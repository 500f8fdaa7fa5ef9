r"""Distributions the usual backends cannot score: simulators with no density, and energy-based models.

``Implicit(simulator, *inputs)``: :math:`x = f(\text{inputs}, \epsilon)`, cheap to sample, no likelihood.
``sample``/``rsample`` run the simulator (differentiably, so a generator network can be trained through
it); ``log_prob`` raises ``NoDensityError``. A model with an observed ``Implicit`` site is fitted
adversarially (backend "adversarial": a discriminator estimates the density ratio data / model).

``RBM(weights, visible_bias, hidden_bias)``: a restricted Boltzmann machine over binary visible units,
:math:`p(v) = e^{-F(v)} / Z` with the free energy :math:`F(v) = -b^\top v - \sum_j \mathrm{softplus}(c_j +
(v W)_j)` (the hidden units summed out). ``log_prob`` is the *unnormalized* :math:`-F(v)` and the class says
so (``normalized = False``): the partition function :math:`Z` is intractable beyond tiny models and is
estimated by annealed importance sampling (backend "energy"). ``sample`` runs block Gibbs sampling.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from pyro.distributions import TorchDistribution, constraints
from pyro.poutine.messenger import Messenger


class NoDensityError(NotImplementedError):
    """An implicit distribution (a simulator) was asked for a density it does not have."""


class Implicit(TorchDistribution):
    r"""A simulator as a distribution: :math:`x = \text{simulator}(*\text{inputs})`, no density.

    Args:
        simulator: ``simulator(*inputs) -> x`` of shape ``batch_shape + event_shape``; it may draw its own
            noise with torch's generator (e.g. ``lambda z: G(z)`` with ``z`` a latent site, or
            ``lambda n: G(torch.randn(n, d))``). Differentiable in its parameters: ``rsample`` keeps the graph.
        *inputs: its arguments (tensors or anything else).
        event_dim: how many trailing dims of x form one event (default 1: a vector per data point).
        name: how ``plan.explain()`` names the simulator (default: the function's name).

    The simulator runs once when the distribution is built (that draw gives the shapes and is what
    ``sample()`` with no ``sample_shape`` returns); ``sample((n,))`` runs it n more times.
    ``log_prob`` raises ``NoDensityError``: fit a model with an observed ``Implicit`` site by
    ``ppl.infer`` (backend "adversarial").
    """

    arg_constraints: dict = {}
    support = constraints.real
    has_rsample = True
    normalized = False

    def __init__(self, simulator: Callable, *inputs, event_dim: int = 1, name: str | None = None,
                 validate_args=None):
        if not callable(simulator):
            raise TypeError(f"Implicit: simulator must be callable, got {type(simulator).__name__}")
        self.simulator, self.inputs = simulator, inputs
        self.simulator_name = name or getattr(simulator, "__name__", type(simulator).__name__)
        draw = simulator(*inputs)
        if not isinstance(draw, torch.Tensor) or not draw.is_floating_point():
            got = f"dtype {draw.dtype}" if isinstance(draw, torch.Tensor) else type(draw).__name__
            raise TypeError(f"Implicit({self.simulator_name}): the simulator must return a floating-point tensor, "
                            f"got {got}")
        if not 0 <= event_dim <= draw.dim():
            raise ValueError(f"Implicit({self.simulator_name}): event_dim must be in [0, {draw.dim()}] for a draw "
                             f"of shape {tuple(draw.shape)}, got {event_dim}")
        self.draw = draw
        split = draw.dim() - event_dim
        super().__init__(draw.shape[:split], draw.shape[split:], validate_args=False)

    def rsample(self, sample_shape=torch.Size()) -> torch.Tensor:
        """``sample_shape + batch_shape + event_shape`` simulator draws (the graph kept)."""
        sample_shape = torch.Size(sample_shape)
        if not sample_shape:
            return self.draw
        draws = [self.simulator(*self.inputs) for _ in range(sample_shape.numel())]
        return torch.stack(draws).reshape(sample_shape + self.draw.shape)

    def sample(self, sample_shape=torch.Size()) -> torch.Tensor:
        with torch.no_grad():
            return self.rsample(sample_shape)

    def expand(self, batch_shape, _instance=None):
        batch_shape = torch.Size(batch_shape)
        if batch_shape == self.batch_shape:
            return self
        raise NoDensityError(f"Implicit({self.simulator_name}) has batch shape {tuple(self.batch_shape)} (its "
                             f"simulator's draw); it cannot be expanded to {tuple(batch_shape)}: make the "
                             "simulator return one draw per data point")

    def log_prob(self, value):
        raise NoDensityError(
            f"Implicit({self.simulator_name}) is a simulator with no density: log_prob is not available. Fit a "
            "model with an observed Implicit site by ppl.infer (backend 'adversarial': a discriminator "
            "estimates the density ratio)")


class _ProvenanceOnly(TorchDistribution):
    """Stands in for an ``Implicit`` while dependencies are traced: its "log_prob" is 0 computed from the
    simulator's draw, so it carries the provenance of the simulator's inputs (nothing is scored)."""

    arg_constraints: dict = {}
    support = constraints.real

    def __init__(self, implicit: Implicit):
        self.implicit = implicit
        super().__init__(implicit.batch_shape, implicit.event_shape, validate_args=False)

    def log_prob(self, value):
        draw = self.implicit.draw
        return 0.0 * draw.reshape(draw.shape[:draw.dim() - len(self.implicit.event_shape)] + (-1,)).sum(-1)


class ImplicitDependencies(Messenger):
    """While Pyro's provenance tracking reads which sites a site depends on (it calls ``log_prob``), an
    ``Implicit`` site depends on the inputs of its simulator: this handler swaps in ``_ProvenanceOnly``."""

    def _process_message(self, msg):
        if msg["type"] == "sample" and isinstance(msg["fn"], Implicit):
            msg["fn"] = _ProvenanceOnly(msg["fn"])


class EnergyBased(TorchDistribution):
    """Base of distributions known up to their normalizer: ``log_prob`` is unnormalized (``normalized`` is
    False) and the class provides ``free_energy`` and a Gibbs kernel (``gibbs``) for the energy backend."""

    normalized = False

    def free_energy(self, value: torch.Tensor) -> torch.Tensor:
        """:math:`F(v)` with :math:`p(v) = e^{-F(v)} / Z`: each subclass defines its energy (``RBM`` does)."""
        raise NotImplementedError(f"{type(self).__name__} is an EnergyBased distribution without a free_energy(value): "
                                  "subclasses must define it")

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        """Unnormalized: :math:`-F(v)` (log p(v) + log Z)."""
        return -self.free_energy(value)


class RBM(EnergyBased):
    r"""Restricted Boltzmann machine over ``V`` binary visible units with ``H`` binary hidden units.

    Energy :math:`E(v, h) = -b^\top v - c^\top h - v^\top W h`; the hidden units summed out give the free
    energy :math:`F(v) = -b^\top v - \sum_j \mathrm{softplus}(c_j + (v^\top W)_j)`, so
    :math:`p(v) = e^{-F(v)} / Z`. ``log_prob`` returns :math:`-F(v)` (unnormalized).

    Args:
        weights: ``W (V, H)``; visible_bias: ``b (V,)``; hidden_bias: ``c (H,)``.
        batch_shape: draws per ``sample()`` (e.g. ``(N,)`` inside a data plate; default ``()``).
        gibbs_steps: block-Gibbs sweeps of ``sample()`` from a uniform start (default 1000).
    """

    arg_constraints = {"weights": constraints.real, "visible_bias": constraints.real,
                       "hidden_bias": constraints.real}
    support = constraints.independent(constraints.boolean, 1)

    def __init__(self, weights: torch.Tensor, visible_bias: torch.Tensor, hidden_bias: torch.Tensor,
                 batch_shape=torch.Size(), gibbs_steps: int = 1000, validate_args=None):
        check_rbm_parameters(weights, visible_bias, hidden_bias)
        self.weights, self.visible_bias, self.hidden_bias = weights, visible_bias, hidden_bias
        self.gibbs_steps = int(gibbs_steps)
        super().__init__(torch.Size(batch_shape), torch.Size([weights.shape[0]]), validate_args=False)

    @property
    def num_visible(self) -> int:
        return int(self.weights.shape[0])

    @property
    def num_hidden(self) -> int:
        return int(self.weights.shape[1])

    def expand(self, batch_shape, _instance=None):
        return RBM(self.weights, self.visible_bias, self.hidden_bias, batch_shape, self.gibbs_steps)

    def free_energy(self, value: torch.Tensor) -> torch.Tensor:
        r""":math:`F(v)`: ``value (..., V) -> (...)``."""
        v = value.to(self.weights.dtype)
        return -(v @ self.visible_bias) - F.softplus(v @ self.weights + self.hidden_bias).sum(-1)

    def hidden_probs(self, v: torch.Tensor) -> torch.Tensor:
        r""":math:`p(h_j = 1 \mid v) = \sigma(c_j + (v^\top W)_j)`: ``(..., V) -> (..., H)``."""
        return torch.sigmoid(v @ self.weights + self.hidden_bias)

    def visible_probs(self, h: torch.Tensor) -> torch.Tensor:
        r""":math:`p(v_i = 1 \mid h) = \sigma(b_i + (W h)_i)`: ``(..., H) -> (..., V)``."""
        return torch.sigmoid(h @ self.weights.T + self.visible_bias)

    def gibbs(self, v: torch.Tensor, steps: int = 1) -> torch.Tensor:
        """``steps`` block-Gibbs sweeps v -> h -> v from ``v (..., V)``; returns the new ``v``."""
        for _ in range(steps):
            h = torch.bernoulli(self.hidden_probs(v))
            v = torch.bernoulli(self.visible_probs(h))
        return v

    def sample(self, sample_shape=torch.Size()) -> torch.Tensor:
        """``sample_shape + batch_shape + (V,)`` states after ``gibbs_steps`` sweeps from uniform noise."""
        shape = torch.Size(sample_shape) + self.batch_shape + self.event_shape
        with torch.no_grad():
            v = torch.bernoulli(torch.full(shape, 0.5, dtype=self.weights.dtype, device=self.weights.device))
            return self.gibbs(v, self.gibbs_steps)


def check_rbm_parameters(weights, visible_bias, hidden_bias) -> None:
    """ValueError naming the argument unless ``weights (V, H)``, ``visible_bias (V,)``, ``hidden_bias (H,)``
    are floating tensors of one dtype."""
    for name, t in (("weights", weights), ("visible_bias", visible_bias), ("hidden_bias", hidden_bias)):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            got = f"dtype {t.dtype}" if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"RBM: {name} must be a floating-point tensor, got {got}")
    if weights.dim() != 2:
        raise ValueError(f"RBM: weights must be (visible, hidden), got shape {tuple(weights.shape)}")
    V, H = weights.shape
    if tuple(visible_bias.shape) != (V,):
        raise ValueError(f"RBM: visible_bias must have shape ({V},) for weights {tuple(weights.shape)}, "
                         f"got {tuple(visible_bias.shape)}")
    if tuple(hidden_bias.shape) != (H,):
        raise ValueError(f"RBM: hidden_bias must have shape ({H},) for weights {tuple(weights.shape)}, "
                         f"got {tuple(hidden_bias.shape)}")
