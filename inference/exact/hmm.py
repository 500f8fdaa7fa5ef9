r"""Exact inference for discrete chains (HMMs): log normalizer, marginals, Viterbi, FFBS.

Model (potentials need not be normalized; the SVAE passes arbitrary log potentials):

.. math::
    Z = \sum_{z_0, \dots, z_{T-1}} \exp\Big(\text{log\_init}[z_0]
        + \sum_{t \ge 1} \text{log\_trans}_t[z_{t-1}, z_t] + \sum_t \text{log\_lik}[t, z_t]\Big)

* ``log_init: (..., K)`` is log p(z_0) (no transition is applied before the first emission,
  unlike Pyro's ``DiscreteHMM``); ``log_trans[i, j] = log p(z_t = j | z_{t-1} = i)``.
* ``log_trans`` is homogeneous ``(..., K, K)`` or time-varying ``(..., T-1, K, K)`` (entry
  ``t-1`` is the transition into step ``t``). **Rule:** with ``time_varying=None`` it is read
  as time-varying iff ``log_trans.dim() >= 3 and log_trans.shape[-3] == T - 1``;
  ``time_varying=True/False`` forces the reading (pass ``False`` for a homogeneous
  ``log_trans`` whose batch dim happens to equal ``T - 1``).
* ``log_lik: (..., T, K)`` log emission potentials. The leading batch dims of
  ``log_init``, ``log_trans``, ``log_lik`` and ``lengths`` broadcast together.
* ``lengths: (...)`` integers in ``[1, T]`` or None: steps ``t >= length`` are ignored
  entirely (no transition, no emission; ``log_lik`` there may hold anything, even NaN).
  Marginals are 0 there; Viterbi and sampled paths are padded with ``-1``.
* ``-inf`` potentials are structural zeros; NaN or ``+inf`` raise ValueError. If every
  path has zero potential, log Z is ``-inf`` (and the marginals are undefined).

Kernels, all on the canonical flat-batch inputs of ``hmm_inputs``: scaled-probability
forward/backward recursions with matmuls (``hmm_forward``), a log-space fallback when a
scale underflows (``hmm_logspace``), an O(log T)-depth tree product (``hmm_scan``), and
max-product / FFBS decoding (``hmm_decode``). ``log_normalizer`` and ``posterior`` pick the
sequential recursion or the tree product by ``use_parallel_scan`` (``method="auto"``).
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from .hmm_decode import ViterbiResult, sample, viterbi
from . import ops
from .hmm_inputs import ChainInputs, canonicalize, check_values_finite
from .hmm_scan import PAIR_GEMM_MAX_STATES, parallel_log_normalizer

__all__ = ["HMMPosterior", "ViterbiResult", "log_normalizer", "posterior", "viterbi", "sample",
           "parallel_log_normalizer", "use_parallel_scan"]

METHODS = ("auto", "sequential", "parallel")
SCAN_MIN_STEPS = 256
SCAN_MAX_BATCH_STATES = 32
SCAN_MAX_BATCH_STATES_SHARED = 64
SCAN_MAX_STATES = 16
SCAN_MAX_ELEMENTS = 2 ** 26


def use_parallel_scan(batch: int, steps: int, states: int, shared: bool = False) -> bool:
    r"""The ``method="auto"`` rule: True when the tree product (``hmm_scan``) should be used.

    .. math:: T \ge 256,\quad K \le 16,\quad N K \le c,\quad N T K^2 \le 2^{26},
              \qquad c = 64 \text{ if shared and } K \le 8 \text{ else } 32

    (N sequences of T steps, K states; ``shared``: one homogeneous ``log_trans`` for the
    whole batch and no ``lengths``, where the scan's first level is one GEMM,
    ``hmm_scan._shared_pair_products``). The sequential recursion costs ``T`` dependent
    steps of a few small ops, each bound by dispatch overhead (~3.5 us per step in total)
    until ``N K^2`` is large; the tree product does ``O(N T K^3)`` work in ``O(log T)``
    levels of batched matmuls, so it wins for long sequences with small ``N K``.

    Measured on one CPU thread (``torch.set_num_threads(1)``, 2-core AMD EPYC, float32),
    ratios sequential / scan time (forward | forward + backward), medians of 7
    interleaved runs, T = 1000:

    * shared (GEMM first level): K=2: N=1 5.4 | 4.9, N=32 1.28 | 1.43, N=64 0.77 | 1.02;
      K=4: N=16 1.35 | 1.41, N=32 0.70 | 0.91; K=8: N=1 3.8 | 3.8, N=8 1.20 | 1.42,
      N=16 0.72 | 0.61; K=16: N=1 1.72 | 2.07, N=2 1.04 | 1.24, N=4 0.38 | 0.49;
      K=32: N=1 0.80 | 0.54.
    * general (log-space first level; per-sequence or time-varying transitions, lengths):
      K=2: N=16 1.35 | 1.77, N=32 0.83 | 1.12; K=4: N=8 1.43 | 1.39, N=16 0.83 | 0.95;
      K=8: N=4 1.38 | 1.58, N=8 0.78 | 0.82; K=16: N=1 1.84 | 2.09; K=64: N=1 0.16 | 0.11.

    Both costs are linear in T, so the ratio barely depends on T above ~256; below, the
    scan's ``log2 T`` levels of overhead lose (T = 128: 0.85-1.3; at T = 256 the N K = 64
    shared cases are at parity forward, 1.1-1.2x with the backward). At T = 100 000,
    N = 1, K = 8 the scan is ~10x (general) to ~19x (shared) faster. Memory: the scan
    holds ``N T K^2`` log matrices and with a backward pass peaks at ~6x that (measured:
    T = 300 000, N = 1, K = 8, float32: 426 MiB peak RSS growth, vs 577 MiB for the
    sequential path with its backward); the cap ``N T K^2 <= 2^26`` (256 MiB per copy in
    float32) keeps larger inputs on the recursion, whose messages are ``O(N T K)``. The
    rule was measured on CPU; on a GPU the per-step launch cost is larger, so the scan
    wins more often than the rule says (``method="parallel"`` forces it).
    """
    cap = (SCAN_MAX_BATCH_STATES_SHARED if shared and states <= PAIR_GEMM_MAX_STATES
           else SCAN_MAX_BATCH_STATES)
    return (steps >= SCAN_MIN_STEPS and batch * states <= cap and states <= SCAN_MAX_STATES
            and batch * steps * states ** 2 <= SCAN_MAX_ELEMENTS)


def _parallel(ch: ChainInputs, method: str) -> bool:
    """Whether ``method`` picks the scan: "auto" by ``use_parallel_scan``, "parallel" yes,
    "sequential" no; anything else is a ValueError."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if method == "auto":
        shared = ch.log_trans.shape[0] == 1 and not ch.time_varying and ch.lengths is None
        return use_parallel_scan(*ch.log_lik.shape, shared=shared)
    return method == "parallel"


