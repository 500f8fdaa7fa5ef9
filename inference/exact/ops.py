r"""The collapsed-chain kernels as opaque torch operators: one graph node each, vmappable.

The HMM log normalizer's forward-backward recursions (``hmm_forward``, ``hmm_logspace``, ``hmm_scan``)
are Python loops over the steps with host reads (renormalization and underflow checks). Run by
``make_fx`` or ``torch.func.vmap`` they would be traced into (thousands of ops) or refused (a host read
of a batched tensor). Registered here with ``torch.library.custom_op``, each call is one node whose
implementation runs the eager kernels on real tensors:

* ``ppl::hmm_log_z(log_init (N, K), log_trans (Nt, S, K, K), log_lik (N, T, K), lengths (N,) | None,
  time_varying, parallel) -> log Z (N,)`` on the canonical inputs of ``hmm_inputs.ChainInputs``;
* ``ppl::hmm_log_z_jac(...) -> (log Z (N,), dinit (N, K), dtrans (N, S, K, K), dlik (N, T, K))``:
  log Z and its per-sequence Jacobian, the posterior statistics

  .. math:: \frac{\partial \log Z_n}{\partial \text{log\_lik}_n[t, k]} = p(z_t = k \mid x_n),\quad
            \frac{\partial \log Z_n}{\partial \text{log\_init}_n[k]} = p(z_0 = k \mid x_n),\quad
            \frac{\partial \log Z_n}{\partial \text{log\_trans}_t[i, j]} = p(z_{t-1} = i, z_t = j \mid x_n)

  (summed over steps when homogeneous, S = 1), by the scaled backward recursion (or, when ``parallel``,
  by the doubling scans of ``hmm_doubling`` where they fit and pass their underflow guard, else autograd
  through the tree product): what a gradient costs anyway, so the backward of ``log Z`` is
  the product ``g_n \cdot J_n`` (summed over n for a transition shared by the batch, Nt = 1);
* ``ppl::hmm_hvp(..., v_init, v_trans, v_lik) -> (N, K), (N, S, K, K), (N, T, K)``: the Hessian of
  :math:`\sum_n \log Z_n` applied to ``v`` (autograd twice through the log-space forward loop), the
  backward of the Jacobian outputs: second derivatives (differentiable posteriors, ``gradgradcheck``)
  are exact; a third derivative raises.

Each has a fake (shape) implementation for ``make_fx`` / ``torch.compile`` and a vmap rule that folds
the vmapped dim into the sequence dim N (the kernels are batched over N), so
``vmap(grad_and_value(U))`` over C chains of a model with a collapsed chain is one kernel call on
C x N sequences. The finiteness checks of the potentials run inside the implementations (on real
values, at every call, recorded or not): a NaN or +inf potential raises ValueError naming the input.

The Kalman log normalizer of the collapsed Gaussian chains (``kalman_info.info_log_normalizer64_eager``: parallel
scans, ~4000 recorded ops with their backward) is one op the same way:

* ``ppl::kalman_log_z64(m0, P0, A, Q, b | None, J, h, time_varying) -> log Z`` (the broadcast batch, float64),
  the fields of ``kalman_info.LDSPrior`` and the node potentials, checked inside (finite, positive definite);
* ``ppl::kalman_log_z64_vjp(..., grad) -> the seven input gradients`` (``b``'s is empty when b is None), by
  autograd through the same eager kernel: the forward is recomputed in the backward (first order only: a
  second derivative raises); the per-sequence log Z of ``kalman.info_log_normalizer64``;
* ``ppl::kalman_total64(..., lead) -> (sum of log Z, the seven gradients)``: value and gradient in one autograd
  pass, for the collapsed chain's factor (a sum over sequences: the incoming gradient is one scalar, so the
  gradient of the sum is all the backward needs; no recomputation).

Their vmap rules align every input's batch dims under the vmapped dim (size-1 dims inserted) and expand the
unmapped ones, so the gradients come out per mapped problem.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor
from torch._C import DispatchKey

from .hmm_doubling import doubling_fits, doubling_jacobian
from .hmm_forward import Smoothed, ScaledForward, forward_scaled, smooth_scaled
from .hmm_inputs import ChainInputs, check_values_finite
from .hmm_logspace import forward_log, smooth_log
from .hmm_scan import parallel_log_z
from .kalman_info import LDSPrior, info_log_normalizer64_eager

__all__ = ["hmm_log_z", "hmm_log_z_jac", "hmm_hvp", "log_normalizer", "log_normalizer_and_jacobian",
           "kalman_log_z64", "kalman_log_z64_vjp", "kalman_total64", "kalman_log_normalizer64",
           "kalman_total_log_normalizer64"]


def _inputs(log_init: Tensor, log_trans: Tensor, log_lik: Tensor, lengths: Optional[Tensor],
            time_varying: bool, batch: list[int]) -> ChainInputs:
    """Checked ``ChainInputs`` from the op's arguments (``batch``: the caller's batch shape, of N elements,
    for the error messages): ValueError on NaN / +inf potentials."""
    ch = ChainInputs(log_init, log_trans, log_lik, lengths, time_varying, torch.Size(batch))
    check_values_finite(ch)
    return ch


def smoothed(ch: ChainInputs, fw: ScaledForward | None, weights: Tensor | None, want_pairwise: bool,
             sum_batch: bool) -> Smoothed:
    """Marginals / pairwise counts (``Smoothed``): the scaled backward pass of ``fw``, or the log-space one
    when ``fw`` is None (the forward underflowed) or the backward pass under/overflows."""
    if fw is not None and not fw.underflow:
        out = smooth_scaled(fw, ch, weights, want_pairwise, sum_batch)
        if out is not None:
            return out
    return smooth_log(ch, forward_log(ch).log_alphas, weights, want_pairwise, sum_batch)


def scaled_log_z(ch: ChainInputs) -> tuple[Tensor, ScaledForward | None]:
    """(log Z (N,), the scaled forward pass, or None when it underflowed and log space ran instead)."""
    fw = forward_scaled(ch)
    if fw.underflow:
        return forward_log(ch).log_normalizer, None
    return fw.log_terms.sum(0), fw


def jacobian_by_recursion(ch: ChainInputs) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """log Z (N,) and its per-sequence Jacobian (dinit (N, K), dtrans (N, S, K, K), dlik (N, T, K)) by the
    scaled forward-backward recursions (log space on underflow)."""
    log_z, fw = scaled_log_z(ch)
    stats = smoothed(ch, fw, None, True, sum_batch=False)
    return log_z, stats.marginals[:, 0].clone(), stats.pairwise, stats.marginals


def _autograd_inside():
    """A context in which autograd records again inside an operator's implementation: the dispatcher runs
    implementations with the autograd keys excluded (``_AutoDispatchBelowAutograd``); the scan's Jacobian and
    the Hessian-vector product are autograd passes through eager kernels, so the exclusion is lifted for them
    (the TLS include / exclude sets are restored on exit)."""
    exclude = torch._C._dispatch_tls_local_exclude_set()
    for key in _AUTOGRAD_KEYS:
        exclude = exclude.remove(key)
    return torch._C._ForceDispatchKeyGuard(torch._C._dispatch_tls_local_include_set(), exclude)


_AUTOGRAD_KEYS = (DispatchKey.AutogradOther, DispatchKey.AutogradNestedTensor, DispatchKey.AutogradFunctionality,
                  DispatchKey.ADInplaceOrView)


def _per_sequence_trans(ch: ChainInputs) -> Tensor:
    """``log_trans`` expanded to one (S, K, K) block per sequence: (N, S, K, K)."""
    N = ch.log_lik.shape[0]
    return ch.log_trans.expand((N,) + ch.log_trans.shape[1:])


# ------------------------------------------------------------------------------------------ log Z
@torch.library.custom_op("ppl::hmm_log_z", mutates_args=())
def hmm_log_z(log_init: Tensor, log_trans: Tensor, log_lik: Tensor, lengths: Optional[Tensor],
              time_varying: bool, parallel: bool, batch: list[int]) -> Tensor:
    """log Z (N,) of canonical chains (module docstring); ``parallel`` picks the tree product."""
    ch = _inputs(log_init, log_trans, log_lik, lengths, time_varying, batch)
    with torch.no_grad():
        return parallel_log_z(ch) if parallel else scaled_log_z(ch)[0]


@hmm_log_z.register_fake
def _(log_init, log_trans, log_lik, lengths, time_varying, parallel, batch):
    return log_lik.new_empty(log_lik.shape[:1])


# ------------------------------------------------------------------------------ log Z and Jacobian
@torch.library.custom_op("ppl::hmm_log_z_jac", mutates_args=())
def hmm_log_z_jac(log_init: Tensor, log_trans: Tensor, log_lik: Tensor, lengths: Optional[Tensor],
                  time_varying: bool, parallel: bool, batch: list[int]
                  ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(log Z (N,), d/dlog_init (N, K), d/dlog_trans (N, S, K, K), d/dlog_lik (N, T, K)): module docstring."""
    ch = _inputs(log_init, log_trans, log_lik, lengths, time_varying, batch)
    if parallel:
        with torch.no_grad():
            out = doubling_jacobian(ch) if doubling_fits(*log_lik.shape) else None
        return out if out is not None else _jacobian_by_scan(ch)
    with torch.no_grad():
        return jacobian_by_recursion(ch)


