"""Helpers shared by the model library's recovery checks."""
from __future__ import annotations

import itertools

import torch
from torch import nn

from ppl.primitives import ModelInputError


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


def check_positive_ints(**values) -> None:
    """``ModelInputError`` naming the first argument that is not an integer >= 1 (bools rejected)."""
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ModelInputError(f"{name} must be an integer >= 1, got {value!r}")


def check_decoder(decoder, D: int, output: str) -> None:
    """``ModelInputError`` unless ``decoder`` is an ``nn.Module`` (mapping ``(..., D)`` to ``output``)."""
    if not isinstance(decoder, nn.Module):
        raise ModelInputError(f"decoder must be a torch.nn.Module mapping (..., D={D}) to {output}, "
                              f"got {type(decoder).__name__}")
