"""Minibatches of a model's data plate, shared by the adversarial, discrete-VI and energy backends.

A model written on a whole data set (``with ppl.plate("data", x.shape[0])``) runs on a minibatch when
its data arguments are sliced: every tensor argument whose leading dim is the plate's size ``N`` is
indexed by the same rows, so the plate's size becomes the batch size. The log-densities of such a run
are those of the minibatch; a backend scales them by ``N / B`` where it needs the whole data set's.
"""
from __future__ import annotations

import torch


def data_plate(graph, site: str) -> tuple[str, int]:
    """(name, size) of the outermost plate of ``site``; ValueError naming the site if it is in none."""
    plates = graph.site(site).plates
    if not plates:
        raise ValueError(f"site '{site}' must sit in a data plate (with ppl.plate('data', N): ...) to be "
                         "fitted on minibatches")
    return plates[0]


def slice_rows(value, size: int, rows: torch.Tensor):
    """``value[rows]`` for a tensor whose leading dim is ``size``; anything else unchanged."""
    if isinstance(value, torch.Tensor) and value.dim() >= 1 and value.shape[0] == size:
        return value[rows.to(value.device)]
    return value


def minibatch(args: tuple, kwargs: dict, size: int, rows: torch.Tensor) -> tuple[tuple, dict]:
    """The model's arguments restricted to ``rows`` of its data plate of ``size`` entries."""
    return (tuple(slice_rows(a, size, rows) for a in args),
            {k: slice_rows(v, size, rows) for k, v in kwargs.items()})


def batch_rows(size: int, batch_size: int | None, generator: torch.Generator) -> torch.Tensor:
    """``batch_size`` distinct row indices in ``[0, size)`` (all rows, in order, when ``batch_size`` is None or
    at least ``size``): ``(B,)`` long, on the CPU."""
    if batch_size is None or batch_size >= size:
        return torch.arange(size)
    return torch.randperm(size, generator=generator)[:batch_size]


def check_batch_size(batch_size, backend: str) -> None:
    """ValueError naming the option unless ``batch_size`` is None or an integer >= 1."""
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1):
        raise ValueError(f"backend '{backend}': batch_size must be None or an integer >= 1, got {batch_size!r}")
