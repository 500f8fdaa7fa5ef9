"""Switching LDS (``ppl.models.slds``): the SVI route vs the conjugate vi route, side by side on ``simulate`` data.

For each seed, on the same ``slds.simulate(seed)`` data (T = 200, P = 3, K = 2, D = 2):

- ``svi``: the library model ``slds.slds`` (Normal / HalfNormal priors) through ``ppl.infer`` with backend
  ``auto`` (the compiler picks svi) and the library's ``svi_infer_options`` (400 Adam steps from ``init_values``: the
  route the library's recovery test runs);
- ``vi``: ``slds.slds_conjugate`` (Dirichlet / MNIW priors) through ``ppl.infer`` with backend ``auto`` (the
  compiler picks vi: structured mean field, ``inference/vi/slds.py``) and the backend's defaults.

Each row: segmentation accuracy of ``post.viterbi("s_z")`` (``slds.segmentation_accuracy``), wall and process CPU
time of the whole ``ppl.infer`` call (compile included), steps or sweeps run, and the ELBO of the vi fit.
``--sweep`` also times one coordinate-ascent sweep of the vi fit (median of 50, CPU time).

Run: ``nice -n 5 .venv/bin/python -m bench.bench_slds --seeds 0 1 2 --threads 1``. Wall times depend on the
machine's load (printed); process CPU time is the fair comparison on a shared machine.
"""
from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch

import ppl
from ppl.analysis import analyze
from ppl.graph import trace_graph
from ppl.inference.vi import gaussian_chain, slds as slds_vi
from ppl.models import slds


def timed(fn):
    """``(result, wall seconds, process CPU seconds)`` of ``fn()``."""
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - wall, time.process_time() - cpu


def route(name: str, sim) -> dict:
    """Fit ``sim`` by route ``name`` ("svi" or "vi", module docstring); the row's numbers."""
    if name == "svi":
        model, options = slds.slds, slds.svi_infer_options(sim)
    else:
        model, options = slds.slds_conjugate, {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ppl.inference.training.NotConverged)
        post, wall, cpu = timed(lambda: ppl.infer(model, *sim.args, model_kwargs=sim.kwargs, progress=False,
                                                  **options))
    accuracy = slds.segmentation_accuracy(post.viterbi("s_z"), sim.truth["s_z"], sim.kwargs["K"])
    row = {"route": name, "backend": post.plan.backend, "accuracy": accuracy, "wall": wall, "cpu": cpu,
           "steps": len(post.history)}
    if name == "vi":
        row["elbo"] = float(post.log_evidence.value)
    return row


def sweep_time(sim, repeats: int = 50) -> float:
    """Median CPU seconds of one ``slds_vi.sweep`` of the vi fit (globals and q(z) from a 20-sweep fit)."""
    y, = sim.args
    graph, trace = trace_graph(slds.slds_conjugate, sim.args, sim.kwargs)
    facts = analyze(graph, slds.slds_conjugate, sim.args, sim.kwargs, trace)
    s = slds_vi.analyse_slds(slds.slds_conjugate, sim.args, sim.kwargs, facts, graph)
    with torch.no_grad():
        fit = slds_vi.coordinate_ascent(s, slds_vi.start(s, gaussian_chain.projection_starts(s, 1, 0)[0], 0), 20,
                                        0.0)
        q, r = (fit.q_dyn, fit.q_trans, fit.q_em), fit.regimes.r
        times = []
        for _ in range(repeats):
            cpu = time.process_time()
            slds_vi.sweep(s, q, r)
            times.append(time.process_time() - cpu)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--sweep", action="store_true", help="also time one vi sweep")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"load before: {open('/proc/loadavg').read().strip()}; torch threads {args.threads}")
    if args.sweep:
        print(f"one vi sweep (T = 200): {1e3 * sweep_time(slds.simulate(0)):.2f} ms CPU (median of 50)")
    print("| seed | route | backend | accuracy | wall s | CPU s | steps/sweeps | ELBO |")
    print("|---|---|---|---|---|---|---|---|")
    totals = {"svi": [0.0, 0.0], "vi": [0.0, 0.0]}
    for seed in args.seeds:
        sim = slds.simulate(seed)
        for name in ("svi", "vi"):
            row = route(name, sim)
            totals[name][0] += row["wall"]
            totals[name][1] += row["cpu"]
            elbo = f"{row['elbo']:.3f}" if "elbo" in row else "-"
            print(f"| {seed} | {name} | {row['backend']} | {row['accuracy']:.3f} | {row['wall']:.2f} | "
                  f"{row['cpu']:.2f} | {row['steps']} | {elbo} |", flush=True)
    (sw, sc), (vw, vc) = totals["svi"], totals["vi"]
    print(f"totals: svi wall {sw:.2f} s CPU {sc:.2f} s; vi wall {vw:.2f} s CPU {vc:.2f} s; "
          f"svi / vi: wall {sw / vw:.2f}x, CPU {sc / vc:.2f}x")
    print(f"load after: {open('/proc/loadavg').read().strip()}")


if __name__ == "__main__":
    main()
