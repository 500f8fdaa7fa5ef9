"""Input checks and the canonical flat-batch form shared by the HMM kernels.

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


class ChainInputs(NamedTuple):
    """Potentials of a batch of chains in canonical (flat batch) form; see the module docstring."""

    log_init: Tensor
    log_trans: Tensor
    log_lik: Tensor
    lengths: Tensor | None
    time_varying: bool
    batch_shape: torch.Size


def _check_float(name: str, x, min_dim: int) -> None:
    """ValueError unless ``x`` is a floating tensor with at least ``min_dim`` dims."""
    if not isinstance(x, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise ValueError(f"{name} must have a floating dtype, got {x.dtype}")
    if x.dim() < min_dim:
        raise ValueError(f"{name} must have at least {min_dim} dims, got shape {tuple(x.shape)}")


def _check_finite_above(name: str, x: Tensor) -> None:
    """Reject NaN and +inf (``-inf`` is a legal log potential: a structural zero).

    One reduction: ``amax`` propagates NaN, so ``amax < inf`` fails for NaN and +inf alike.
    """
    if x.numel() == 0 or bool(x.amax() < math.inf):
        return
    bad = int((~(x < math.inf)).sum())
    raise ValueError(f"{name} contains NaN or +inf ({bad} entries); "
                     "log potentials must be finite or -inf")


def is_time_varying(log_trans: Tensor, num_steps: int, time_varying: bool | None) -> bool:
    """The time-varying rule: inferred when ``time_varying`` is None, else checked."""
    fits = log_trans.dim() >= 3 and log_trans.shape[-3] == num_steps - 1
    if time_varying is None:
        return fits
    if time_varying and not fits:
        raise ValueError(f"log_trans: time_varying=True needs shape (..., T-1={num_steps - 1}, "
                         f"K, K), got {tuple(log_trans.shape)}")
    return bool(time_varying)


def _check_lengths(lengths, num_steps: int, device: torch.device) -> Tensor | None:
    """``lengths`` as int64 on ``device`` (or None); ValueError unless integer and in [1, T]."""
    if lengths is None:
        return None
    lengths = torch.as_tensor(lengths, device=device)
    if lengths.is_floating_point() or lengths.is_complex() or lengths.dtype == torch.bool:
        raise ValueError(f"lengths must have an integer dtype, got {lengths.dtype}")
    if lengths.numel() and bool(((lengths < 1) | (lengths > num_steps)).any()):
        raise ValueError(f"lengths must lie in [1, T={num_steps}], got min {int(lengths.min())} "
                         f"and max {int(lengths.max())}")
    return lengths.long()


def _check_trans_shape(log_trans: Tensor, num_states: int, time_varying: bool) -> None:
    """ValueError unless ``log_trans`` ends in (K, K) (and has a step dim when time-varying)."""
    if log_trans.shape[-2:] != (num_states, num_states):
        raise ValueError(f"log_trans must end in (K, K) = ({num_states}, {num_states}) with K from "
                         f"log_lik, got shape {tuple(log_trans.shape)}")
    if time_varying and log_trans.dim() < 3:
        raise ValueError("log_trans: time-varying needs shape (..., T-1, K, K), "
                         f"got {tuple(log_trans.shape)}")


def _batch_shape(shapes: dict[str, torch.Size]) -> torch.Size:
    """The broadcast of the batch shapes; ValueError naming all of them if they do not broadcast."""
    try:
        return torch.broadcast_shapes(*shapes.values())
    except RuntimeError:
        described = ", ".join(f"{k} {tuple(v)}" for k, v in shapes.items())
        raise ValueError(f"batch dims do not broadcast: {described}") from None


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
    _check_float("log_init", log_init, 1)
    _check_float("log_trans", log_trans, 2)
    _check_float("log_lik", log_lik, 2)
    for name, x in (("log_init", log_init), ("log_trans", log_trans)):
        if x.dtype != log_lik.dtype or x.device != log_lik.device:
            raise ValueError(f"{name} has dtype {x.dtype} on {x.device}, but log_lik has "
                             f"{log_lik.dtype} on {log_lik.device}; they must match")
    if log_lik.shape[-2] < 1 or log_lik.shape[-1] < 1:
        raise ValueError(f"log_lik must have at least one time step and one state, "
                         f"got shape {tuple(log_lik.shape)}")
    if log_init.shape[-1] != log_lik.shape[-1]:
        raise ValueError(f"log_init must end in K={log_lik.shape[-1]} (from log_lik), "
                         f"got shape {tuple(log_init.shape)}")


def canonicalize(log_init: Tensor, log_trans: Tensor, log_lik: Tensor, lengths=None,
                 time_varying: bool | None = None) -> ChainInputs:
    """Check the potentials and bring them to the canonical form of ``ChainInputs``.

    Raises ValueError naming the argument on wrong types, shapes, K mismatch, batch dims
    that do not broadcast, lengths outside [1, T], or NaN / +inf potentials (log_lik is
    only checked at steps t < length; it is set to 0 beyond). The reshapes are differentiable.
    """
    _check_common(log_init, log_trans, log_lik)
    T, K = log_lik.shape[-2:]
    tv = is_time_varying(log_trans, T, time_varying)
    _check_trans_shape(log_trans, K, tv)
    lengths = _check_lengths(lengths, T, log_lik.device)
    shapes = {"log_init": log_init.shape[:-1], "log_trans": log_trans.shape[:-3 if tv else -2],
              "log_lik": log_lik.shape[:-2]}
    if lengths is not None:
        shapes["lengths"] = lengths.shape
    batch = _batch_shape(shapes)
    N = math.prod(batch)
    init = log_init.expand(batch + (K,)).reshape(N, K)
    lik = log_lik.expand(batch + (T, K)).reshape(N, T, K)
    trans = _canonical_trans(log_trans, batch, tv)
    if lengths is not None:  # steps t >= length are ignored: zero them before the check
        lengths = lengths.expand(batch).reshape(N)
        zero = torch.zeros((), dtype=lik.dtype, device=lik.device)
        lik = torch.where(valid_steps(lengths, T, N, lik.device)[..., None], lik, zero)
    _check_finite_above("log_init", log_init)
    _check_finite_above("log_trans", log_trans)
    _check_finite_above("log_lik", lik)
    return ChainInputs(init, trans, lik, lengths, tv, batch)
