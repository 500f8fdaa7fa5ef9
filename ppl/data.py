"""Small data utilities: padding a series for forecasting, masks for missing values."""
from __future__ import annotations

import torch


def missing_mask(y: torch.Tensor, event_dims: int = 0) -> torch.Tensor:
    """Boolean mask, True where ``y`` is observed: every entry of the trailing ``event_dims`` dims finite.

    y: ``(*batch, *event)``; returns ``(*batch)``.
    """
    finite = torch.isfinite(y)
    return finite.flatten(-event_dims).all(-1) if event_dims else finite


def extend(y: torch.Tensor, steps: int, time_dim: int = -1) -> tuple[torch.Tensor, torch.Tensor]:
    """Append ``steps`` missing (NaN) time steps to ``y`` for forecasting.

    Args:
        y: observations with a time dim at ``time_dim`` (e.g. ``(T,)``, or ``(T, N)`` with time_dim=-2).
        steps: how many future steps.
    Returns:
        ``(y_extended, mask)``: ``y`` with NaN steps appended, and a boolean mask over the dims up to
        and including time (``y_extended.shape[:time_dim+1]``), False on the new steps. Fit with
        ``ppl.infer(model, y_extended, model_kwargs={"mask": mask})`` and read the forecast from
        ``post.predictive(n)[site]`` at the new steps.
    """
    if not isinstance(y, torch.Tensor):
        raise TypeError(f"extend: y must be a torch.Tensor, got {type(y).__name__}")
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    if not y.is_floating_point():
        raise ValueError(f"y must be a floating-point tensor (missing steps are NaN), got dtype {y.dtype}")
    dim = time_dim % y.dim()
    pad_shape = list(y.shape)
    pad_shape[dim] = steps
    pad = torch.full(pad_shape, float("nan"), dtype=y.dtype, device=y.device)
    extended = torch.cat([y, pad], dim)
    mask_shape = extended.shape[:dim + 1]
    mask = torch.ones(mask_shape, dtype=torch.bool, device=y.device)
    mask[(slice(None),) * dim + (slice(y.shape[dim], None),)] = False
    return extended, mask