class HMMPosterior(NamedTuple):
    """Posterior of a batch of chains.

    log_normalizer: (...) log Z
    marginals:      (..., time, states) p(z_t = k | x), zero at t >= length
    pairwise:       expected transition counts E[#{t : z_{t-1} = i, z_t = j}]: (..., states, states)
                    summed over steps for a homogeneous log_trans; (..., time-1, states, states)
                    per step for a time-varying one (zero for steps t >= length)
    """

    log_normalizer: Tensor
    marginals: Tensor
    pairwise: Tensor


def log_normalizer(log_init: Tensor, log_trans: Tensor, log_lik: Tensor, lengths=None,
                   time_varying: bool | None = None, method: str = "auto") -> Tensor:
    r"""log Z of a batch of discrete chains (forward algorithm), differentiable.

    log_init:  (..., states)                        log p(z_0), unnormalized allowed
    log_trans: (..., states, states) homogeneous or (..., time-1, states, states) time-varying
               (rule in the module docstring; ``time_varying`` forces it)
    log_lik:   (..., time, states)                  log emission potentials
    lengths:   (...) int in [1, time], or None      steps t >= length are ignored
    Returns:   (...) log Z.

    Forward: one batched matmul and one renormalization per step on max-shifted
    exponentiated potentials (log-space fallback on underflow). Gradient:
    :math:`\partial \log Z / \partial \text{log\_lik}[t, k] = p(z_t = k)`,
    :math:`\partial / \partial \text{log\_init} = p(z_0)`, :math:`\partial / \partial
    \text{log\_trans}` = expected transition counts (summed over steps when homogeneous),
    computed by the scaled backward recursion alongside the forward pass when an input requires
    grad. The kernels run as custom torch operators (``ops``): one node under ``make_fx``,
    vmappable (``torch.func.vmap(grad(...))``); second derivatives (``create_graph=True``)
    come from a Hessian-vector product through the log-space loop (``ops.hmm_hvp``, exact).

    method: "auto" (default) runs the O(log T)-depth tree product of ``hmm_scan`` instead
    when ``use_parallel_scan(N, T, K)`` holds (long sequences, small batch * states; the
    rule and its measurements are in that function's docstring), else the recursion above;
    "sequential" / "parallel" force one. The tree product's gradient is autograd through it,
    inside the same operator (same gradients).
    """
    ch = canonicalize(log_init, log_trans, log_lik, lengths, time_varying, check_values=False)
    return ops.log_normalizer(ch, _parallel(ch, method)).reshape(ch.batch_shape)


