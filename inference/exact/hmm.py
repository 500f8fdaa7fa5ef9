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

Kernels: scaled-probability recursions with matmuls (``hmm_kernels``), a log-space
fallback when a scale underflows, an O(log T)-depth tree product (``hmm_scan``), and
max-product / FFBS decoding (``hmm_decode``).
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from .hmm_checks import ChainInputs, canonicalize
from .hmm_decode import ViterbiResult, sample, viterbi
from .hmm_kernels import Smoothed, forward_scaled, smooth_scaled
from .hmm_logspace import forward_log, smooth_log
from .hmm_scan import parallel_log_normalizer

__all__ = ["HMMPosterior", "ViterbiResult", "log_normalizer", "posterior", "viterbi", "sample",
           "parallel_log_normalizer"]


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


def _smoothed(ch: ChainInputs, fw, weights, want_pairwise: bool, sum_batch: bool) -> Smoothed:
    """Marginals / pairwise counts: scaled backward pass, or the log-space one on underflow."""
    if fw is not None and not fw.underflow:
        out = smooth_scaled(fw, ch, weights, want_pairwise, sum_batch)
        if out is not None:
            return out
    return smooth_log(ch, forward_log(ch).log_alphas, weights, want_pairwise, sum_batch)


def _log_z(ch: ChainInputs):
    """(log Z (N,), the scaled forward pass or None when it underflowed)."""
    fw = forward_scaled(ch)
    if fw.underflow:
        return forward_log(ch).log_normalizer, None
    return fw.log_terms.sum(0), fw


class _LogNormalizer(torch.autograd.Function):
    """log Z with a backward pass that runs the backward recursion (gradient = posterior stats).

    Double backward (``create_graph=True``): the backward then differentiates the log-space
    forward loop by autograd instead (exact, slower), so Hessians are correct.
    """

    @staticmethod
    def forward(ctx, log_init, log_trans, log_lik, lengths, time_varying):
        ch = ChainInputs(log_init, log_trans, log_lik, lengths, time_varying, torch.Size())
        log_z, fw = _log_z(ch)
        ctx.save_for_backward(log_init, log_trans, log_lik)
        ctx.fw, ctx.lengths, ctx.time_varying = fw, lengths, time_varying
        return log_z

    @staticmethod
    def backward(ctx, grad):
        log_init, log_trans, log_lik = ctx.saved_tensors
        ch = ChainInputs(log_init, log_trans, log_lik, ctx.lengths, ctx.time_varying, torch.Size())
        if torch.is_grad_enabled():
            return _grads_by_autograd(ctx, ch, grad)
        need_init, need_trans, need_lik = ctx.needs_input_grad[:3]
        stats = _smoothed(ch, ctx.fw, grad, need_trans, sum_batch=log_trans.shape[0] == 1)
        g_init = stats.marginals[:, 0] if need_init else None
        g_lik = stats.marginals if need_lik else None
        return g_init, stats.pairwise, g_lik, None, None


def _grads_by_autograd(ctx, ch: ChainInputs, grad: Tensor):
    """Gradients with a graph (for higher derivatives): autograd through ``forward_log``."""
    inputs = [x for x, need in zip(ch[:3], ctx.needs_input_grad[:3]) if need]
    with torch.enable_grad():
        log_z = forward_log(ch).log_normalizer
        grads = iter(torch.autograd.grad(log_z, inputs, grad, create_graph=True, allow_unused=True))
    out = [next(grads) if need else None for need in ctx.needs_input_grad[:3]]
    out = [torch.zeros_like(x) if need and g is None else g
           for x, g, need in zip(ch[:3], out, ctx.needs_input_grad[:3])]
    return (*out, None, None)


