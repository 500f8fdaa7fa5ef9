r"""Posterior statistics of a discrete chain by two doubling scans: log Z and its Jacobian without autograd.

With the step matrices :math:`M_t(i, j) = P_t(i, j)\, e_t(j)` (``t = 1 .. T-1``) and :math:`v_0 = \pi \odot e_0`
(notation of ``hmm_scan``), the forward messages are the prefix products and the backward messages the suffix
products,

.. math::
    \alpha_t = v_0 M_1 \cdots M_t, \qquad \beta_t = M_{t+1} \cdots M_{T-1} \mathbf 1, \qquad
    Z = \alpha_{T-1} \mathbf 1,

and the Jacobian of log Z is the forward-backward posterior (``ops`` module docstring):

.. math::
    \frac{\partial \log Z}{\partial \text{log\_lik}[t, k]} = \frac{\alpha_t(k) \beta_t(k)}{Z}, \qquad
    \frac{\partial \log Z}{\partial \text{log\_trans}_t[i, j]} = \frac{\alpha_{t-1}(i) M_t(i, j) \beta_t(j)}{Z}.

Both scans are Hillis-Steele doublings: ``ceil(log2(T - 1))`` levels, each one batched ``(K, K)`` matmul over all
steps (``P[t] <- P[t - s] P[t]``), every product rescaled to a maximum of 1 with its log scale carried alongside.
That is ``O(N T K^3 log T)`` work in ``log T`` dependent levels of a few ops (the two scans stacked into one),
against the tree product's ``O(N T K^3)`` with an autograd backward through it (``hmm_scan``,
``ops._jacobian_by_scan``), so it wins only while the work is small. Measured on one CPU thread, float64, one shared
transition, time of the tree's Jacobian / the doubling's (2-core machine at a load of ~5, interleaved): N = 1, K = 3,
T = 309: 4.6 / 1.6 ms (2.9x), T = 1000: 1.4x; N = 16, T = 300, K = 2: 1.0x; N = 8, T = 300, K = 4: 0.8x; N = 1,
T = 1000, K = 8: 0.56x; N = 1, T = 20 000, K = 3: 0.25x. ``doubling_fits`` keeps it to ``N T K^3 ceil(log2 T) <=
DOUBLING_MAX_WORK = 2^18`` (the sunspot HMM: 7.5e4; El Nino, T = 732: 2.0e5).

Every rescaled quantity is a sum of products of positive numbers, so it keeps full relative precision as long as
none falls below the dtype's smallest normal number; the marginals and pairwise counts are normalized step by step
(each sums to 1 exactly in exact arithmetic), so no large log scales cancel (in float32 at log Z ~ 1300 that
cancellation cost ~3e-4). The guard is exact, not statistical: ``doubling_jacobian`` returns None, and the caller
runs the tree product, when some potential is ``-inf`` (a structural zero, which the tree handles exactly) or some
rescaled entry (initial vector, step matrix, product at any level) is below the smallest normal number (potentials
conflicting by more than the dtype's range), or log Z is not finite.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from .hmm_inputs import ChainInputs

DOUBLING_MAX_WORK = 2 ** 18
"""Largest ``N T K^3 ceil(log2 T)`` (multiply-adds of one scan) run by doubling; larger chains take the tree."""


def doubling_fits(num_sequences: int, steps: int, states: int) -> bool:
    """Whether a chain batch of ``N`` sequences, ``T`` steps and ``K`` states is run by doubling: ``T >= 2`` and
    ``N T K^3 ceil(log2 T) <= DOUBLING_MAX_WORK`` (N = 1, K = 3: up to T = 970; T = 1000, K = 8: 5e6, the tree)."""
    if steps < 2:
        return False
    return num_sequences * steps * states ** 3 * math.ceil(math.log2(steps)) <= DOUBLING_MAX_WORK


def _prefix_scan(mats: Tensor, log_scale: Tensor, smallest: list) -> tuple[Tensor, Tensor]:
    """Inclusive prefix products ``M_0 ... M_t`` of ``mats: (B, S, K, K)``, each step's true matrix being
    ``mats[:, t] * exp(log_scale[:, t])`` (``log_scale: (B, S)``): ``(products, log scales)`` of the same shapes,
    every product rescaled to a maximum entry of 1. The smallest rescaled entry of each level is appended to
    ``smallest`` (0-dim tensors, read once by the caller)."""
    mats, log_scale = mats.clone(), log_scale.clone()
    S, shift = mats.shape[1], 1
    while shift < S:
        prod = torch.matmul(mats[:, :S - shift], mats[:, shift:])
        top = prod.amax((-2, -1))
        log_scale[:, shift:] = log_scale[:, :S - shift] + log_scale[:, shift:] + top.log()
        mats[:, shift:] = prod / top[..., None, None]
        smallest.append(mats[:, shift:].amin())
        shift *= 2
    return mats, log_scale


def doubling_jacobian(ch: ChainInputs) -> tuple[Tensor, Tensor, Tensor, Tensor] | None:
    r"""(log Z (N,), d/dlog_init (N, K), d/dlog_trans (N, S, K, K), d/dlog_lik (N, T, K)) of canonical chains
    without ``lengths`` (``hmm_inputs.ChainInputs``; ``S = 1`` homogeneous, summed over steps, or ``T - 1``) by the
    doubling scans (module docstring), or None when the check fails (the caller falls back) or ``lengths`` is set.
    Not differentiable (called under ``no_grad`` by ``ops.hmm_log_z_jac``)."""
    N, T, K = ch.log_lik.shape
    if ch.lengths is not None or T < 2 or not all(bool(torch.isfinite(x).all()) for x in ch[:3]):
        return None
    log_mats = ch.log_trans + ch.log_lik[:, 1:, None, :]                     # log M_t, t = 1..T-1: (N, T-1, K, K)
    shift = log_mats.amax((-2, -1))                                          # (N, T-1)
    mats = torch.exp(log_mats - shift[..., None, None])
    first = ch.log_init + ch.log_lik[:, 0]                                   # log v_0: (N, K)
    v0 = torch.exp(first - first.amax(-1, keepdim=True))
    smallest = [mats.amin(), v0.amin()]
    # one scan for both: the suffix products M_t ... M_{T-1} are the transposed prefix products of the reversed,
    # transposed steps
    both, both_scale = _prefix_scan(torch.cat([mats, mats.flip(1).transpose(-2, -1)]),
                                    torch.cat([shift, shift.flip(1)]), smallest)
    prefix, prefix_scale = both[:N], both_scale[:N]
    suffix = both[N:].flip(1).transpose(-2, -1)
    if not bool(torch.stack(smallest).amin() >= torch.finfo(mats.dtype).tiny):
        return None
    # rescaled alpha_t and beta_t, t = 0..T-1 (beta_{T-1} = 1): (N, T, K)
    alpha = torch.cat([v0[:, None], torch.matmul(v0[:, None, None, :], prefix)[..., 0, :]], 1)
    beta = torch.cat([suffix.sum(-1), torch.ones_like(v0)[:, None]], 1)
    log_z = (alpha[:, -1].sum(-1).log() + first.amax(-1) + prefix_scale[:, -1])
    if not bool(torch.isfinite(log_z).all()):
        return None
    marginals = alpha * beta
    marginals = marginals / marginals.sum(-1, keepdim=True)
    pairwise = alpha[:, :-1, :, None] * mats * beta[:, 1:, None, :]         # (N, T-1, K, K), each step to sum 1
    pairwise = pairwise / pairwise.sum((-2, -1), keepdim=True)
    if not ch.time_varying:
        pairwise = pairwise.sum(1, keepdim=True)
    return log_z, marginals[:, 0].clone(), pairwise, marginals  # outputs of a custom op may not alias