@hmm_log_z_jac.register_fake
def _(log_init, log_trans, log_lik, lengths, time_varying, parallel, batch):
    N = log_lik.shape[0]
    return (log_lik.new_empty((N,)), log_init.new_empty(log_init.shape),
            log_trans.new_empty((N,) + log_trans.shape[1:]), log_lik.new_empty(log_lik.shape))


def _jacobian_by_scan(ch: ChainInputs) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """log Z and its per-sequence Jacobian by autograd through the tree product (``hmm_scan``): with one
    sequence a shared transition is its own per-sequence block (the GEMM first level stays available)."""
    N = ch.log_lik.shape[0]
    with _autograd_inside(), torch.enable_grad():
        init = ch.log_init.detach().requires_grad_()
        lik = ch.log_lik.detach().requires_grad_()
        trans = (ch.log_trans if N == 1 else _per_sequence_trans(ch)).detach().requires_grad_()
        log_z = parallel_log_z(ch._replace(log_init=init, log_trans=trans, log_lik=lik))
        d_init, d_trans, d_lik = torch.autograd.grad(log_z.sum(), (init, trans, lik))
    return log_z.detach(), d_init, d_trans.expand((N,) + d_trans.shape[1:]).clone(), d_lik


def _contract(grad: Tensor, d_init: Tensor, d_trans: Tensor, d_lik: Tensor, num_trans: int):
    """``g_n J_n`` for the three inputs; summed over sequences for a shared transition (Nt = 1)."""
    g_trans = grad[:, None, None, None] * d_trans
    if num_trans == 1:
        g_trans = g_trans.sum(0, keepdim=True)
    return grad[:, None] * d_init, g_trans, grad[:, None, None] * d_lik


