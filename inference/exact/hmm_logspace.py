r"""Log-space forward-backward on canonical inputs (see ``hmm_inputs.ChainInputs``).

``logsumexp`` over a ``(batch, K, K)`` tensor per step: slower than the scaled recursions
of ``hmm_forward`` but exact for potentials of any magnitude. Used as the fallback when a
scaled recursion under- or overflows, for autograd through the loop (double backward,
differentiable posteriors) and for sampling after an underflow.

.. math:: \log \hat\alpha_t = \operatorname{logsumexp}_i(\log \hat\alpha_{t-1}(i)
          + \text{log\_trans}_t(i, \cdot)) + \text{log\_lik}_t - c_t, \qquad
          \log Z = \textstyle\sum_t c_t,

with :math:`c_t` the per-step log normalizer (and the mirror-image recursion for
:math:`\log \beta_t`).
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from .hmm_forward import Smoothed, step_matrix, valid_time_major
from .hmm_inputs import ChainInputs
from .safe_log import logsumexp


class LogForward(NamedTuple):
    """log_alphas: (time, batch, states) log filtered probabilities; log_normalizer: (batch,)."""

    log_alphas: Tensor
    log_normalizer: Tensor


def _safe(x: Tensor) -> Tensor:
    """``x`` with -inf replaced by 0 (a shift that cannot produce -inf - -inf = NaN)."""
    return torch.where(torch.isneginf(x), torch.zeros_like(x), x)


def forward_log(ch: ChainInputs) -> LogForward:
    """Log-space forward recursion, written functionally so autograd can differentiate it.

    ch: canonical inputs (log_init (N, K), log_trans (Nt, S, K, K), log_lik (N, T, K)).
    Returns ``LogForward``: log_alphas (T, N, K) normalized per step, log_normalizer (N,)."""
    lik = ch.log_lik.transpose(0, 1)
    valid = valid_time_major(ch)
    la = ch.log_init + lik[0]
    total = logsumexp(la, -1)
    la = la - _safe(total)[:, None]
    alphas, terms = [la], [total]
    for t in range(1, lik.shape[0]):
        trans = step_matrix(ch.log_trans, t, ch.time_varying)
        la = logsumexp(la[:, :, None] + trans, -2) + lik[t]  # -inf entries (structural zeros): gradient 0
        total = logsumexp(la, -1)
        la = la - _safe(total)[:, None]
        alphas.append(la)
        terms.append(total)
    terms = torch.stack(terms)
    log_z = torch.where(valid, terms, torch.zeros_like(terms)).sum(0)
    return LogForward(torch.stack(alphas), log_z)


def _log_xi(la_prev: Tensor, log_trans_t: Tensor, msg: Tensor) -> Tensor:
    """Normalized two-slice posterior ``(N, K, K)``: log alpha_{t-1}, log P_t, log(e_t beta_t)."""
    joint = la_prev[:, :, None] + log_trans_t + msg[:, None, :]
    return torch.exp(joint - _safe(joint.logsumexp((-2, -1), keepdim=True)))


def smooth_log(ch: ChainInputs, log_alphas: Tensor, weights: Tensor | None,
               want_pairwise: bool, sum_batch: bool) -> Smoothed:
    """Log-space backward pass: the same outputs as ``smooth_scaled``, robust to any magnitude.

    log_alphas: (T, N, K) from ``forward_log``; weights: (N,) or None. Returns ``Smoothed``:
    marginals (N, T, K); pairwise (1 if sum_batch else N, S, K, K), or None without want_pairwise."""
    T, N, K = log_alphas.shape
    lik = ch.log_lik.transpose(0, 1)
    valid = valid_time_major(ch)
    w = torch.ones(N, dtype=lik.dtype, device=lik.device) if weights is None else weights
    lb = torch.zeros(N, K, dtype=lik.dtype, device=lik.device)
    log_betas, xis = [lb], []
    for t in range(T - 1, 0, -1):
        lt = step_matrix(ch.log_trans, t, ch.time_varying)
        msg = lik[t] + lb
        if want_pairwise:
            step_w = torch.where(valid[t], w, torch.zeros_like(w))
            xi = _log_xi(log_alphas[t - 1], lt, msg) * step_w[:, None, None]
            xi = xi.sum(0, keepdim=True) if sum_batch else xi
            if ch.time_varying or not xis:
                xis.append(xi)
            else:  # homogeneous: keep a running sum, not T-1 tensors
                xis[0] = xis[0] + xi
        lb = torch.logsumexp(lt + msg[:, None, :], -1)
        lb = lb - _safe(lb.logsumexp(-1, keepdim=True))
        lb = torch.where(valid[t][:, None], lb, torch.zeros_like(lb))
        log_betas.append(lb)
    log_betas = torch.stack(log_betas[::-1])
    gamma = torch.softmax(log_alphas + log_betas, -1)
    gamma = torch.where(valid[..., None], gamma * w[:, None], torch.zeros_like(gamma))
    pairwise = None
    if want_pairwise:
        pairwise = _stack_pairwise(xis[::-1], ch, N if not sum_batch else 1, K, lik)
    return Smoothed(gamma.transpose(0, 1), pairwise)


def _stack_pairwise(xis: list[Tensor], ch: ChainInputs, rows: int, K: int, like: Tensor) -> Tensor:
    """(rows, S, K, K) from per-step (rows, K, K) two-slice statistics (time-varying), or from
    their running sum (homogeneous: a one-element list)."""
    if not xis:
        S = 0 if ch.time_varying else 1
        return torch.zeros(rows, S, K, K, dtype=like.dtype, device=like.device)
    stacked = torch.stack(xis, 1)
    return stacked if ch.time_varying else stacked.sum(1, keepdim=True)
