r"""Input checks for the whole library: each raises a ValueError that names the argument and says
the expected and the actual type, shape or value.

Used by the exponential families (``ppl.expfam``) and the exact kernels (``ppl.inference.exact``):
it lives in the language core so that ``ppl`` never imports ``ppl.inference``.

- tensors: :func:`check_floating`, :func:`as_tensor` (Python numbers too), :func:`check_finite`,
  :func:`check_tensor` (floating and finite);
- shapes: :func:`check_trailing`, :func:`check_batch`, :func:`check_same_shape`, :func:`broadcast_batch`,
  :func:`scalar_field`, :func:`check_weights`;
- values: :func:`check_greater`;
- matrices: :func:`check_symmetric`, :func:`check_positive_definite` (returns the Cholesky factor),
  :func:`check_psd`;
- sequences: :func:`check_lengths`, :func:`check_mask`.

Symmetry tolerance (one for the library, :data:`SYMMETRY_EPS`): a matrix ``x: (..., D, D)`` counts as
symmetric when :math:`|x - x^\top| \le 1000\,\epsilon \max|x|` entrywise, with :math:`\epsilon` the machine
epsilon of its dtype (1.2e-4 relative in float32, 2.2e-13 in float64). Matrices reach these checks after
arithmetic that is symmetric only up to rounding: a float32 inverse or solve of an SPD matrix with condition
number ~1e3 (D = 32) is measured at up to ~220 eps asymmetric, so the 100 eps the Kalman checks once used
rejected covariances a user had computed correctly. A genuine mistake (a non-symmetric matrix, a wrong
transpose) is asymmetric by O(1) relative to its largest entry, far above 1000 eps; and the kernels read
one triangle (Cholesky) or symmetrize, so accepted rounding asymmetry does not propagate.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

SYMMETRY_EPS = 1000
"""Relative symmetry tolerance in machine epsilons of the matrix's dtype (see the module docstring)."""

PSD_JITTER_EPS = 1000
"""``check_psd`` accepts ``x`` when ``x + PSD_JITTER_EPS * eps * scale * I`` is positive definite."""


# ----------------------------------------------------------------------------- tensors
def check_floating(name: str, x, like: Tensor | None = None, min_dim: int = 0,
                   like_name: str = "the other inputs") -> Tensor:
    """Require a floating-point tensor with at least ``min_dim`` dims (and, if ``like`` is given, its
    dtype and device); returns ``x``."""
    if not isinstance(x, Tensor) or not x.is_floating_point():
        kind = f"a tensor of dtype {x.dtype}" if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"{name} must be a floating-point torch.Tensor, got {kind}")
    if like is not None and (x.dtype != like.dtype or x.device != like.device):
        raise ValueError(f"{name} must have dtype {like.dtype} on {like.device} (like {like_name}), "
                         f"got {x.dtype} on {x.device}")
    if x.dim() < min_dim:
        raise ValueError(f"{name} must have at least {min_dim} dims, got shape {tuple(x.shape)}")
    return x


def as_tensor(name: str, x, like: Tensor | None = None) -> Tensor:
    """``check_floating(name, x, like)``, except that a Python number (not a bool) becomes a 0-dim tensor
    with ``like``'s dtype and device when ``like`` is given."""
    if isinstance(x, (int, float)) and not isinstance(x, bool) and like is not None:
        return torch.tensor(float(x), dtype=like.dtype, device=like.device)
    return check_floating(name, x, like)


def check_finite(name: str, x: Tensor, allow_neg_inf: bool = False) -> None:
    """Require no NaN and no +inf in ``x`` (and no -inf unless ``allow_neg_inf``: a log potential of
    -inf is a structural zero). One reduction on the success path (``amax`` propagates NaN)."""
    if x.numel() == 0:
        return
    ok = bool(x.amax() < math.inf) if allow_neg_inf else bool(torch.isfinite(x).all())
    if ok:
        return
    bad = int((~(x < math.inf) if allow_neg_inf else ~torch.isfinite(x)).sum())
    allowed, found = ("finite or -inf", "NaN or +inf") if allow_neg_inf else ("finite", "NaN or inf")
    raise ValueError(f"{name} must be {allowed}, got {found} in {bad} of {x.numel()} entries "
                     f"of a tensor of shape {tuple(x.shape)}")


