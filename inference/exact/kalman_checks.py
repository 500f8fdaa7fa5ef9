"""Input validation for the Kalman kernels: every error is a ValueError naming the argument,
the expected and the actual shape or value."""
from __future__ import annotations

import torch


def check_tensor(name: str, x, like: torch.Tensor | None = None) -> torch.Tensor:
    """Require a floating tensor with finite entries (and the dtype and device of ``like``, if given)."""
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise ValueError(f"{name} must be a floating-point torch.Tensor, got {type(x).__name__}"
                         + (f" of dtype {x.dtype}" if isinstance(x, torch.Tensor) else ""))
    if like is not None and x.dtype != like.dtype:
        raise ValueError(f"{name} must have dtype {like.dtype} (like the other inputs), got {x.dtype}")
    if like is not None and x.device != like.device:
        raise ValueError(f"{name} must be on device {like.device} (like the other inputs), got {x.device}")
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} must be finite, got NaN or inf in a tensor of shape {tuple(x.shape)}")
    return x


def check_trailing(name: str, x: torch.Tensor, expected: tuple, spelled: str) -> None:
    """Require ``x.shape`` to end with ``expected`` (``None`` entries match any size)."""
    tail = tuple(x.shape[x.dim() - len(expected):]) if x.dim() >= len(expected) else None
    ok = tail is not None and all(e is None or e == a for e, a in zip(expected, tail))
    if not ok:
        raise ValueError(f"{name} must have shape {spelled}, got {tuple(x.shape)}")


def check_symmetric(name: str, x: torch.Tensor) -> None:
    """Require ``x`` symmetric on its last two dims, up to a dtype-relative tolerance."""
    scale = x.abs().amax(dim=(-2, -1), keepdim=True).clamp_min(torch.finfo(x.dtype).tiny)
    tol = 100 * torch.finfo(x.dtype).eps
    if not bool(((x - x.mT).abs() <= tol * scale).all()):
        raise ValueError(f"{name} must be symmetric, got an asymmetric matrix of shape {tuple(x.shape)}")


def check_positive_definite(name: str, x: torch.Tensor) -> torch.Tensor:
    """Require symmetric positive definite ``(..., D, D)``; returns its lower Cholesky factor."""
    check_symmetric(name, x)
    L, info = torch.linalg.cholesky_ex(x)
    if bool((info > 0).any()):
        raise ValueError(f"{name} must be positive definite, got a matrix of shape {tuple(x.shape)} "
                         "whose Cholesky factorization fails")
    return L


def check_psd(name: str, x: torch.Tensor) -> None:
    """Require symmetric positive semidefinite ``(..., D, D)``: ``x + tol * scale * I`` must have a
    Cholesky factor (``scale`` = largest diagonal entry, at least 1; ``tol`` = 1000 machine eps)."""
    check_symmetric(name, x)
    if x.numel() == 0:
        return
    x = x.detach()
    scale = x.diagonal(dim1=-2, dim2=-1).abs().amax(-1).clamp_min(1.0)[..., None, None]
    eye = torch.eye(x.shape[-1], dtype=x.dtype, device=x.device)
    _, info = torch.linalg.cholesky_ex(x + 1000 * torch.finfo(x.dtype).eps * scale * eye)
    if bool((info > 0).any()):
        raise ValueError(f"{name} must be positive semidefinite, got a matrix of shape {tuple(x.shape)} "
                         "with a negative eigenvalue")


def broadcast_batch(**shapes: torch.Size) -> torch.Size:
    """Broadcast named batch shapes, or raise a ValueError naming them all."""
    try:
        return torch.broadcast_shapes(*shapes.values())
    except RuntimeError:
        spelled = ", ".join(f"{k}: {tuple(v)}" for k, v in shapes.items())
        raise ValueError(f"batch dims do not broadcast: {spelled}") from None


def check_mask(mask, batch_time: torch.Size, device: torch.device) -> torch.Tensor:
    """Require a bool ``mask`` of shape ``(..., time)`` broadcastable to ``batch_time``."""
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
        raise ValueError(f"mask must be a bool tensor (True = observed), got "
                         f"{getattr(mask, 'dtype', type(mask).__name__)}")
    if mask.dim() < 1 or mask.shape[-1] != batch_time[-1]:
        raise ValueError(f"mask must have shape (..., time={batch_time[-1]}), got {tuple(mask.shape)}")
    broadcast_batch(mask=mask.shape, y_without_obs_dim=batch_time)
    return mask.to(device)
