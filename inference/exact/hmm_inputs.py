"""The canonical flat-batch form of the HMM kernels' inputs, and the checks that bring them there.

The public functions of ``hmm.py`` accept potentials with arbitrary leading batch dims;
``canonicalize`` checks them and flattens the broadcast batch to one dim ``N`` so the
kernels only ever see these shapes:

    log_init:  (N, K)            log p(z_0 = k), up to a constant
    log_trans: (Nt, S, K, K)     Nt in {1, N} (1: one matrix shared by the whole batch),
                                 S = T - 1 for time-varying chains, S = 1 for homogeneous ones
    log_lik:   (N, T, K)         log emission potentials, set to 0 at steps t >= length
    lengths:   (N,) int64 or None

Time-varying rule (explicit, documented in ``hmm.py``): ``time_varying=None`` infers a
time-varying ``log_trans`` iff ``log_trans.dim() >= 3`` and ``log_trans.shape[-3] == T - 1``;
``True`` / ``False`` force the reading (``True`` then requires that shape).
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from ppl.checks import broadcast_batch, check_finite, check_floating, check_lengths


class ChainInputs(NamedTuple):
    """Potentials of a batch of chains in canonical (flat batch) form; see the module docstring."""

    log_init: Tensor
    log_trans: Tensor
    log_lik: Tensor
    lengths: Tensor | None
    time_varying: bool
    batch_shape: torch.Size


def is_time_varying(log_trans: Tensor, num_steps: int, time_varying: bool | None) -> bool:
    """The time-varying rule for ``log_trans: (..., K, K)`` or ``(..., T-1, K, K)`` with
    ``num_steps`` = T: inferred when ``time_varying`` is None, else checked (module docstring)."""
    fits = log_trans.dim() >= 3 and log_trans.shape[-3] == num_steps - 1
    if time_varying is None:
        return fits
    if time_varying and not fits:
        raise ValueError(f"log_trans: time_varying=True needs shape (..., T-1={num_steps - 1}, "
                         f"K, K), got {tuple(log_trans.shape)}")
    return bool(time_varying)


def _check_trans_shape(log_trans: Tensor, num_states: int, time_varying: bool) -> None:
    """ValueError unless ``log_trans`` ends in (K, K) (and has a step dim when time-varying)."""
    if log_trans.shape[-2:] != (num_states, num_states):
        raise ValueError(f"log_trans must end in (K, K) = ({num_states}, {num_states}) with K from "
                         f"log_lik, got shape {tuple(log_trans.shape)}")
    if time_varying and log_trans.dim() < 3:
        raise ValueError("log_trans: time-varying needs shape (..., T-1, K, K), "
                         f"got {tuple(log_trans.shape)}")


def _shared_trans(log_trans: Tensor, batch_ndim: int) -> bool:
    """True when every batch dim of ``log_trans`` has size 1 or stride 0 (one matrix for all)."""
    dims = range(batch_ndim)
    return all(log_trans.shape[d] == 1 or log_trans.stride(d) == 0 for d in dims)


def _canonical_trans(log_trans: Tensor, batch: torch.Size, time_varying: bool) -> Tensor:
    """``log_trans`` as (Nt, S, K, K): Nt = 1 when shared by the batch, else N (see module doc)."""
    tail = 3 if time_varying else 2
    batch_ndim = log_trans.dim() - tail
    if _shared_trans(log_trans, batch_ndim):
        core = log_trans[(0,) * batch_ndim] if batch_ndim else log_trans
        core = core.unsqueeze(0)
    else:
        core_shape = log_trans.shape[-tail:]
        core = log_trans.expand(batch + core_shape).reshape((math.prod(batch),) + core_shape)
    return core if time_varying else core.unsqueeze(1)


def valid_steps(lengths: Tensor | None, num_steps: int, batch: int, device) -> Tensor:
    """``(N, T)`` bool mask of steps ``t < length`` (all True without lengths)."""
    steps = torch.arange(num_steps, device=device)
    if lengths is None:
        return torch.ones(batch, num_steps, dtype=torch.bool, device=device)
    return steps[None, :] < lengths[:, None]


def _check_common(log_init: Tensor, log_trans: Tensor, log_lik: Tensor) -> None:
    """Types, dims, dtype/device agreement and K agreement of the three potentials."""
    check_floating("log_lik", log_lik, min_dim=2)
    check_floating("log_init", log_init, log_lik, min_dim=1, like_name="log_lik")
    check_floating("log_trans", log_trans, log_lik, min_dim=2, like_name="log_lik")
    if log_lik.shape[-2] < 1 or log_lik.shape[-1] < 1:
        raise ValueError(f"log_lik must have at least one time step and one state, "
                         f"got shape {tuple(log_lik.shape)}")
    if log_init.shape[-1] != log_lik.shape[-1]:
        raise ValueError(f"log_init must end in K={log_lik.shape[-1]} (from log_lik), "
                         f"got shape {tuple(log_init.shape)}")


def canonicalize(log_init: Tensor, log_trans: Tensor, log_lik: Tensor, lengths=None,
                 time_varying: bool | None = None, check_values: bool = True) -> ChainInputs:
    """Check the potentials and bring them to the canonical form of ``ChainInputs``.

    log_init: (..., K); log_trans: (..., K, K) or (..., T-1, K, K); log_lik: (..., T, K);
    lengths: (...) integers in [1, T] or None; the batch dims broadcast. Returns ``ChainInputs``
    with the flat shapes of the module docstring and ``batch_shape`` the broadcast batch.
    Raises ValueError naming the argument on wrong types, shapes, K mismatch, batch dims
    that do not broadcast, lengths outside [1, T], or NaN / +inf potentials (log_lik is
    only checked at steps t < length; it is set to 0 beyond). The reshapes are differentiable.
    check_values=False leaves the NaN / +inf check (host reads of the values) to the caller:
    the kernel operators of ``ops`` run it inside their implementations, where ``vmap`` and
    ``make_fx`` see one opaque call (``check_values`` below).
    """
    _check_common(log_init, log_trans, log_lik)
    T, K = log_lik.shape[-2:]
    tv = is_time_varying(log_trans, T, time_varying)
    _check_trans_shape(log_trans, K, tv)
    lengths = check_lengths(lengths, T, log_lik.device)
    shapes = {"log_init": log_init.shape[:-1], "log_trans": log_trans.shape[:-3 if tv else -2],
              "log_lik": log_lik.shape[:-2]}
    if lengths is not None:
        shapes["lengths"] = lengths.shape
    batch = broadcast_batch(**shapes)
    N = math.prod(batch)
    init = log_init.expand(batch + (K,)).reshape(N, K)
    lik = log_lik.expand(batch + (T, K)).reshape(N, T, K)
    trans = _canonical_trans(log_trans, batch, tv)
    if lengths is not None:  # steps t >= length are ignored: zero them before the check
        lengths = lengths.expand(batch).reshape(N)
        zero = torch.zeros((), dtype=lik.dtype, device=lik.device)
        lik = torch.where(valid_steps(lengths, T, N, lik.device)[..., None], lik, zero)
    ch = ChainInputs(init, trans, lik, lengths, tv, batch)
    if check_values:
        check_values_finite(ch)
    return ch


def check_values_finite(ch: ChainInputs) -> None:
    """ValueError naming the potential (with the caller's batch shape) unless every entry is finite or -inf
    (log_lik at steps t < length only: it is 0 beyond in canonical form)."""
    check_finite("log_init", ch.log_init.reshape(ch.batch_shape + ch.log_init.shape[-1:]), allow_neg_inf=True)
    check_finite("log_trans", ch.log_trans, allow_neg_inf=True)
    check_finite("log_lik", ch.log_lik.reshape(ch.batch_shape + ch.log_lik.shape[-2:]), allow_neg_inf=True)