class _LogZ(torch.autograd.Function):
    """log Z and its Jacobian by ``hmm_log_z_jac``, differentiable: the backward is ``g J`` plus, for
    cotangents of the Jacobian outputs, the Hessian-vector product ``hmm_hvp``. An ``autograd.Function``
    with ``setup_context`` and a generated vmap rule (the forward and backward are ops with vmap rules and
    plain tensor ops) rather than ``register_autograd`` on the op, whose generated Function is refused by
    ``torch.func.grad`` in this torch (pytorch issue 170834)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(log_init, log_trans, log_lik, lengths, time_varying, parallel, batch):
        return hmm_log_z_jac(log_init, log_trans, log_lik, lengths, time_varying, parallel, batch)

    @staticmethod
    def setup_context(ctx, inputs, output):
        init, trans, lik, lengths, time_varying, _, batch = inputs
        ctx.save_for_backward(init, trans, lik, lengths, *output[1:])
        ctx.time_varying, ctx.batch = time_varying, batch
        ctx.set_materialize_grads(False)

    @staticmethod
    def backward(ctx, g_z, g_init, g_trans, g_lik):
        """VJP of (log Z, Jacobian); cotangents of unused outputs are None (grads not materialized)."""
        init, trans, lik, lengths, d_init, d_trans, d_lik = ctx.saved_tensors
        Nt = trans.shape[0]
        out = None
        if g_z is not None:
            out = _contract(g_z, d_init, d_trans, d_lik, Nt)
        if g_init is not None or g_trans is not None or g_lik is not None:
            v = [torch.zeros_like(d) if g is None else g
                 for g, d in ((g_init, d_init), (g_trans, d_trans), (g_lik, d_lik))]
            h_init, h_trans, h_lik = hmm_hvp(init, trans, lik, lengths, ctx.time_varying, ctx.batch, *v)
            if Nt == 1:
                h_trans = h_trans.sum(0, keepdim=True)
            hv = (h_init, h_trans, h_lik)
            out = hv if out is None else tuple(a + b for a, b in zip(out, hv))
        if out is None:
            return None, None, None, None, None, None, None
        return (*out, None, None, None, None)


# ------------------------------------------------------------------------------ Hessian-vector product
@torch.library.custom_op("ppl::hmm_hvp", mutates_args=())
def hmm_hvp(log_init: Tensor, log_trans: Tensor, log_lik: Tensor, lengths: Optional[Tensor],
            time_varying: bool, batch: list[int], v_init: Tensor, v_trans: Tensor, v_lik: Tensor
            ) -> tuple[Tensor, Tensor, Tensor]:
    r"""``H v`` with H the Hessian of :math:`\sum_n \log Z_n` in (log_init (N, K), per-sequence log_trans
    (N, S, K, K), log_lik (N, T, K)) and ``v`` of those shapes: autograd twice through ``forward_log``."""
    ch = _inputs(log_init, log_trans, log_lik, lengths, time_varying, batch)
    with _autograd_inside(), torch.enable_grad():
        xs = [x.detach().requires_grad_() for x in (ch.log_init, _per_sequence_trans(ch), ch.log_lik)]
        log_z = forward_log(ch._replace(log_init=xs[0], log_trans=xs[1], log_lik=xs[2])).log_normalizer
        grads = torch.autograd.grad(log_z.sum(), xs, create_graph=True)
        inner = sum((g * v).sum() for g, v in zip(grads, (v_init, v_trans, v_lik)))
        hv = torch.autograd.grad(inner, xs, allow_unused=True)
    return tuple(torch.zeros_like(x) if h is None else h.detach() for x, h in zip(xs, hv))


@hmm_hvp.register_fake
def _(log_init, log_trans, log_lik, lengths, time_varying, batch, v_init, v_trans, v_lik):
    return v_init.new_empty(v_init.shape), v_trans.new_empty(v_trans.shape), v_lik.new_empty(v_lik.shape)


# ------------------------------------------------------------------------------------------ vmap
def _fold(x: Optional[Tensor], dim: Optional[int], B: int, N: int) -> Optional[Tensor]:
    """A per-sequence input ``(N, ...)`` (vmapped at ``dim`` or not) as ``(B N, ...)``."""
    if x is None:
        return None
    x = x.expand((B,) + x.shape) if dim is None else x.movedim(dim, 0)
    return x.reshape((B * N,) + x.shape[2:])


def _fold_trans(trans: Tensor, dim: Optional[int], B: int, N: int) -> Tensor:
    """The transition ``(Nt, S, K, K)``: kept shared (Nt = 1) when not vmapped, else ``(B N, S, K, K)``."""
    if dim is None and trans.shape[0] == 1:
        return trans
    if dim is None:
        return _fold(trans, None, B, N)
    trans = trans.movedim(dim, 0)
    return trans.expand((B, N) + trans.shape[2:]).reshape((B * N,) + trans.shape[2:])


def _folded(info, in_dims, log_init, log_trans, log_lik, lengths):
    """The op's chain inputs with the vmapped dim folded into N, and (B, N)."""
    B = info.batch_size
    N = log_lik.shape[0] if in_dims[2] is None else log_lik.movedim(in_dims[2], 0).shape[1]
    return (_fold(log_init, in_dims[0], B, N), _fold_trans(log_trans, in_dims[1], B, N),
            _fold(log_lik, in_dims[2], B, N), _fold(lengths, in_dims[3], B, N)), (B, N)


