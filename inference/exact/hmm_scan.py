r"""Parallel (O(log T)-depth) log normalizer of a discrete chain.

.. math::
    Z = \sum_{i, j} v_0(i) \, [M_1 M_2 \cdots M_{T-1}](i, j), \qquad
    v_0(i) = \pi(i) \, e_0(i), \qquad M_t(i, j) = P_t(i, j) \, e_t(j),

with :math:`\pi = \exp(\text{log\_init})`, :math:`P_t = \exp(\text{log\_trans}_t)`,
:math:`e_t = \exp(\text{log\_lik}_t)`. The product of the ``T - 1`` matrices is a tree
reduction: each level multiplies adjacent pairs in one batched matmul, so the depth is
``ceil(log2(T - 1))`` at ``O(N T K^3)`` work and ``O(N T K^2)`` memory (the sequential
forward does ``O(N T K^2)`` work in ``T`` dependent steps). Matrices are kept in log form;
each product is ``log(exp(A - a) @ exp(B - b)) + a + b`` with ``a`` the row maxima of ``A``
and ``b`` the column maxima of ``B`` (exact zeros stay ``-inf``); the rare products that
still underflow are recomputed in the log semiring. Padded steps
(``t >= length``) become identity matrices. Differentiable by autograd.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .hmm_checks import canonicalize, valid_steps


def _detached_max(x: Tensor, dim: int) -> Tensor:
    """Max over ``dim`` (keepdim), detached (the result does not depend on the shift), with
    -inf clamped to the dtype's lowest finite value so that ``-inf - shift`` is never NaN."""
    return torch.amax(x.detach(), dim=dim, keepdim=True).clamp_(min=torch.finfo(x.dtype).min)


class _SafeLog(torch.autograd.Function):
    """``log(x)`` for ``x >= 0`` (log 0 = -inf) with the finite gradient ``g / max(x, tiny)``.

    At x = 0 the incoming gradient is 0 (the entry is -inf, so it has zero weight downstream);
    the plain ``log`` backward would give 0 * inf = NaN there.
    """

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x.log()

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return grad / x.clamp(min=torch.finfo(x.dtype).tiny)


def _underflowed(a: Tensor, b: Tensor, prod: Tensor) -> Tensor | None:
    """Batch mask of products with an entry lost to underflow (below the smallest normal
    number although some term is nonzero), or None when there is none (the common case,
    decided by one ``amin``)."""
    tiny = torch.finfo(prod.dtype).tiny
    if prod.numel() == 0 or bool(prod.detach().amin() >= tiny):
        return None
    support = torch.matmul(torch.isfinite(a).to(prod.dtype), torch.isfinite(b).to(prod.dtype)) > 0
    lost = ((prod < tiny) & support).flatten(-2).any(-1)
    return lost if bool(lost.any()) else None


def log_matmul_exp(a: Tensor, b: Tensor) -> Tensor:
    """``log(exp(a) @ exp(b))`` for batches of (K, K) log matrices ``(..., K, K)``.

    Shifted by the row maxima of ``a`` and column maxima of ``b``; products where an entry
    underflows anyway (potentials conflicting by more than the dtype's range) are recomputed
    exactly with ``logsumexp`` over a ``(K, K, K)`` tensor.
    """
    row = _detached_max(a, -1)
    col = _detached_max(b, -2)
    prod = torch.matmul(torch.exp(a - row), torch.exp(b - col))
    out = _SafeLog.apply(prod) + row + col
    lost = _underflowed(a, b, prod)
    if lost is not None:
        out[lost] = torch.logsumexp(a[lost][..., :, :, None] + b[lost][..., None, :, :], -2)
    return out


def tree_log_product(mats: Tensor) -> Tensor:
    """Ordered product ``M_0 M_1 ... M_{m-1}`` of log matrices ``(N, m, K, K)`` -> ``(N, K, K)``."""
    N, _, K, _ = mats.shape
    while mats.shape[1] > 1:
        m = mats.shape[1]
        left, right = mats[:, :m - m % 2].reshape(N, m // 2, 2, K, K).unbind(2)
        paired = log_matmul_exp(left, right)
        mats = torch.cat([paired, mats[:, m - 1:]], 1) if m % 2 else paired
    return mats[:, 0]


def _log_identity(K: int, like: Tensor) -> Tensor:
    """The (K, K) log identity matrix: 0 on the diagonal, -inf elsewhere."""
    eye = torch.eye(K, dtype=torch.bool, device=like.device)
    zero = torch.zeros((), dtype=like.dtype, device=like.device)
    return torch.where(eye, zero, torch.full_like(zero, -torch.inf))


def parallel_log_normalizer(log_init: Tensor, log_trans: Tensor, log_lik: Tensor, lengths=None,
                            time_varying: bool | None = None) -> Tensor:
    r"""log Z of a discrete chain by an associative (tree) product of the step matrices.

    Same inputs, conventions and result as ``hmm.log_normalizer`` (see there):
    log_init: (..., states); log_trans: (..., states, states) or (..., time-1, states, states);
    log_lik: (..., time, states); lengths: (...) int in [1, time] or None.
    Returns log Z: (...). Depth O(log T); differentiable by autograd (no custom backward).
    Memory is O(batch * time * states^2): meant for long sequences with moderate K.
    """
    ch = canonicalize(log_init, log_trans, log_lik, lengths, time_varying)
    N, T, K = ch.log_lik.shape
    first = ch.log_init + ch.log_lik[:, 0]
    if T == 1:
        return first.logsumexp(-1).reshape(ch.batch_shape)
    mats = ch.log_trans + ch.log_lik[:, 1:, None, :]
    if ch.lengths is not None:
        pad = ~valid_steps(ch.lengths, T, N, ch.log_lik.device)[:, 1:, None, None]
        mats = torch.where(pad, _log_identity(K, mats), mats)
    total = tree_log_product(mats)
    return (first[:, :, None] + total).logsumexp((-2, -1)).reshape(ch.batch_shape)
