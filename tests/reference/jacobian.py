"""Autograd oracle for the log-determinant of a bijection's Jacobian on matrix-valued points."""
from __future__ import annotations

import torch
from torch import Tensor


def log_abs_det_jacobian_by_autograd(transform, u0: Tensor, free: list[tuple[int, int]]) -> Tensor:
    """log|det J| at ``u0: (rows, cols)`` of the map from the free coordinates ``u0[i, j]``, (i, j) in
    ``free``, to the same entries of ``transform(u)`` (the other entries of ``u0`` held fixed), with J
    ``(len(free), len(free))`` computed by ``torch.autograd.functional.jacobian``; returns ``()``."""
    def entries(values: Tensor) -> Tensor:
        u = u0.clone()
        for v, (i, j) in zip(values, free):
            u[i, j] = v
        y = transform(u)
        return torch.stack([y[i, j] for i, j in free])
    jac = torch.autograd.functional.jacobian(entries, torch.stack([u0[i, j] for i, j in free]))
    return torch.linalg.slogdet(jac)[1]