def _unfold(x: Tensor, B: int, N: int) -> Tensor:
    """``(B N, ...)`` -> ``(B, N, ...)``."""
    return x.reshape((B, N) + x.shape[1:])


@hmm_log_z.register_vmap
def _(info, in_dims, log_init, log_trans, log_lik, lengths, time_varying, parallel, batch):
    args, (B, N) = _folded(info, in_dims, log_init, log_trans, log_lik, lengths)
    return _unfold(hmm_log_z(*args, time_varying, parallel, [B, *batch]), B, N), 0


@hmm_log_z_jac.register_vmap
def _(info, in_dims, log_init, log_trans, log_lik, lengths, time_varying, parallel, batch):
    args, (B, N) = _folded(info, in_dims, log_init, log_trans, log_lik, lengths)
    out = hmm_log_z_jac(*args, time_varying, parallel, [B, *batch])
    return tuple(_unfold(x, B, N) for x in out), (0, 0, 0, 0)


@hmm_hvp.register_vmap
def _(info, in_dims, log_init, log_trans, log_lik, lengths, time_varying, batch, v_init, v_trans, v_lik):
    args, (B, N) = _folded(info, in_dims[:4], log_init, log_trans, log_lik, lengths)
    vs = [_fold(v, d, B, N) for v, d in zip((v_init, v_trans, v_lik), in_dims[6:])]
    return tuple(_unfold(x, B, N) for x in hmm_hvp(*args, time_varying, [B, *batch], *vs)), (0, 0, 0)


