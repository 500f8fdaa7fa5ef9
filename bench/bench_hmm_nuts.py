"""NUTS over an HMM's globals, path summed out: ``ppl.infer(..., backend="mcmc")`` against a real run of Pyro's
NUTS with its enumeration, on the same data and the same number of draws (issue 13, the HMM number).

Model (``bench.bench_nuts.hmm3`` / ``pyro_hmm3``): K = 3 states, T = 500 steps simulated with a fixed seed (sticky
transitions, emissions N(loc_z, 1), loc = (-2, 0, 2)); transition rows ~ Dirichlet(1, 1, 1), uniform initial
state, emission scale ~ HalfNormal(2). NUTS runs over the 6 + 1 unconstrained globals.

- ``ours``: ``ppl.infer(hmm3, y, backend="mcmc", num_chains=1, warmup_steps=W, num_samples=N, seed=s)``: the
  chain collapsed by the exact HMM forward kernel; the whole call is timed.
- ``pyro``: ``pyro.infer.MCMC(NUTS(potential_fn=...), warmup_steps=W, num_samples=N)``, one chain, on the
  potential of ``initialize_model(pyro_hmm3, max_plate_nesting=0, jit_compile=...)``: Pyro's own enumeration
  (``config_enumerate``, one site per step under ``pyro.markov``, contracted by its TraceEnum machinery),
  with ``--jit`` its ``torch.jit`` trace of that potential (Pyro's JIT; off by default: on this model the trace of
  the 1000 enumerated sites takes longer than the whole unjitted run). The potential is called through a counter
  so the number of gradients is reported; the whole ``initialize_model`` + run is timed.

Both report wall seconds, process CPU seconds (``time.process_time``, 1 torch thread: the unloaded proxy on a
shared machine), ArviZ's bulk ESS (the minimum over the 9 transition probabilities and the scale), gradients, and
the posterior means of the stay probabilities and the scale. A short single-chain run's ESS is noisy: ``ours`` is
repeated over ``--seeds`` seeds and the spread (min .. max) of its min bulk ESS is printed, which bounds how much
the one Pyro run's ESS can be trusted at this length.

``python -m bench.bench_hmm_nuts [--quick] [--warmup W --draws N] [--jit] [--seeds S]``; run it under
``nice -n 10``: the Pyro side costs ~1 CPU second per gradient.
"""
from __future__ import annotations

import argparse
import os
import time
import warnings

import arviz as az
import numpy as np
import pyro
import torch
from pyro.infer import MCMC, NUTS
from pyro.infer.mcmc.util import initialize_model

import ppl
from bench.bench_nuts import K, T, hmm3, pyro_hmm3, simulate_hmm


def summary(trans: np.ndarray, scale: np.ndarray) -> dict:
    """Draws ``trans`` ``(chains, draws, K, K)``, ``scale`` ``(chains, draws)`` -> min bulk ESS over the 9
    probabilities and the scale, mean stay probabilities and scale."""
    ess = az.ess(az.convert_to_dataset({"trans": trans, "scale": scale}), method="bulk")
    return dict(min_ess=min(float(ess["trans"].min()), float(ess["scale"])),
                mean_stay=trans.reshape(-1, K, K).mean(0).diagonal().tolist(), mean_scale=float(scale.mean()))


def run_ours(y: torch.Tensor, warmup: int, draws: int, seed: int) -> dict:
    """One chain of ``ppl.infer(hmm3, y, backend="mcmc")``, timed as a whole (wall and CPU)."""
    t0, c0 = time.perf_counter(), time.process_time()
    post = ppl.infer(hmm3, y, backend="mcmc", num_chains=1, warmup_steps=warmup, num_samples=draws, seed=seed,
                     progress=False)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    steps = post.mcmc.per_draw["n_steps"]
    out = summary(post.draws["trans"].numpy(), post.draws["scale"].numpy())
    return dict(out, wall=wall, cpu=cpu, draw_gradients=float(steps.sum()), divergences=post.mcmc.divergences)


