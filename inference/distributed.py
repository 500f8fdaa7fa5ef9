r"""Data-parallel training over ``torch.distributed``, shared by the amortized, svae and svi backends.

When a process group is initialized (e.g. a script started by ``torchrun`` that calls
``torch.distributed.init_process_group("gloo" | "nccl")``), every one of the W processes runs the same fit with
the same seed: each draws the same minibatch of B rows (same random number stream), takes its own B / W rows
(``shard``), and evaluates its objective with the data plate's terms scaled by :math:`N / (B/W)`. Averaging the
gradients over the processes (``average_gradients``) then gives

.. math::
    \frac1W \sum_{r=1}^W \nabla\Big[g(\theta) + \frac{N}{B/W}\sum_{n \in B_r} f_n(\theta)\Big]
    = \nabla\Big[g(\theta) + \frac{N}{B}\sum_{n \in B} f_n(\theta)\Big],

the gradient of one process on the whole batch (terms outside the plate, g, counted once), so every process
takes the same optimizer step and the parameters stay equal. Statistics that are sums over the batch (the SVAE's
expected sufficient statistics) are averaged the same way (``average``). Without a process group W = 1, rank 0,
and every function here is the identity.

Only rank 0 draws a progress bar and writes checkpoint files (``main_only``); every rank resumes from the same
file. With the nccl backend each process works on its own GPU (``device``: ``cuda:LOCAL_RANK``).
"""
from __future__ import annotations

import os

import torch
import torch.distributed as torch_dist


def world() -> tuple[int, int]:
    """(rank, world size) of the initialized process group; (0, 1) without one."""
    if torch_dist.is_available() and torch_dist.is_initialized():
        return torch_dist.get_rank(), torch_dist.get_world_size()
    return 0, 1


def is_main() -> bool:
    """True on rank 0 (and without a process group): the process that reports progress and writes files."""
    return world()[0] == 0


def shard(batch_size: int, site: str = "batch_size") -> slice:
    """This process's rows ``[r B/W, (r + 1) B/W)`` of a batch of ``batch_size`` rows (all of them when W = 1).

    ValueError naming ``site`` unless the W processes divide the batch evenly (unequal shares would weight the
    processes' gradients unequally in the average)."""
    rank, size = world()
    if batch_size % size:
        raise ValueError(f"{site}={batch_size} must be a multiple of the {size} processes of torch.distributed "
                         f"(each process fits an equal share of every batch)")
    per_rank = batch_size // size
    return slice(rank * per_rank, (rank + 1) * per_rank)


def average(tensor: torch.Tensor) -> torch.Tensor:
    """The mean of ``tensor`` over the processes (a new tensor; ``tensor`` itself when W = 1). Same shape."""
    _, size = world()
    if size == 1:
        return tensor
    out = tensor.detach().clone()
    torch_dist.all_reduce(out, op=torch_dist.ReduceOp.SUM)
    return out / size


def average_gradients(params: list[torch.Tensor]) -> None:
    """Replace each ``p.grad`` by its mean over the processes (in place; a parameter without a gradient counts
    as a zero gradient). Runs between ``backward`` and the optimizer step (``training.optimize``'s
    ``after_backward``)."""
    _, size = world()
    if size == 1:
        return
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        torch_dist.all_reduce(p.grad, op=torch_dist.ReduceOp.SUM)
        p.grad /= size


def main_only(progress: bool, checkpoints):
    """``(progress, checkpoints)`` for this process: on ranks other than 0 no progress bar, and checkpoints that
    are still resumed from but never written (all ranks hold the same state; one writer, no race on the file)."""
    if is_main():
        return progress, checkpoints
    if checkpoints is not None:
        checkpoints.path = None
    return False, checkpoints


def device() -> torch.device:
    """The device of this process: ``cuda:LOCAL_RANK`` under the nccl backend (one GPU per process, as
    ``torchrun`` numbers them), else the CPU. Put the data there before ``ppl.infer``."""
    if world()[1] > 1 and torch_dist.get_backend() == "nccl":
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", torch_dist.get_rank())))
    return torch.device("cpu")
