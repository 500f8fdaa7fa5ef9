"""Checkpoints of a fit: written every N steps, read back to resume bit-identically.

A fit may run several optimization loops (the exact backend's restarts, then the continuation of the best).
Each loop gets a key from its description and the order in which it starts (``"exact start 2/3 (MAP,
L-BFGS)#1"``), and its state at a step boundary is one entry of a single file (``torch.save`` of a dict):

    step       steps (Adam) or objective evaluations (L-BFGS) done
    done       True once the loop has finished (a resumed fit restores it without running it)
    params     the loop's parameters (unconstrained leaves, in the loop's order)
    optim      the optimizer's ``state_dict`` (Adam moments, L-BFGS curvature pairs)
    rng        the random number generators' states at that boundary (CPU, and CUDA when present)
    history    the objective so far
    extra      loop-specific state (L-BFGS: the best point so far; the SVAE: its conjugate q's)

Resuming runs the fit's set-up again (deterministic for a given ``seed``), then each loop either restores a
finished state, continues a partial one from its step with its optimizer and RNG state, or runs afresh. The
continuation equals the uninterrupted run bit for bit (``tests/inference/test_checkpoints.py``).
"""
from __future__ import annotations

import os
from collections import Counter
from pathlib import Path
from typing import Any

import torch


def rng_state() -> dict[str, Any]:
    """The state of torch's CPU generator and, when CUDA is initialized, of every CUDA device's."""
    state = {"cpu": torch.random.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.random.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class Checkpoints:
    """Where a fit writes its checkpoints (``path``, every ``every`` steps) and what it resumes from.

    Args:
        path: file written (atomically: a temporary file, then renamed) every ``every`` steps of each loop, at
            the end of each loop and when the user interrupts it; None writes nothing.
        every: steps (Adam) or objective evaluations (L-BFGS) between two writes, an integer >= 1.
        resume: a checkpoint file written by an earlier run of the same fit (same model, data, options and
            seed): its loops are restored or continued. Its entries are kept in the new file.
    """

    def __init__(self, path: str | os.PathLike | None = None, every: int = 100,
                 resume: str | os.PathLike | None = None):
        if not isinstance(every, int) or isinstance(every, bool) or every < 1:
            raise ValueError(f"checkpoint_every must be an integer >= 1, got {every!r}")
        if resume is not None and not Path(resume).is_file():
            raise FileNotFoundError(f"resume: no checkpoint file at '{resume}'")
        self.path = Path(path) if path is not None else None
        self.every = every
        self.entries: dict[str, dict] = _read(resume) if resume is not None else {}
        self._started: Counter = Counter()

    @classmethod
    def from_options(cls, checkpoint, checkpoint_every: int, resume) -> "Checkpoints | None":
        """None when neither a file to write nor one to resume from is given (the loops then skip all this)."""
        if checkpoint is None and resume is None:
            if not isinstance(checkpoint_every, int) or checkpoint_every < 1:
                raise ValueError(f"checkpoint_every must be an integer >= 1, got {checkpoint_every!r}")
            return None
        return cls(checkpoint, checkpoint_every, resume)

    def key(self, desc: str) -> str:
        """The key of the next loop described ``desc`` (numbered by how many such loops started before)."""
        self._started[desc] += 1
        return f"{desc}#{self._started[desc]}"

    def resumed(self, key: str) -> dict | None:
        """The saved state of loop ``key``, or None."""
        return self.entries.get(key)

    def due(self, step: int, last: int) -> bool:
        """Should a loop that has just done step ``step`` (its previous write at ``last``) write now?"""
        return self.path is not None and step - last >= self.every

    def write(self, key: str, state: dict) -> None:
        """Record loop ``key``'s state and write the whole file (if a path was given)."""
        self.entries[key] = state
        if self.path is None:
            return
        tmp = self.path.with_name(self.path.name + ".tmp")
        torch.save(self.entries, tmp)
        os.replace(tmp, self.path)


def _read(path) -> dict[str, dict]:
    entries = torch.load(path, map_location="cpu", weights_only=False)
    if not isinstance(entries, dict) or not all(isinstance(v, dict) and "step" in v for v in entries.values()):
        raise ValueError(f"resume: '{path}' is not a graphppl checkpoint file")
    return entries


def snapshot(params: list[torch.Tensor]) -> list[torch.Tensor]:
    """Detached copies of ``params``."""
    return [p.detach().clone() for p in params]


def restore(params: list[torch.Tensor], values: list[torch.Tensor]) -> None:
    """Copy ``values`` into ``params`` in place (the optimizer keeps its references); shapes must match."""
    if len(params) != len(values) or any(p.shape != v.shape for p, v in zip(params, values)):
        raise ValueError("resume: the checkpoint's parameters do not match this fit's (was it written by the same "
                         f"model, data and options?): shapes {[tuple(v.shape) for v in values]} vs "
                         f"{[tuple(p.shape) for p in params]}")
    with torch.no_grad():
        for p, v in zip(params, values):
            p.copy_(v.to(device=p.device, dtype=p.dtype))