def _restore_pairwise(pairwise: Tensor, ch: ChainInputs) -> Tensor:
    """Pairwise counts (Nt or N, S, K, K) -> (..., K, K) or (..., T-1, K, K) per sequence."""
    N = ch.log_lik.shape[0]
    pairwise = pairwise.expand((N,) + pairwise.shape[1:])
    if not ch.time_varying:
        pairwise = pairwise[:, 0]
    return pairwise.reshape(ch.batch_shape + pairwise.shape[1:])


def _posterior_by_op(ch: ChainInputs, parallel: bool) -> HMMPosterior:
    """Posterior statistics as the Jacobian of log Z (``ops.hmm_log_z_jac``): differentiable when the
    inputs require grad (second derivatives through ``ops.hmm_hvp``)."""
    log_z, _, pairwise, marginals = ops.log_normalizer_and_jacobian(ch, parallel)
    marginals = marginals.reshape(ch.batch_shape + ch.log_lik.shape[1:])
    return HMMPosterior(log_z.reshape(ch.batch_shape), marginals, _restore_pairwise(pairwise, ch))


def posterior(log_init: Tensor, log_trans: Tensor, log_lik: Tensor, lengths=None,
              time_varying: bool | None = None, method: str = "auto") -> HMMPosterior:
    r"""Forward-backward: log Z, marginals p(z_t | x) and expected transition counts.

    Inputs as in ``log_normalizer``. Returns ``HMMPosterior``: log_normalizer (...),
    marginals (..., time, states), pairwise (..., states, states) summed over steps when
    homogeneous or (..., time-1, states, states) per step when time-varying, with
    :math:`\xi_t(i, j) = p(z_{t-1} = i, z_t = j \mid x)`.

    When any input requires grad (and grad mode is on), the outputs are differentiable: they are
    the Jacobian outputs of ``ops.hmm_log_z_jac`` (the scaled recursions), whose backward is a
    Hessian-vector product through the log-space loop. Otherwise the scaled recursions run
    directly.

    method: as in ``log_normalizer``. With the tree product (``"parallel"``, or ``"auto"``
    when ``use_parallel_scan`` holds) the statistics are the gradients of its log Z by
    autograd (one backward pass through the tree; differentiable when inputs require grad).
    """
    ch = canonicalize(log_init, log_trans, log_lik, lengths, time_varying, check_values=False)
    parallel = _parallel(ch, method)
    tracked = torch.is_grad_enabled() and any(x.requires_grad for x in ch[:3])
    if parallel or tracked:
        return _posterior_by_op(ch, parallel)
    check_values_finite(ch)
    with torch.no_grad():
        log_z, fw = ops.scaled_log_z(ch)
        stats = ops.smoothed(ch, fw, None, True, sum_batch=False)
    marginals = stats.marginals.reshape(ch.batch_shape + ch.log_lik.shape[1:])
    pairwise = _restore_pairwise(stats.pairwise, ch)
    return HMMPosterior(log_z.reshape(ch.batch_shape), marginals, pairwise)