def check_tensor(name: str, x, like: Tensor | None = None) -> Tensor:
    """Require a finite floating-point tensor (with ``like``'s dtype and device, if given); returns ``x``."""
    check_finite(name, check_floating(name, x, like))
    return x


# ----------------------------------------------------------------------------- shapes
def check_trailing(name: str, x: Tensor, expected: tuple, spelled: str) -> tuple:
    """Require ``x.shape`` to end with ``expected`` (``None`` entries match any size); ``spelled`` is the
    expected shape as the error shows it, e.g. ``"(*batch, 3, in)"``. Returns the leading (batch) shape."""
    tail = tuple(x.shape[x.dim() - len(expected):]) if x.dim() >= len(expected) else None
    if tail is None or not all(e is None or e == a for e, a in zip(expected, tail)):
        raise ValueError(f"{name} must have shape {spelled}, got {tuple(x.shape)}")
    return tuple(x.shape[:x.dim() - len(expected)])


def check_batch(name: str, x: Tensor, batch: tuple, num_event_dims: int, spelled: str) -> None:
    """Require the batch part of ``x.shape`` (all but the last ``num_event_dims``) to equal ``batch``."""
    got = tuple(x.shape[:x.dim() - num_event_dims])
    if got != tuple(batch):
        raise ValueError(f"{name} must have shape {spelled} with batch shape {tuple(batch)} "
                         f"(like the other fields), got {tuple(x.shape)}")


def check_same_shape(name_q: str, q: Tensor, name_p: str, p: Tensor) -> None:
    """Require ``p.shape == q.shape`` (e.g. the first fields of two natural parameters)."""
    if q.shape != p.shape:
        raise ValueError(f"{name_p} must have the shape of {name_q}, {tuple(q.shape)}, got {tuple(p.shape)}")


def broadcast_batch(**shapes: torch.Size) -> torch.Size:
    """The broadcast of named batch shapes, or a ValueError naming them all."""
    try:
        return torch.broadcast_shapes(*shapes.values())
    except RuntimeError:
        spelled = ", ".join(f"{k}: {tuple(v)}" for k, v in shapes.items())
        raise ValueError(f"batch dims do not broadcast: {spelled}") from None


def scalar_field(name: str, x, like: Tensor, batch: tuple) -> Tensor:
    """A per-batch scalar parameter ``(*batch)``: a Python number is expanded to ``batch``; a tensor must
    have shape ``batch`` (and ``like``'s dtype and device)."""
    if isinstance(x, (int, float)) and not isinstance(x, bool):
        return as_tensor(name, x, like).expand(batch)
    x = as_tensor(name, x, like)
    check_batch(name, x, batch, 0, "(*batch)")
    return x


def check_weights(weights, x: Tensor) -> Tensor:
    """Finite per-observation ``weights: (*batch, num)`` for ``x: (*batch, num, dim)``; returns them."""
    w = as_tensor("weights", weights, x)
    if w.shape != x.shape[:-1]:
        raise ValueError(f"weights must have shape (*batch, num) = {tuple(x.shape[:-1])}, got {tuple(w.shape)}")
    check_finite("weights", w)
    return w


# ----------------------------------------------------------------------------- values
def check_greater(name: str, x: Tensor, bound, what: str) -> None:
    """Require ``x > bound`` elementwise (``bound`` a number or a broadcastable tensor); ``what`` says the
    requirement in words, e.g. ``"positive"``; the error shows up to four offending entries."""
    bad = ~(x > bound)
    if bool(bad.any()):
        raise ValueError(f"{name} must be {what}, got {x[bad].flatten()[:4].tolist()} (shape {tuple(x.shape)})")