# ------------------------------------------------------------------------------------------ wrappers
def log_normalizer(ch: ChainInputs, parallel: bool) -> Tensor:
    """log Z (N,) of canonical chains through the ops: ``hmm_log_z_jac`` (differentiable, the gradient
    precomputed) when an input requires grad under grad mode, else ``hmm_log_z``."""
    args = (ch.log_init, ch.log_trans, ch.log_lik, ch.lengths, ch.time_varying, parallel, list(ch.batch_shape))
    if torch.is_grad_enabled() and any(x.requires_grad for x in args[:3]):
        return _LogZ.apply(*args)[0]
    return hmm_log_z(*args)


def log_normalizer_and_jacobian(ch: ChainInputs, parallel: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(log Z (N,), marginals of z_0 (N, K), pairwise counts (N, S, K, K), marginals (N, T, K)) through
    ``hmm_log_z_jac``: differentiable (second order through ``hmm_hvp``)."""
    return _LogZ.apply(ch.log_init, ch.log_trans, ch.log_lik, ch.lengths, ch.time_varying, parallel,
                       list(ch.batch_shape))


# ------------------------------------------------------------------------------------------ Kalman log Z
def _kalman_cores(time_varying: bool) -> tuple[int, ...]:
    """Trailing (non-batch) dims of (m0, P0, A, Q, b, J, h)."""
    lead = 3 if time_varying else 2
    return (1, 2, lead, lead, 2, 3, 2)


def _kalman_batch(xs, time_varying: bool) -> torch.Size:
    """The broadcast batch shape of the Kalman op's inputs (None entries skipped)."""
    return torch.broadcast_shapes(*(x.shape[:x.dim() - core] for x, core in zip(xs, _kalman_cores(time_varying))
                                    if x is not None))


@torch.library.custom_op("ppl::kalman_log_z64", mutates_args=())
def kalman_log_z64(m0: Tensor, P0: Tensor, A: Tensor, Q: Tensor, b: Optional[Tensor], J: Tensor, h: Tensor,
                   time_varying: bool) -> Tensor:
    """log Z (batch,) in float64 of the LDS prior (m0, P0, A, Q, b) times node potentials (J, h)."""
    with torch.no_grad():
        return info_log_normalizer64_eager(LDSPrior(m0, P0, A, Q, b, time_varying), J, h)


@kalman_log_z64.register_fake
def _(m0, P0, A, Q, b, J, h, time_varying):
    return h.new_empty(_kalman_batch((m0, P0, A, Q, b, J, h), time_varying), dtype=torch.float64)


@torch.library.custom_op("ppl::kalman_log_z64_vjp", mutates_args=())
def kalman_log_z64_vjp(m0: Tensor, P0: Tensor, A: Tensor, Q: Tensor, b: Optional[Tensor], J: Tensor, h: Tensor,
                       time_varying: bool, grad: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor,
                                                                  Tensor]:
    """Gradients of ``sum(grad * log Z)`` w.r.t. (m0, P0, A, Q, b, J, h), each of its input's shape (b's
    ``(0,)`` when b is None): autograd through the eager kernel (its forward recomputed)."""
    with _autograd_inside(), torch.enable_grad():
        xs = [None if x is None else x.detach().requires_grad_() for x in (m0, P0, A, Q, b, J, h)]
        log_z = info_log_normalizer64_eager(LDSPrior(*xs[:5], time_varying), xs[5], xs[6])
        wanted = [x for x in xs if x is not None]
        grads = iter(torch.autograd.grad(log_z, wanted, grad.to(log_z.dtype), allow_unused=True))
    return tuple(_per_input(xs, grads, h))


def _per_input(xs: list, grads, like: torch.Tensor) -> list:
    """One gradient per input of ``xs`` from ``grads`` (an iterator over the gradients of the inputs that are not
    None, None where unused): ``(0,)`` for an input that is None, zeros for an unused one, detached."""
    out = []
    for x in xs:
        g = None if x is None else next(grads)
        out.append(like.new_zeros((0,)) if x is None else torch.zeros_like(x) if g is None else g.detach())
    return out


@kalman_log_z64_vjp.register_fake
def _(m0, P0, A, Q, b, J, h, time_varying, grad):
    return tuple(h.new_empty((0,)) if x is None else x.new_empty(x.shape) for x in (m0, P0, A, Q, b, J, h))


class _KalmanLogZ(torch.autograd.Function):
    """``kalman_log_z64`` with its VJP op as the backward (``setup_context`` and a generated vmap rule, as
    ``_LogZ``)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(m0, P0, A, Q, b, J, h, time_varying):
        return kalman_log_z64(m0, P0, A, Q, b, J, h, time_varying)

    @staticmethod
    def setup_context(ctx, inputs, output):
        m0, P0, A, Q, b, J, h, time_varying = inputs
        ctx.has_b = b is not None
        ctx.save_for_backward(m0, P0, A, Q, b if b is not None else h.new_zeros((0,)), J, h)
        ctx.time_varying = time_varying

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        """First order only (``once_differentiable``: differentiating the gradient raises)."""
        m0, P0, A, Q, b, J, h = ctx.saved_tensors
        grads = kalman_log_z64_vjp(m0, P0, A, Q, b if ctx.has_b else None, J, h, ctx.time_varying, grad)
        return (*grads[:4], grads[4] if ctx.has_b else None, *grads[5:], None)


def _kalman_aligned(info, in_dims, xs, time_varying: bool):
    """Inputs ``(m0, P0, A, Q, b, J, h)`` with the vmapped dim first and their batch dims aligned under it
    (size-1 dims inserted; unmapped inputs expanded to the B problems); and each input's logical shape."""
    B, cores = info.batch_size, _kalman_cores(time_varying)
    logical = [None if x is None else (x.shape if d is None else x.movedim(d, 0).shape[1:])
               for x, d in zip(xs, in_dims)]
    R = max(len(s) - c for s, c in zip(logical, cores) if s is not None)
    out = []
    for x, d, shape, core in zip(xs, in_dims, logical, cores):
        if x is None:
            out.append(None)
            continue
        x = x.expand((B,) + x.shape) if d is None else x.movedim(d, 0)
        out.append(x.reshape((B,) + (1,) * (R - (len(shape) - core)) + tuple(shape)))
    return out, logical


@kalman_log_z64.register_vmap
def _(info, in_dims, m0, P0, A, Q, b, J, h, time_varying):
    xs, _ = _kalman_aligned(info, in_dims[:7], (m0, P0, A, Q, b, J, h), time_varying)
    return kalman_log_z64(*xs, time_varying), 0


@kalman_log_z64_vjp.register_vmap
def _(info, in_dims, m0, P0, A, Q, b, J, h, time_varying, grad):
    xs, logical = _kalman_aligned(info, in_dims[:7], (m0, P0, A, Q, b, J, h), time_varying)
    grad = grad.expand((info.batch_size,) + grad.shape) if in_dims[8] is None else grad.movedim(in_dims[8], 0)
    grads = kalman_log_z64_vjp(*xs, time_varying, grad)
    out = tuple(g if shape is None else g.reshape((info.batch_size,) + tuple(shape)) for g, shape in zip(grads, logical))
    return out, tuple(None if shape is None else 0 for shape in logical)


@torch.library.custom_op("ppl::kalman_total64", mutates_args=())
def kalman_total64(m0: Tensor, P0: Tensor, A: Tensor, Q: Tensor, b: Optional[Tensor], J: Tensor, h: Tensor,
                   time_varying: bool, lead: int) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor,
                                                            Tensor]:
    """(total, its gradients w.r.t. m0, P0, A, Q, b, J, h): log Z (float64) summed over all but the first
    ``lead`` batch dims (``lead`` = 0: a scalar; the vmap rule maps over a leading dim every input carries),
    with its gradient from the same autograd pass (no recomputation); b's gradient is ``(0,)`` when b is None."""
    with _autograd_inside(), torch.enable_grad():
        xs = [None if x is None else x.detach().requires_grad_() for x in (m0, P0, A, Q, b, J, h)]
        log_z = info_log_normalizer64_eager(LDSPrior(*xs[:5], time_varying), xs[5], xs[6])
        total = log_z.sum(tuple(range(lead, log_z.dim()))) if log_z.dim() > lead else log_z
        wanted = [x for x in xs if x is not None]
        grads = iter(torch.autograd.grad(total.sum(), wanted, allow_unused=True))
    return (total.detach(), *_per_input(xs, grads, h))


