"""Data-parallel training (``inference/distributed.py``): 2 gloo processes on this machine vs 1 process with the
same total batch, for the amortized, svae and svi backends. ``python -m bench.bench_ddp [--quick] [--steps S]``.

Each workload is fitted in float64 by one process and by two processes (one torch thread each, rendezvous through
a file). The time per step is the difference of a fit of 2 S steps and one of S steps, over S (the set-up and the
final full-data pass cancel; after a warm-up fit), on rank 0; "max |diff|" is the largest absolute difference
between the parameters of the one-process and the two-process fits after 2 S steps (0 up to summation-order
round-off when the fits are the same). With ``python -m bench.run --only ddp`` the row's time is the whole measurement (process starts included)
and the note carries the numbers.
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time

import torch
import torch.distributed as torch_dist
import torch.multiprocessing as mp

import ppl
from ppl import dist
from ppl.models import svae_lds

from .bench_amortized import laplace_factors
from .harness import Case


@ppl.model
def regression(x, y):
    """w ~ N(0, 10^2 I); s ~ HalfNormal(1); y_n ~ N(x_n w, s^2): global latents only (svi)."""
    w = ppl.sample("w", dist.Normal(x.new_zeros(x.shape[1]), 10.0).to_event(1))
    s = ppl.sample("s", dist.HalfNormal(x.new_ones(())))
    with ppl.plate("data", x.shape[0]):
        ppl.sample("y", dist.Normal(x @ w, s), obs=y)


def _workloads(quick: bool) -> dict:
    """backend -> (description, fit(num_steps) -> params)."""
    g = torch.Generator().manual_seed(0)
    n = 2_000 if quick else 20_000
    factors = torch.randn(n, 5, generator=g, dtype=torch.float64)
    x = torch.randn(10 * n, 10, generator=g, dtype=torch.float64)
    y = x @ torch.randn(10, generator=g, dtype=torch.float64) + 0.5 * torch.randn(10 * n, generator=g,
                                                                                  dtype=torch.float64)
    seqs = 16 if quick else 64
    sim = svae_lds.simulate(seed=0, N=seqs, T=30, P=16, num_test=1, dtype=torch.float64)

    def params(post):
        return {k: v.detach().clone() for k, v in post.params.items()}

    return {
        "amortized": (f"Laplace factors N={n:,} D=5, batch 1024",
                      lambda steps: params(ppl.infer(laplace_factors, factors, backend="amortized", num_steps=steps,
                                                     batch_size=1024, num_samples=2, progress=False))),
        "svae": (f"LDS-SVAE {seqs} sequences T=30 P=16, batch {seqs // 2}",
                 lambda steps: params(ppl.infer(svae_lds.model, *sim.args, model_kwargs=sim.kwargs, backend="svae",
                                                num_steps=steps, batch_size=seqs // 2, num_samples=2,
                                                progress=False))),
        "svi": (f"regression N={10 * n:,} D=10, batch {n}",
                lambda steps: params(ppl.infer(regression, x, y, backend="svi", num_steps=steps, batch_size=n,
                                               num_samples=2, progress=False))),
    }


def _measure(quick: bool, steps: int) -> dict:
    """backend -> (description, seconds per step, parameters after 2 * steps) in this process."""
    torch.set_num_threads(1)
    out = {}
    for name, (what, fit) in _workloads(quick).items():
        times = []
        fit(2)                                      # warm-up: first-call costs (imports, caches) out of the timing
        for n in (steps, 2 * steps):
            if torch_dist.is_initialized():
                torch_dist.barrier()
            start = time.perf_counter()
            params = fit(n)
            times.append(time.perf_counter() - start)
        out[name] = (what, (times[1] - times[0]) / steps, params)
    return out


def _worker(rank: int, path: str, quick: bool, steps: int) -> None:
    torch_dist.init_process_group("gloo", init_method="file://" + path + ".rendezvous", rank=rank, world_size=2)
    result = _measure(quick, steps)
    if rank == 0:
        torch.save(result, path + ".ddp")
    torch_dist.destroy_process_group()


def measure(quick: bool = False, steps: int = 20) -> list[dict]:
    """One row per backend: time per step with 1 and 2 processes, and the largest parameter difference."""
    single = _measure(quick, steps)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "ddp")
        mp.spawn(_worker, args=(path, quick, steps), nprocs=2)
        ddp = torch.load(path + ".ddp")
    rows = []
    for name, (what, one, params) in single.items():
        _, two, other = ddp[name]
        diff = max(float((params[k] - other[k]).abs().max()) for k in params)
        rows.append(dict(backend=name, workload=what, one=one, two=two, diff=diff, params=len(params)))
    return rows


def format_rows(rows: list[dict]) -> str:
    lines = ["| backend | workload | 1 process (ms/step) | 2 processes (ms/step) | max abs param diff |",
             "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['backend']} | {r['workload']} | {r['one'] * 1e3:.1f} | {r['two'] * 1e3:.1f} | "
                     f"{r['diff']:.1e} ({r['params']} tensors) |")
    return "\n".join(lines)


def cases(quick: bool) -> list[Case]:
    record: dict = {}

    def run():
        record["rows"] = measure(quick)

    case = Case("DDP: 1 vs 2 gloo processes (amortized, svae, svi), whole measurement", run)
    case.note = _Note(record)
    return [case]


class _Note(str):
    """The note is filled after the case ran."""

    def __new__(cls, record: dict):
        obj = super().__new__(cls, "")
        obj.record = record
        return obj

    def __str__(self) -> str:
        rows = self.record.get("rows", [])
        return "; ".join(f"{r['backend']}: {r['one'] * 1e3:.0f} -> {r['two'] * 1e3:.0f} ms/step, max diff "
                         f"{r['diff']:.0e}" for r in rows)

    def __format__(self, spec: str) -> str:
        return format(str(self), spec)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small workloads")
    parser.add_argument("--steps", type=int, default=20, help="S: fits of S and 2 S steps are timed")
    args = parser.parse_args(argv)
    print(format_rows(measure(args.quick, args.steps)))


if __name__ == "__main__":
    main()
