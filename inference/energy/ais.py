r"""Annealed importance sampling for the partition function of an RBM (Salakhutdinov & Murray 2008).

The path runs from a base RBM with no weights, :math:`p_0(v) \propto e^{a^\top v}` (hidden units free), to the
target :math:`p_1`; the intermediate distributions are RBMs with scaled parameters,

.. math::
    f_\beta(v) = (1 - \beta)\, a^\top v + \beta\, b^\top v + \sum_j \mathrm{softplus}(\beta (c_j + (v^\top W)_j)),

so :math:`\log Z_0 = \sum_i \mathrm{softplus}(a_i) + H \log 2` and each step is exact block Gibbs sampling at
:math:`\beta_k`. With chains :math:`v_0 \sim p_0`, :math:`v_k \sim T_{\beta_k}(v_{k-1}, \cdot)`, the weight
:math:`\log w = \sum_{k=1}^{K} f_{\beta_k}(v_{k-1}) - f_{\beta_{k-1}}(v_{k-1})` gives the unbiased estimate
:math:`\hat Z = Z_0 \cdot \mathrm{mean}(w)`, reported as :math:`\log Z_0 + \log\mathrm{mean}\,e^{\log w}`.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F


class RBMParams(NamedTuple):
    """weights ``W (V, H)``, visible_bias ``b (V,)``, hidden_bias ``c (H,)``."""

    weights: torch.Tensor
    visible_bias: torch.Tensor
    hidden_bias: torch.Tensor


class AISResult(NamedTuple):
    """log_z: the estimate; log_weights: ``(chains,)``; stderr: the delta-method standard error of log_z."""

    log_z: float
    log_weights: torch.Tensor
    stderr: float


def free_energy(p: RBMParams, v: torch.Tensor) -> torch.Tensor:
    r""":math:`F(v) = -b^\top v - \sum_j \mathrm{softplus}(c_j + (v^\top W)_j)`: ``(..., V) -> (...)``."""
    return -(v @ p.visible_bias) - F.softplus(v @ p.weights + p.hidden_bias).sum(-1)


def log_unnormalized(p: RBMParams, base_bias: torch.Tensor, beta: float, v: torch.Tensor) -> torch.Tensor:
    r""":math:`f_\beta(v)` of the annealing path: ``(..., V) -> (...)``."""
    bias = (1 - beta) * base_bias + beta * p.visible_bias
    return v @ bias + F.softplus(beta * (v @ p.weights + p.hidden_bias)).sum(-1)


def gibbs_at(p: RBMParams, base_bias: torch.Tensor, beta: float, v: torch.Tensor,
             generator: torch.Generator | None = None) -> torch.Tensor:
    """One block-Gibbs sweep v -> h -> v of the intermediate RBM at ``beta``: ``(chains, V)``."""
    h = torch.bernoulli(torch.sigmoid(beta * (v @ p.weights + p.hidden_bias)), generator=generator)
    logits = (1 - beta) * base_bias + beta * (h @ p.weights.T + p.visible_bias)
    return torch.bernoulli(torch.sigmoid(logits), generator=generator)


def ais_log_z(p: RBMParams, num_betas: int = 1000, num_chains: int = 100, base_bias: torch.Tensor | None = None,
              generator: torch.Generator | None = None) -> AISResult:
    r"""AIS estimate of :math:`\log Z` with ``num_betas`` temperatures evenly spaced in [0, 1] and ``num_chains``
    independent runs. ``base_bias`` ``a (V,)`` of the base (default zeros; the data's logit means is better)."""
    if num_betas < 2 or num_chains < 1:
        raise ValueError(f"ais_log_z: num_betas must be >= 2 and num_chains >= 1, got {num_betas}, {num_chains}")
    W = p.weights
    a = torch.zeros_like(p.visible_bias) if base_bias is None else base_bias.to(p.visible_bias)
    log_z0 = float(F.softplus(a).sum()) + W.shape[1] * math.log(2.0)
    betas = torch.linspace(0.0, 1.0, num_betas, dtype=torch.float64).tolist()
    with torch.no_grad():
        v = torch.bernoulli(torch.sigmoid(a).expand(num_chains, -1), generator=generator)
        log_w = torch.zeros(num_chains, dtype=W.dtype, device=W.device)
        for prev, beta in zip(betas[:-1], betas[1:]):
            log_w += log_unnormalized(p, a, beta, v) - log_unnormalized(p, a, prev, v)
            v = gibbs_at(p, a, beta, v, generator)
    log_mean = float(torch.logsumexp(log_w, 0)) - math.log(num_chains)
    w = torch.exp(log_w - log_w.max())
    stderr = float(w.std() / (w.mean() * math.sqrt(num_chains))) if num_chains > 1 else float("inf")
    return AISResult(log_z0 + log_mean, log_w, stderr)


def brute_force_log_z(p: RBMParams) -> float:
    r"""Exact :math:`\log Z = \log \sum_v e^{-F(v)}` over all :math:`2^V` visible states (V <= 20)."""
    V = p.weights.shape[0]
    if V > 20:
        raise ValueError(f"brute_force_log_z enumerates 2^V visible states; V = {V} is too many (at most 20)")
    states = all_binary(V, p.weights)
    return float(torch.logsumexp(-free_energy(p, states), 0))


def all_binary(n: int, like: torch.Tensor) -> torch.Tensor:
    """Every binary vector of length ``n``: ``(2^n, n)`` of ``like``'s dtype and device."""
    codes = torch.arange(2 ** n, device=like.device)
    return ((codes.unsqueeze(-1) >> torch.arange(n - 1, -1, -1, device=like.device)) & 1).to(like.dtype)