def run_pyro(y: torch.Tensor, warmup: int, draws: int, seed: int, jit: bool) -> dict:
    """One chain of Pyro's NUTS on its enumerated potential, the gradients counted; timed as a whole."""
    t0, c0 = time.perf_counter(), time.process_time()
    pyro.set_rng_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        init, potential_fn, transforms, _ = initialize_model(pyro_hmm3, model_args=(y,), max_plate_nesting=0,
                                                            jit_compile=jit, skip_jit_warnings=True)
    calls = [0]

    def counted(params):
        calls[0] += 1
        return potential_fn(params)

    mcmc = MCMC(NUTS(potential_fn=counted), num_samples=draws, warmup_steps=warmup, initial_params=init,
                disable_progbar=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mcmc.run()
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    unconstrained = mcmc.get_samples()
    constrained = {k: transforms[k].inv(v) for k, v in unconstrained.items()}
    out = summary(constrained["trans"].numpy()[None], constrained["scale"].numpy()[None])
    return dict(out, wall=wall, cpu=cpu, gradients=calls[0])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="10 warmup + 10 draws, 2 seeds of ours")
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument("--draws", type=int, default=50)
    parser.add_argument("--seeds", type=int, default=5, help="repeats of ours (the ESS spread)")
    parser.add_argument("--jit", action="store_true", help="Pyro's jit_compile=True")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    if args.quick:
        args.warmup, args.draws, args.seeds = 10, 10, 2
    torch.set_num_threads(args.threads)
    y = simulate_hmm()
    print(f"HMM K={K}, T={T}, 1 chain x ({args.warmup} warmup + {args.draws} draws); load average before: "
          f"{os.getloadavg()}", flush=True)
    ours = [run_ours(y, args.warmup, args.draws, seed) for seed in range(args.seeds)]
    peer = run_pyro(y, args.warmup, args.draws, 0, args.jit)
    ess = [o["min_ess"] for o in ours]
    rate = np.median([o["min_ess"] / o["cpu"] for o in ours])
    rate_wall = np.median([o["min_ess"] / o["wall"] for o in ours])
    lines = ["| run | wall s | CPU s | min bulk ESS | ESS / CPU s | ESS / wall s | gradients | mean stay | mean scale |",
             "|---|---|---|---|---|---|---|---|---|"]
    for seed, o in enumerate(ours):
        lines.append(f"| ours, seed {seed} | {o['wall']:.1f} | {o['cpu']:.1f} | {o['min_ess']:.1f} | "
                     f"{o['min_ess'] / o['cpu']:.2f} | {o['min_ess'] / o['wall']:.2f} | {o['draw_gradients']:.0f} "
                     f"(draws only) | {', '.join(f'{p:.3f}' for p in o['mean_stay'])} | {o['mean_scale']:.3f} |")
    jit = "jit_compile=True" if args.jit else "no JIT"
    lines.append(f"| pyro NUTS, enumerated ({jit}) | {peer['wall']:.1f} | {peer['cpu']:.1f} | {peer['min_ess']:.1f} | "
                 f"{peer['min_ess'] / peer['cpu']:.4f} | {peer['min_ess'] / peer['wall']:.4f} | {peer['gradients']} "
                 f"(all) | {', '.join(f'{p:.3f}' for p in peer['mean_stay'])} | {peer['mean_scale']:.3f} |")
    print("\n".join(lines))
    ratio = rate / (peer["min_ess"] / peer["cpu"])
    print(f"\nours (median over seeds) / Pyro, min bulk-ESS per CPU second: {ratio:.0f}x; per wall second: "
          f"{rate_wall / (peer['min_ess'] / peer['wall']):.0f}x (target >= 5x: {'met' if ratio >= 5 else 'NOT met'}). "
          f"Spread of ours' min bulk ESS over {len(ess)} seeds: {min(ess):.1f} .. {max(ess):.1f} "
          f"({args.draws} draws); Pyro's seconds per gradient: {peer['cpu'] / peer['gradients']:.2f} CPU.")
    print(f"load average after: {os.getloadavg()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