# ----------------------------------------------------------------------------- matrices
def check_symmetric(name: str, x: Tensor) -> None:
    """Require finite ``x: (..., D, D)`` symmetric up to ``SYMMETRY_EPS`` machine epsilons relative to
    each matrix's largest entry (module docstring)."""
    check_finite(name, x)
    detached = x.detach()
    scale = detached.abs().amax(dim=(-2, -1), keepdim=True).clamp_min(torch.finfo(x.dtype).tiny)
    tol = SYMMETRY_EPS * torch.finfo(x.dtype).eps
    if bool(((detached - detached.mT).abs() > tol * scale).any()):
        raise ValueError(f"{name} must be symmetric, got an asymmetric matrix of shape {tuple(x.shape)}")


def check_positive_definite(name: str, x: Tensor) -> Tensor:
    """Require symmetric positive definite ``x: (..., D, D)``; returns its lower Cholesky factor
    ``(..., D, D)`` (differentiable)."""
    check_symmetric(name, x)
    L, info = torch.linalg.cholesky_ex(x)
    if bool((info > 0).any()):
        raise ValueError(f"{name} must be positive definite, got a matrix of shape {tuple(x.shape)} "
                         "whose Cholesky factorization fails")
    return L


def check_psd(name: str, x: Tensor) -> None:
    """Require symmetric positive semidefinite ``x: (..., D, D)``: ``x + tol * scale * I`` must have a
    Cholesky factor (``scale`` = largest diagonal entry, at least 1; ``tol`` = ``PSD_JITTER_EPS`` eps)."""
    check_symmetric(name, x)
    if x.numel() == 0:
        return
    x = x.detach()
    scale = x.diagonal(dim1=-2, dim2=-1).abs().amax(-1).clamp_min(1.0)[..., None, None]
    eye = torch.eye(x.shape[-1], dtype=x.dtype, device=x.device)
    _, info = torch.linalg.cholesky_ex(x + PSD_JITTER_EPS * torch.finfo(x.dtype).eps * scale * eye)
    if bool((info > 0).any()):
        raise ValueError(f"{name} must be positive semidefinite, got a matrix of shape {tuple(x.shape)} "
                         "with a negative eigenvalue")


# ----------------------------------------------------------------------------- sequences
def check_lengths(lengths, num_steps: int, device: torch.device) -> Tensor | None:
    """Sequence ``lengths: (...)`` as int64 on ``device`` (None stays None); ValueError unless they have
    an integer dtype and lie in [1, ``num_steps``]."""
    if lengths is None:
        return None
    lengths = torch.as_tensor(lengths, device=device)
    if lengths.is_floating_point() or lengths.is_complex() or lengths.dtype == torch.bool:
        raise ValueError(f"lengths must have an integer dtype, got {lengths.dtype}")
    if lengths.numel() and bool(((lengths < 1) | (lengths > num_steps)).any()):
        raise ValueError(f"lengths must lie in [1, T={num_steps}], got min {int(lengths.min())} "
                         f"and max {int(lengths.max())}")
    return lengths.long()


def check_mask(mask, batch_time: torch.Size, device: torch.device) -> Tensor:
    """Require a bool ``mask: (..., time)`` (True = observed) broadcastable to ``batch_time``;
    returns it on ``device``."""
    if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
        raise ValueError(f"mask must be a bool tensor (True = observed), got "
                         f"{getattr(mask, 'dtype', type(mask).__name__)}")
    if mask.dim() < 1 or mask.shape[-1] != batch_time[-1]:
        raise ValueError(f"mask must have shape (..., time={batch_time[-1]}), got {tuple(mask.shape)}")
    broadcast_batch(mask=mask.shape, y_without_obs_dim=batch_time)
    return mask.to(device)
