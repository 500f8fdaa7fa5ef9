r"""Decoding discrete chains: Viterbi (max-product) and forward-filter backward-sample.

Inputs and conventions as in ``hmm.py`` (``log_init (..., K)``, ``log_trans (..., K, K)`` or
``(..., T-1, K, K)``, ``log_lik (..., T, K)``, ``lengths (...)``). Paths are int64 and
padded with ``-1`` at steps ``t >= length``.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from .hmm_forward import forward_scaled
from .hmm_inputs import ChainInputs, canonicalize, valid_steps
from .hmm_logspace import forward_log


class ViterbiResult(NamedTuple):
    """states: (..., time) int64 MAP path, -1 at t >= length;
    log_prob: (...) its log potential max_z [log_init + sum log_trans + sum log_lik]
    (the unnormalized joint; subtract ``log_normalizer`` for log p(z* | x))."""

    states: Tensor
    log_prob: Tensor


def _at_last_step(x: Tensor, lengths: Tensor | None) -> Tensor:
    """``x[length - 1, n]`` for time-major ``x (T, N, ...)``."""
    if lengths is None:
        return x[-1]
    return x[lengths - 1, torch.arange(x.shape[1], device=x.device)]


def _pad_paths(paths: Tensor, ch: ChainInputs) -> Tensor:
    """Time-major paths (T, ..., N) -> (..., T) with -1 at padded steps, batch dims restored."""
    N, T, _ = ch.log_lik.shape
    valid = valid_steps(ch.lengths, T, N, paths.device).transpose(0, 1)
    valid = valid.reshape((T,) + (1,) * (paths.dim() - 2) + (N,))
    paths = torch.where(valid, paths, torch.full_like(paths, -1))
    paths = paths.movedim(0, -1)
    return paths.reshape(paths.shape[:-2] + ch.batch_shape + (T,))


def _transposed_steps(ch: ChainInputs) -> list[Tensor]:
    """``mats[t - 1][n, j, i] = log_trans_t[i, j]`` for steps t = 1..T-1, each (Nt, K, K)."""
    trans_t = ch.log_trans.transpose(-1, -2).contiguous()
    T = ch.log_lik.shape[1]
    return list(trans_t.unbind(1)) if ch.time_varying else [trans_t[:, 0]] * (T - 1)


def _columns(mat: Tensor, cur: Tensor, rows: Tensor) -> Tensor:
    """``log_trans_t[:, cur]`` (..., N, K) from a transposed step matrix (Nt, K, K)."""
    return mat[0][cur] if mat.shape[0] == 1 else mat[rows, cur]


def _max_product(ch: ChainInputs, mats: list[Tensor]) -> Tensor:
    """Max-product forward pass: scores delta_t (T, N, K). Back-pointers are not stored;
    backtracking recomputes the one column it needs (amax is far cheaper than max-with-index)."""
    lik = ch.log_lik.transpose(0, 1)
    T, N, K = lik.shape
    scores = torch.empty_like(lik)
    scores[0] = ch.log_init + lik[0]
    cand = lik.new_empty(N, K, K)
    s, lk = scores.unbind(0), lik.unbind(0)
    for t in range(1, T):
        torch.add(s[t - 1].unsqueeze(1), mats[t - 1], out=cand)
        torch.amax(cand, -1, out=s[t])
        s[t].add_(lk[t])
    return scores


def _backtrack(scores: Tensor, mats: list[Tensor], last: Tensor, lengths: Tensor | None) -> Tensor:
    """Time-major MAP paths (T, N): z_{t-1} = argmax_i delta_{t-1}(i) + log_trans_t(i, z_t).

    The sums are the same floating-point values the forward pass maximized, so the argmax
    reproduces its choice. At padded steps (t >= length) the state is carried unchanged.
    """
    T, N = scores.shape[:2]
    rows = torch.arange(N, device=scores.device)
    paths = torch.empty(T, N, dtype=torch.long, device=scores.device)
    paths[T - 1] = cur = last
    for t in range(T - 1, 0, -1):
        prev = torch.argmax(scores[t - 1] + _columns(mats[t - 1], cur, rows), -1)
        if lengths is not None:
            prev = torch.where(lengths <= t, cur, prev)
        paths[t - 1] = cur = prev
    return paths


def viterbi(log_init: Tensor, log_trans: Tensor, log_lik: Tensor, lengths=None,
            time_varying: bool | None = None) -> ViterbiResult:
    r"""Most probable path :math:`z^* = \arg\max_z` of the chain's log potential.

    log_init: (..., states); log_trans: (..., states, states) or (..., time-1, states, states);
    log_lik: (..., time, states); lengths: (...) or None. Returns ``ViterbiResult`` with
    states (..., time) int64 (-1 at t >= length) and log_prob (...).
    Recursion: :math:`\delta_t(j) = \max_i [\delta_{t-1}(i) + \text{log\_trans}_t(i, j)] +
    \text{log\_lik}_t(j)`, then backtracking (recomputing one column per step) from
    :math:`\arg\max \delta_{L-1}`.
    Ties go to the lowest state index. Not differentiable (integer output).
    """
    ch = canonicalize(log_init, log_trans, log_lik, lengths, time_varying)
    with torch.no_grad():
        mats = _transposed_steps(ch)
        scores = _max_product(ch, mats)
        final = _at_last_step(scores, ch.lengths)
        paths = _backtrack(scores, mats, torch.argmax(final, -1), ch.lengths)
    return ViterbiResult(_pad_paths(paths, ch), final.amax(-1).reshape(ch.batch_shape))


def _gumbel_argmax(logits: Tensor, generator: torch.Generator | None) -> Tensor:
    """One draw from softmax(logits) over the last dim, by the Gumbel-max trick."""
    u = torch.rand(logits.shape, dtype=logits.dtype, device=logits.device, generator=generator)
    u = u.clamp_(min=torch.finfo(logits.dtype).tiny)
    return torch.argmax(logits - torch.log(-torch.log(u)), -1)


def _log_filtered(ch: ChainInputs) -> Tensor:
    """log p(z_t | x_{0:t}) (T, N, K) up to a constant per (t, n) (all that sampling needs; exact at
    each sequence's last step): scaled forward pass, or the log-space one on underflow."""
    fw = forward_scaled(ch)
    return forward_log(ch).log_alphas if fw.underflow else fw.alphas.log()


def sample(log_init: Tensor, log_trans: Tensor, log_lik: Tensor, sample_shape=(), lengths=None,
           time_varying: bool | None = None, generator: torch.Generator | None = None) -> Tensor:
    r"""Exact posterior paths by forward-filter backward-sample (FFBS).

    log_init: (..., states); log_trans: (..., states, states) or (..., time-1, states, states);
    log_lik: (..., time, states); lengths: (...) or None; generator: a ``torch.Generator`` on
    the inputs' device, for reproducible draws.
    Returns (*sample_shape, ..., time) int64 paths, -1 at t >= length.
    :math:`z_{L-1} \sim p(z_{L-1} \mid x)`, then
    :math:`z_{t-1} \sim p(z_{t-1} \mid x_{0:t-1}) \, P_t(z_{t-1}, z_t)`, normalized.
    """
    ch = canonicalize(log_init, log_trans, log_lik, lengths, time_varying)
    S = math.prod(tuple(sample_shape))
    with torch.no_grad():
        log_alphas = _log_filtered(ch)
        T, N, K = log_alphas.shape
        mats = _transposed_steps(ch)
        rows = torch.arange(N, device=log_alphas.device)
        cur = _gumbel_argmax(_at_last_step(log_alphas, ch.lengths).expand(S, N, K), generator)
        paths = torch.empty(T, S, N, dtype=torch.long, device=log_alphas.device)
        paths[T - 1] = cur
        for t in range(T - 1, 0, -1):
            back = _columns(mats[t - 1], cur, rows)  # (S, N, K): log_trans_t[:, z_t]
            prev = _gumbel_argmax(log_alphas[t - 1] + back, generator)
            if ch.lengths is not None:
                prev = torch.where(ch.lengths <= t, cur, prev)
            paths[t - 1] = cur = prev
    paths = _pad_paths(paths, ch)
    return paths.reshape(tuple(sample_shape) + paths.shape[1:])
