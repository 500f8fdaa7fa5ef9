r"""Autoregressive likelihoods: a distribution over discrete sequences from a causal network.

.. math::
    p(x_{1:T}) = \prod_{t=1}^T p(x_t \mid x_{<t}), \qquad
    p(x_t = k \mid x_{<t}) = \mathrm{softmax}\big(\ell_\theta(x)_{t}\big)_k

where the network :math:`\ell_\theta: (\dots, T) \to (\dots, T, K)` is *causal*: its row t reads only
:math:`x_{<t}`. Then one pass on the observed sequence (teacher forcing) gives every conditional at once and
``log_prob`` is the exact log-likelihood; sampling is ancestral, T passes, drawing :math:`x_t` from row t after
:math:`x_{<t}` are drawn. Causal networks: ``ppl.models.autoregressive`` (MADE, causal convolution, LSTM).
"""
from __future__ import annotations

import torch
from pyro.distributions import TorchDistribution, constraints
from torch import nn


class Autoregressive(TorchDistribution):
    r"""Sequences ``x: (..., T)`` of integers in ``{0..K-1}``, event shape ``(T,)``, from a causal ``net``
    mapping ``(..., T)`` long -> ``(..., T, K)`` logits of :math:`x_t` given :math:`x_{<t}`.

    ``log_prob(x) -> (...)``: :math:`\sum_t \log \mathrm{softmax}(\ell(x)_t)_{x_t}` (teacher forcing, one pass).
    ``sample(shape) -> shape + batch_shape + (T,)``: ancestral, T passes. ``batch_shape`` broadcasts the same
    network over independent sequences (e.g. a plate).
    """

    arg_constraints: dict = {}
    has_rsample = False

    def __init__(self, net: nn.Module, length: int, num_categories: int, batch_shape=torch.Size(),
                 validate_args=None):
        for name, value in (("length", length), ("num_categories", num_categories)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"Autoregressive: {name} must be a positive int, got {value!r}")
        if not callable(net):
            raise TypeError(f"Autoregressive: net must map (..., T) -> (..., T, K) logits, got {type(net).__name__}")
        self.net, self.length, self.num_categories = net, length, num_categories
        super().__init__(torch.Size(batch_shape), torch.Size((length,)), validate_args=validate_args)

    @constraints.dependent_property(is_discrete=True, event_dim=1)
    def support(self):
        return constraints.independent(constraints.integer_interval(0, self.num_categories - 1), 1)

    def expand(self, batch_shape, _instance=None):
        return Autoregressive(self.net, self.length, self.num_categories, batch_shape, self._validate_args)

    def conditional_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Normalized log p(x_t = k | x_<t): ``(..., T) -> (..., T, K)``, shape-checked."""
        logits = self.net(x)
        expected = tuple(x.shape) + (self.num_categories,)
        if tuple(logits.shape) != expected:
            raise ValueError(f"Autoregressive: net returned logits of shape {tuple(logits.shape)} for sequences "
                             f"of shape {tuple(x.shape)}; expected {expected} (..., T, K)")
        return torch.log_softmax(logits, -1)

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        if self._validate_args:
            self._validate_sample(value)
        x = value.long()
        shape = torch.broadcast_shapes(x.shape[:-1], self.batch_shape) + (self.length,)
        x = x.expand(shape)
        return self.conditional_logits(x).gather(-1, x.unsqueeze(-1)).squeeze(-1).sum(-1)

    @torch.no_grad()
    def sample(self, sample_shape=torch.Size()) -> torch.Tensor:
        shape = self._extended_shape(sample_shape)
        proto = next(iter(self.net.parameters()), None) if isinstance(self.net, nn.Module) else None
        device = proto.device if proto is not None else None
        x = torch.zeros(shape, dtype=torch.long, device=device)
        for t in range(self.length):
            probs = self.conditional_logits(x)[..., t, :].exp()
            x[..., t] = torch.multinomial(probs.reshape(-1, self.num_categories), 1).reshape(shape[:-1])
        return x