@kalman_total64.register_fake
def _(m0, P0, A, Q, b, J, h, time_varying, lead):
    batch = _kalman_batch((m0, P0, A, Q, b, J, h), time_varying)
    return (h.new_empty(batch[:lead], dtype=torch.float64),
            *(h.new_empty((0,)) if x is None else x.new_empty(x.shape) for x in (m0, P0, A, Q, b, J, h)))


@kalman_total64.register_vmap
def _(info, in_dims, m0, P0, A, Q, b, J, h, time_varying, lead):
    xs, logical = _kalman_aligned(info, in_dims[:7], (m0, P0, A, Q, b, J, h), time_varying)
    out = kalman_total64(*xs, time_varying, lead + 1)
    grads = tuple(g if shape is None else g.reshape((info.batch_size,) + tuple(shape))
                  for g, shape in zip(out[1:], logical))
    return (out[0], *grads), (0, *(None if shape is None else 0 for shape in logical))


class _KalmanTotal(torch.autograd.Function):
    """The summed log Z of ``kalman_total64`` with the gradients it computed alongside as its backward
    (``g * grad``); a second derivative raises (the gradients' own backward is not implemented)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(m0, P0, A, Q, b, J, h, time_varying):
        return kalman_total64(m0, P0, A, Q, b, J, h, time_varying, 0)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.has_b = inputs[4] is not None
        ctx.save_for_backward(*output[1:])
        ctx.set_materialize_grads(False)

    @staticmethod
    def backward(ctx, g_total, *g_grads):
        if any(g is not None for g in g_grads):
            raise NotImplementedError("second derivatives of the Kalman log normalizer are not implemented "
                                      "(kalman_info.info_log_normalizer64_eager differentiates to any order)")
        grads = ctx.saved_tensors
        if g_total is None:
            return (None,) * 8
        out = [g_total * g for g in grads]
        return (*out[:4], out[4] if ctx.has_b else None, *out[5:], None)


def kalman_total_log_normalizer64(prior: LDSPrior, J_node: Tensor, h_node: Tensor) -> Tensor:
    """``sum(log Z)`` over the batch, a float64 scalar, of a linear-Gaussian chain (the collapsed chain's factor):
    ``_KalmanTotal`` (value and gradient in one pass) when an input requires grad, else ``kalman_log_z64``."""
    if not isinstance(prior, LDSPrior):
        raise ValueError(f"prior must be an LDSPrior, got {type(prior).__name__}")
    args = (prior.initial_loc, prior.initial_cov, prior.dynamics, prior.noise_cov, prior.offsets, J_node, h_node,
            prior.time_varying)
    if torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in args[:7]):
        return _KalmanTotal.apply(*args)[0]
    return kalman_log_z64(*args).sum()


def kalman_log_normalizer64(prior: LDSPrior, J_node: Tensor, h_node: Tensor) -> Tensor:
    """log Z ``(...)`` in float64 of a linear-Gaussian chain (``kalman_info.info_log_normalizer64_eager``) through
    ``kalman_log_z64``: one op, differentiable (first order), vmappable."""
    if not isinstance(prior, LDSPrior):
        raise ValueError(f"prior must be an LDSPrior, got {type(prior).__name__}")
    return _KalmanLogZ.apply(prior.initial_loc, prior.initial_cov, prior.dynamics, prior.noise_cov, prior.offsets,
                             J_node, h_node, prior.time_varying)
