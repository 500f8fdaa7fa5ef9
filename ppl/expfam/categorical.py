r"""Categorical distribution over K states in natural-parameter form.

.. math::
    p(z) = \exp\big(\langle \eta, t(z)\rangle - A(\eta)\big), \qquad
    t(z) = \mathrm{onehot}(z) \in \{0, 1\}^K, \qquad
    A(\eta) = \log \sum_{k=1}^{K} e^{\eta_k},

natural parameter :math:`\eta` = unnormalized log-probabilities (logits; :math:`-\infty` marks an
impossible state), standard parameter :math:`\pi = \mathrm{softmax}(\eta)`, expected statistics
:math:`E[t(z)] = \nabla A(\eta) = \pi`. Conjugate prior: :mod:`ppl.expfam.dirichlet`
(its ``conjugate_update`` takes the counts ``sum_n t(z_n)`` from :func:`counts`).

Shapes: ``natparam: (*batch, states)``; values ``z`` are integer states ``(*sample, *batch)``.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from ..checks import as_tensor, check_finite, check_same_shape, check_trailing


class CategoricalParams(NamedTuple):
    """Standard parameters: ``probs: (*batch, states)``, nonnegative, summing to one."""
    probs: Tensor


def _check(natparam: Tensor, name: str = "natparam") -> Tensor:
    natparam = as_tensor(name, natparam)
    check_trailing(name, natparam, (None,), "(*batch, states)")
    check_finite(name, natparam, allow_neg_inf=True)
    if bool((natparam == -float("inf")).all(-1).any()):
        raise ValueError(f"{name} must have at least one finite logit per row, got a row of all -inf")
    return natparam


def natural_from_standard(probs: Tensor) -> Tensor:
    r"""Logits :math:`\eta = \log \pi` ``(*batch, states)`` from ``probs: (*batch, states)`` (rows sum to 1)."""
    probs = as_tensor("probs", probs)
    check_trailing("probs", probs, (None,), "(*batch, states)")
    check_finite("probs", probs)
    if bool((probs < 0).any()):
        raise ValueError(f"probs must be nonnegative, got min {float(probs.min())}")
    total = probs.sum(-1)
    if bool(((total - 1).abs() > 1e3 * torch.finfo(probs.dtype).eps * probs.shape[-1]).any()):
        raise ValueError(f"probs must sum to 1 over the last dim, got sums {total.flatten()[:4].tolist()}")
    return probs.log()


def standard_from_natural(natparam: Tensor) -> CategoricalParams:
    r"""``CategoricalParams(probs = softmax(natparam))`` ``(*batch, states)``."""
    return CategoricalParams(torch.softmax(_check(natparam), -1))


def log_partition(natparam: Tensor) -> Tensor:
    r""":math:`A(\eta) = \mathrm{logsumexp}_k \eta_k`; ``natparam: (*batch, states)`` -> ``(*batch)``."""
    return torch.logsumexp(_check(natparam), -1)


def expected_stats(natparam: Tensor) -> Tensor:
    r""":math:`E[\mathrm{onehot}(z)] = \mathrm{softmax}(\eta)` ``(*batch, states)``."""
    return torch.softmax(_check(natparam), -1)


def sufficient_stats(z: Tensor, num_states: int, dtype: torch.dtype | None = None) -> Tensor:
    r""":math:`t(z) = \mathrm{onehot}(z)`; ``z: (...)`` integers in ``[0, num_states)`` -> ``(..., states)``
    of ``dtype`` (default: torch's default float dtype) on ``z``'s device."""
    if not isinstance(z, Tensor) or z.is_floating_point() or z.is_complex():
        raise ValueError(f"z must be an integer torch.Tensor, got {getattr(z, 'dtype', type(z).__name__)}")
    if z.numel() and bool(((z < 0) | (z >= num_states)).any()):
        raise ValueError(f"z must lie in [0, {num_states}), got values in [{int(z.min())}, {int(z.max())}]")
    return torch.nn.functional.one_hot(z.long(), num_states).to(dtype or torch.get_default_dtype())


def counts(z: Tensor, num_states: int, weights: Tensor | None = None) -> Tensor:
    r"""Counts :math:`\sum_n w_n\, \mathrm{onehot}(z_n)` over the last dim of ``z: (*batch, num)``,
    ``weights: (*batch, num)`` (default 1) -> ``(*batch, states)``; add to a Dirichlet natparam."""
    if weights is None:
        return sufficient_stats(z, num_states).sum(-2)
    weights = as_tensor("weights", weights)
    if weights.shape != z.shape:
        raise ValueError(f"weights must have the shape of z, {tuple(z.shape)}, got {tuple(weights.shape)}")
    return (sufficient_stats(z, num_states, weights.dtype) * weights[..., None]).sum(-2)


def sample(natparam: Tensor, sample_shape: tuple = (), generator: torch.Generator | None = None) -> Tensor:
    r"""Integer states ``(*sample_shape, *batch)`` drawn with probabilities ``softmax(natparam)``."""
    probs = torch.softmax(_check(natparam), -1)
    flat = probs.reshape(-1, probs.shape[-1])
    n = int(torch.Size(sample_shape).numel())
    draws = torch.multinomial(flat, n, replacement=True, generator=generator)   # (batch_flat, n)
    return draws.mT.reshape(tuple(sample_shape) + tuple(probs.shape[:-1]))


def log_prob(natparam: Tensor, z: Tensor) -> Tensor:
    r""":math:`\log p(z) = \eta_z - A(\eta)`; ``z: (*sample, *batch)`` integers -> ``(*sample, *batch)``."""
    natparam = _check(natparam)
    batch = tuple(natparam.shape[:-1])
    if not isinstance(z, Tensor) or z.dim() < len(batch) or tuple(z.shape[z.dim() - len(batch):]) != batch:
        got = tuple(getattr(z, "shape", ()))
        raise ValueError(f"z must have shape (*sample, *batch) with batch {batch}, got {got}")
    logp = natparam - torch.logsumexp(natparam, -1, keepdim=True)
    logp = logp.expand(tuple(z.shape) + (natparam.shape[-1],))
    onehot = sufficient_stats(z, natparam.shape[-1], natparam.dtype).bool()
    return logp.masked_fill(~onehot, 0.0).sum(-1)


def kl(natparam_q: Tensor, natparam_p: Tensor) -> Tensor:
    r""":math:`KL(q\|p) = \sum_k \pi^q_k (\log\pi^q_k - \log\pi^p_k)`, equal to
    :math:`A(\eta_p) - A(\eta_q) - \langle\eta_p - \eta_q, \pi^q\rangle`; ``(*batch, states)`` -> ``(*batch)``.
    States with :math:`\pi^q_k = 0` contribute 0; :math:`\pi^q_k > 0 = \pi^p_k` gives +inf."""
    q, p = _check(natparam_q, "natparam_q"), _check(natparam_p, "natparam_p")
    check_same_shape("natparam_q", q, "natparam_p", p)
    log_q, log_p = torch.log_softmax(q, -1), torch.log_softmax(p, -1)
    probs_q = log_q.exp()
    diff = torch.where(probs_q > 0, log_q - log_p, torch.zeros_like(probs_q))
    return (probs_q * diff).sum(-1)
