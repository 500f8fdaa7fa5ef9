"""Side-by-side timing harness: each case runs the same inputs in graphppl and in peers.

A benchmark module (``bench/bench_*.py``) exposes ``cases(quick: bool) -> list[Case]``.
``python -m bench.run`` collects them, times every callable (median of ``repeats`` runs
after one warm-up), and prints a markdown table with the ratio ``peer / ours``
(> 1 means graphppl is faster) plus a description of the machine.
"""
from __future__ import annotations

import os
import platform
import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch


@dataclass
class Case:
    """One row group: ``ours`` and each peer compute the same quantity on the same inputs.

    task:  short name of what is computed, e.g. "HMM loglik+grad K=8 (64x1000)"
    ours:  zero-argument callable running graphppl
    peers: name -> zero-argument callable running a peer library
    note:  free text printed in the table (e.g. a GFLOP/s figure)
    """

    task: str
    ours: Callable[[], Any]
    peers: dict[str, Callable[[], Any]] = field(default_factory=dict)
    note: str = ""


def median_time(fn: Callable[[], Any], repeats: int = 5, warmup: int = 1) -> float:
    """Median wall time of ``fn()`` in seconds over ``repeats`` runs after ``warmup`` runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def run_case(case: Case, repeats: int) -> list[dict]:
    """Time ``case.ours`` and every peer; one row per peer (or one row if none)."""
    ours = median_time(case.ours, repeats)
    if not case.peers:
        return [dict(task=case.task, ours=ours, peer="-", peer_time=None, ratio=None, note=case.note)]
    rows = []
    for name, fn in case.peers.items():
        peer = median_time(fn, repeats)
        rows.append(dict(task=case.task, ours=ours, peer=name, peer_time=peer,
                         ratio=peer / ours, note=case.note))
    return rows


def format_table(rows: list[dict]) -> str:
    """Markdown table of timing rows (seconds, and the ratio peer/ours)."""
    lines = ["| task | graphppl (s) | peer | peer (s) | peer / ours | note |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        peer_time = "-" if r["peer_time"] is None else f"{r['peer_time']:.4f}"
        ratio = "-" if r["ratio"] is None else f"{r['ratio']:.2f}x"
        lines.append(f"| {r['task']} | {r['ours']:.4f} | {r['peer']} | {peer_time} | {ratio} | {r['note']} |")
    return "\n".join(lines)


def machine_description() -> str:
    """One line naming the CPU, thread count and library versions the numbers came from."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    return (f"{cpu}; {os.cpu_count()} cores; torch {torch.__version__} "
            f"({torch.get_num_threads()} threads); Python {platform.python_version()}")
