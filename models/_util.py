"""Helpers shared by the model library's recovery checks."""
from __future__ import annotations

import itertools

import torch


def best_permutation(estimate: torch.Tensor, truth: torch.Tensor) -> list[int]:
    """The relabelling ``perm`` minimizing ``max |estimate[perm] - truth|`` over the leading (state) dim.

    estimate, truth: ``(K, ...)``. Exhaustive over K! permutations (K <= 7).
    """
    K = truth.shape[0]
    if K > 7:
        raise ValueError(f"best_permutation is exhaustive; K={K} is too large")
    best = min(itertools.permutations(range(K)),
               key=lambda p: float((estimate[list(p)] - truth).abs().max()))
    return list(best)
