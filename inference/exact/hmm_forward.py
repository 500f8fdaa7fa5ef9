r"""Scaled-probability forward-backward kernels on canonical inputs (``hmm_inputs.ChainInputs``).

Potentials are exponentiated after a max shift (per step for ``log_lik``, per matrix for
``log_trans``: :math:`e_t = \exp(\text{log\_lik}_t - m_t)`,
:math:`P_t = \exp(\text{log\_trans}_t - c_t)`),
and the forward messages are renormalized every ``r`` steps (``renorm_period``) and at each
sequence's last step, so a step is one batched matmul and one multiply:

.. math:: a_t = (\hat\alpha_{t-1} P_t) \odot e_t,\quad
          s_t = \textstyle\sum_k a_t(k) \text{ at renormalization steps, else } 1,
          \quad \hat\alpha_t = a_t / s_t,\quad
          \log Z = \textstyle\sum_t (\log s_t + m_t) + \sum_{t \ge 1} c_t + \text{init shift}.

Rabiner's scaling holds for any choice of scales (only their product, Z up to the shifts, is
fixed), so the backward pass reuses the forward scales, two ops per step:

.. math:: \hat\beta_{T-1} = 1,\quad \hat\beta_{t-1} = P_t \, (e_t \odot \hat\beta_t / s_t),\quad
          \gamma_t = \hat\alpha_t \hat\beta_t,\quad
          \xi_t(i, j) = \hat\alpha_{t-1}(i) \, P_t(i, j) \, e_t(j) \hat\beta_t(j) / s_t.

Exactly, :math:`w_t = \sum_k \gamma_t(k) = 1`; the computed :math:`w_t` renormalizes
:math:`\gamma_t, \xi_t`, and a :math:`w_t` far from 1 (or a scale :math:`s_t` below
``tiny * K^(r-1)``, the bound that keeps every unnormalized message in between above the
dtype's smallest normal number, as a step grows the sum by at most K) flags under/overflow.
That needs potentials conflicting by about ``log(1/tiny) / r`` nats per step or more on
average over ``r`` steps (~20 nats in float32); callers then use the log-space kernels
(``hmm_logspace``). Messages are time-major ``(T, N, K)`` so each step
reads contiguous rows.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from .hmm_inputs import ChainInputs, valid_steps


class ScaledForward(NamedTuple):
    """Forward pass of the scaled recursion.

    alphas:    (time, batch, states) proportional to the filtered p(z_t | x_{0:t}) (rows sum
               to one at renormalization steps and at each sequence's last step)
    log_terms: (time, batch) per-step contributions to log Z, zero at t >= length
    scales:    (time, batch, 1) the normalizers s_t of the shifted recursion (1 between
               renormalization steps)
    emis:      (time, batch, states) exp(log_lik - per-step max)
    trans:     (Nt, S, states, states) exp(log_trans - per-matrix max)
    underflow: True when some valid s_t fell below ``tiny * K^(r-1)`` (module docstring)
    """

    alphas: Tensor
    log_terms: Tensor
    scales: Tensor
    emis: Tensor
    trans: Tensor
    underflow: bool


class Smoothed(NamedTuple):
    """marginals: (batch, time, states), zero at t >= length;
    pairwise: (Nt or batch, S, states, states) expected transition counts
              (see ``expected_transitions``)."""

    marginals: Tensor
    pairwise: Tensor | None


def shift_exp(x: Tensor, dims) -> tuple[Tensor, Tensor]:
    """``(exp(x - m), m)`` for ``x: (...)``: ``m`` the max over ``dims`` (kept as size-1 dims; 0 where
    that max is -inf), ``exp(x - m)`` of the shape of ``x``."""
    m = torch.amax(x, dim=dims, keepdim=True)
    m = torch.where(torch.isneginf(m), torch.zeros_like(m), m)
    return torch.exp(x - m), m


def step_matrix(trans: Tensor, t: int, time_varying: bool) -> Tensor:
    """The ``(Nt, K, K)`` transition into step ``t >= 1``."""
    return trans[:, t - 1] if time_varying else trans[:, 0]


def valid_time_major(ch: ChainInputs) -> Tensor:
    """``(T, N)`` bool mask of steps t < length."""
    N, T, _ = ch.log_lik.shape
    return valid_steps(ch.lengths, T, N, ch.log_lik.device).transpose(0, 1)


def _step_operands(messages: Tensor, trans: Tensor, time_varying: bool, transpose: bool):
    """Per-step views for ``out[t] = vec[t'] @ mats[t]``: (matmul fn, vec views, matrices by step).

    A shared matrix (Nt = 1) gives one ``mm`` of (N, K) @ (K, K); per-sequence matrices a
    ``bmm`` of (N, 1, K) @ (N, K, K). ``mats[t]`` is the transition into step t (index 0 unused).
    """
    T = messages.shape[0]
    mats = trans.transpose(-1, -2) if transpose else trans
    if trans.shape[0] == 1:
        mats, mm, vecs = mats[0], torch.mm, messages.unbind(0)
    else:
        mats, mm, vecs = mats, torch.bmm, messages.unsqueeze(2).unbind(0)
    by_step = mats.unbind(-3) if time_varying else [mats.select(-3, 0)] * (T - 1)
    return mm, vecs, [None, *by_step]


def _log_terms(ch: ChainInputs, scales: Tensor, m_lik: Tensor, m_init: Tensor,
               m_trans: Tensor) -> Tensor:
    """(T, N) per-step log Z terms: log s_t plus the shifts, zero at padded steps."""
    terms = scales[..., 0].log() + m_lik[..., 0]
    terms[0] += m_init[:, 0]
    shifts = m_trans[:, :, 0, 0].transpose(0, 1)  # (S, Nt)
    terms[1:] += shifts if ch.time_varying else shifts[0]
    if ch.lengths is None:
        return terms
    return torch.where(valid_time_major(ch), terms, torch.zeros_like(terms))


def _time_major_emissions(log_lik: Tensor) -> tuple[Tensor, Tensor]:
    """``exp(log_lik - m)``, contiguous time-major (T, N, K), in two passes; and m (T, N, 1)."""
    m = torch.amax(log_lik, -1, keepdim=True).transpose(0, 1)
    m = torch.where(torch.isneginf(m), torch.zeros_like(m), m)
    emis = log_lik.new_empty(m.shape[:2] + log_lik.shape[-1:])
    torch.sub(log_lik.transpose(0, 1), m, out=emis)
    return emis.exp_(), m


def renorm_period(dtype: torch.dtype) -> int:
    """Steps between renormalizations of the forward messages: ``log(1/tiny) / 20`` (4 in
    float32, 16 at most), so an average conflict under ~20 nats per step never underflows."""
    nats = -math.log(torch.finfo(dtype).tiny)
    return max(1, min(16, int(nats // 20)))


def _normalize_last_steps(alphas: Tensor, scales: Tensor, ch: ChainInputs) -> None:
    """Renormalize each sequence's last valid step in place (its scale absorbs the sum)."""
    T, N, _ = alphas.shape
    if ch.lengths is None:
        last = alphas[T - 1]
        total = last.sum(-1, keepdim=True)
        last.div_(total)
        scales[T - 1].mul_(total)
        return
    rows = torch.arange(N, device=alphas.device)
    steps = ch.lengths - 1
    last = alphas[steps, rows]
    total = last.sum(-1, keepdim=True)
    alphas[steps, rows] = last / total
    scales[steps, rows] = scales[steps, rows] * total


def forward_scaled(ch: ChainInputs, period: int | None = None) -> ScaledForward:
    """Scaled forward recursion (no autograd); see the module docstring for the math.

    ch: canonical inputs (log_init (N, K), log_trans (Nt, S, K, K), log_lik (N, T, K)).
    Returns ``ScaledForward``: time-major alphas (T, N, K), log_terms (T, N), scales (T, N, 1).
    period: steps between renormalizations; None = ``renorm_period(dtype)``, and if that
    underflows, one retry renormalizing every step (the flag is then only set when a
    single step's scale underflows, i.e. a conflict beyond the dtype's exponent range).
    """
    if period is None:
        fw = _forward_scaled(ch, renorm_period(ch.log_lik.dtype))
        return _forward_scaled(ch, 1) if fw.underflow and renorm_period(ch.log_lik.dtype) > 1 else fw
    return _forward_scaled(ch, period)


def _forward_scaled(ch: ChainInputs, period: int) -> ScaledForward:
    """``forward_scaled`` renormalizing every ``period`` steps and at each last step."""
    emis, m_lik = _time_major_emissions(ch.log_lik)
    trans, m_trans = shift_exp(ch.log_trans, (-2, -1))
    init, m_init = shift_exp(ch.log_init, -1)
    alphas = torch.empty_like(emis)
    scales = emis.new_ones(emis.shape[:-1] + (1,))
    mm, vecs, mats = _step_operands(alphas, trans, ch.time_varying, transpose=False)
    # per-step views (one unbind each: views cost ~0.5 us apiece); a shared matrix already
    # gives (N, K) views of ``alphas`` as ``vecs``
    a = vecs if trans.shape[0] == 1 else alphas.unbind(0)
    e = emis.unbind(0)
    torch.mul(init, e[0], out=a[0])
    torch.sum(a[0], -1, keepdim=True, out=scales[0])
    a[0].div_(scales[0])
    for t in range(1, len(a)):
        mm(vecs[t - 1], mats[t], out=vecs[t])
        a[t].mul_(e[t])
        if t % period == 0:
            s = scales[t]
            torch.sum(a[t], -1, keepdim=True, out=s)
            a[t].div_(s)
    _normalize_last_steps(alphas, scales, ch)
    K = emis.shape[-1]
    low = scales[..., 0] < torch.finfo(emis.dtype).tiny * float(K) ** (period - 1)
    if ch.lengths is not None:
        low &= valid_time_major(ch)
    terms = _log_terms(ch, scales, m_lik, m_init, m_trans)
    return ScaledForward(alphas, terms, scales, emis, trans, bool(low.any()))


def _backward_messages(fw: ScaledForward, ch: ChainInputs) -> tuple[Tensor, Tensor]:
    """Scaled backward messages beta_hat (T, N, K) and ``e_t beta_hat_t / s_t`` (row 0 unused)."""
    betas = torch.empty_like(fw.alphas)
    weighted = torch.empty_like(fw.alphas)
    betas[-1].fill_(1.0)
    scaled_emis = fw.emis / fw.scales
    mm, vecs, mats = _step_operands(betas, fw.trans, ch.time_varying, transpose=True)
    b = vecs if fw.trans.shape[0] == 1 else betas.unbind(0)
    w, es = weighted.unbind(0), scaled_emis.unbind(0)
    w_vecs = weighted.unsqueeze(2).unbind(0) if fw.trans.shape[0] > 1 else w
    pad = None if ch.lengths is None else (~valid_time_major(ch)).unsqueeze(-1).unbind(0)
    for t in range(len(b) - 1, 0, -1):
        torch.mul(es[t], b[t], out=w[t])
        mm(w_vecs[t], mats[t], out=vecs[t - 1])
        if pad is not None:
            b[t - 1].masked_fill_(pad[t], 1.0)
    return betas, weighted


def expected_transitions(prev: Tensor, incoming: Tensor, trans: Tensor, time_varying: bool,
                         sum_batch: bool) -> Tensor:
    """Expected transition counts ``sum_t prev_t (x) incoming_t * P_t``.

    prev, incoming: (T-1, N, K); trans: (Nt, S, K, K).
    Returns (1 if sum_batch else N, S, K, K): summed over steps when homogeneous (S = 1).
    """
    target = ("" if sum_batch else "n") + ("t" if time_varying else "")
    counts = torch.einsum(f"tni,tnj->{target}ij", prev, incoming)
    if sum_batch:
        counts = counts.unsqueeze(0)
    if not time_varying:
        counts = counts.unsqueeze(1)
    return counts * trans


def smooth_scaled(fw: ScaledForward, ch: ChainInputs, weights: Tensor | None,
                  want_pairwise: bool, sum_batch: bool) -> Smoothed | None:
    """Posterior marginals (and pairwise counts) from a scaled forward pass.

    fw: ``forward_scaled(ch)``; ch: canonical inputs (log_lik (N, T, K)).
    Returns ``Smoothed``: marginals (N, T, K); pairwise (1 if sum_batch else N, S, K, K) or None.
    weights: (N,) multiplies each sequence's statistics (the incoming gradient), or None.
    Returns None when the backward recursion under/overflowed (some valid w_t outside
    [1/2, 2]); the caller then falls back to log space.
    """
    betas, weighted = _backward_messages(fw, ch)
    gamma = fw.alphas * betas
    norm = gamma.sum(-1, keepdim=True)
    off = ~((norm > 0.5) & (norm < 2.0))[..., 0]
    valid = None if ch.lengths is None else valid_time_major(ch)
    if bool((off if valid is None else off & valid).any()):
        return None
    scale = norm.reciprocal() if weights is None else weights[:, None] / norm
    gamma = _masked(gamma * scale, valid)
    pairwise = None
    if want_pairwise:
        incoming = _masked(weighted[1:] * scale[1:], None if valid is None else valid[1:])
        pairwise = expected_transitions(fw.alphas[:-1], incoming, fw.trans, ch.time_varying,
                                        sum_batch)
    return Smoothed(gamma.transpose(0, 1), pairwise)


def _masked(x: Tensor, valid: Tensor | None) -> Tensor:
    """Zero the rows of ``x (T, N, K)`` at padded steps (``where``, so NaN there cannot leak)."""
    if valid is None:
        return x
    return torch.where(valid[..., None], x, torch.zeros((), dtype=x.dtype, device=x.device))