def log_normalizer(log_init: Tensor, log_trans: Tensor, log_lik: Tensor, lengths=None,
                   time_varying: bool | None = None) -> Tensor:
    r"""log Z of a batch of discrete chains (forward algorithm), differentiable.

    log_init:  (..., states)                        log p(z_0), unnormalized allowed
    log_trans: (..., states, states) homogeneous or (..., time-1, states, states) time-varying
               (rule in the module docstring; ``time_varying`` forces it)
    log_lik:   (..., time, states)                  log emission potentials
    lengths:   (...) int in [1, time], or None      steps t >= length are ignored
    Returns:   (...) log Z.

    Forward: one batched matmul and one renormalization per step on max-shifted
    exponentiated potentials (log-space fallback on underflow). Backward (custom
    ``autograd.Function``): :math:`\partial \log Z / \partial \text{log\_lik}[t, k] = p(z_t = k)`,
    :math:`\partial / \partial \text{log\_init} = p(z_0)`, :math:`\partial / \partial
    \text{log\_trans}` = expected transition counts (summed over steps when homogeneous),
    computed by the scaled backward recursion. ``create_graph=True`` is supported by
    differentiating a log-space forward loop instead (slower, exact).
    """
    ch = canonicalize(log_init, log_trans, log_lik, lengths, time_varying)
    log_z = _LogNormalizer.apply(ch.log_init, ch.log_trans, ch.log_lik, ch.lengths, ch.time_varying)
    return log_z.reshape(ch.batch_shape)


def _restore_pairwise(pairwise: Tensor, ch: ChainInputs) -> Tensor:
    """Pairwise counts (Nt or N, S, K, K) -> (..., K, K) or (..., T-1, K, K) per sequence."""
    N = ch.log_lik.shape[0]
    pairwise = pairwise.expand((N,) + pairwise.shape[1:])
    if not ch.time_varying:
        pairwise = pairwise[:, 0]
    return pairwise.reshape(ch.batch_shape + pairwise.shape[1:])


def _posterior_by_autograd(ch: ChainInputs) -> HMMPosterior:
    """Differentiable marginals: gradients of log Z with a graph (used when inputs require grad)."""
    N = ch.log_lik.shape[0]
    trans = ch.log_trans.expand((N,) + ch.log_trans.shape[1:])
    init, lik = ch.log_init, ch.log_lik
    if not init.requires_grad:
        init = init.detach().requires_grad_()
    if not trans.requires_grad:
        trans = trans.detach().requires_grad_()
    if not lik.requires_grad:
        lik = lik.detach().requires_grad_()
    log_z = _LogNormalizer.apply(init, trans, lik, ch.lengths, ch.time_varying)
    _, pairwise, marginals = torch.autograd.grad(log_z.sum(), (init, trans, lik), create_graph=True)
    marginals = marginals.reshape(ch.batch_shape + lik.shape[1:])
    return HMMPosterior(log_z.reshape(ch.batch_shape), marginals,
                        _restore_pairwise(pairwise, ch))


def posterior(log_init: Tensor, log_trans: Tensor, log_lik: Tensor, lengths=None,
              time_varying: bool | None = None) -> HMMPosterior:
    r"""Forward-backward: log Z, marginals p(z_t | x) and expected transition counts.

    Inputs as in ``log_normalizer``. Returns ``HMMPosterior``: log_normalizer (...),
    marginals (..., time, states), pairwise (..., states, states) summed over steps when
    homogeneous or (..., time-1, states, states) per step when time-varying, with
    :math:`\xi_t(i, j) = p(z_{t-1} = i, z_t = j \mid x)`.

    When any input requires grad (and grad mode is on), the outputs are differentiable:
    the marginals are then computed as gradients of log Z with ``create_graph=True``
    (autograd through the log-space loop; slower). Otherwise the fast scaled recursions run.
    """
    ch = canonicalize(log_init, log_trans, log_lik, lengths, time_varying)
    if torch.is_grad_enabled() and any(x.requires_grad for x in ch[:3]):
        return _posterior_by_autograd(ch)
    with torch.no_grad():
        log_z, fw = _log_z(ch)
        stats = _smoothed(ch, fw, None, True, sum_batch=False)
    marginals = stats.marginals.reshape(ch.batch_shape + ch.log_lik.shape[1:])
    pairwise = _restore_pairwise(stats.pairwise, ch)
    return HMMPosterior(log_z.reshape(ch.batch_shape), marginals, pairwise)
