"""NUTS through the user's path, ``ppl.infer(model, backend="mcmc")``, against Pyro's NUTS, side by side in one
process: min bulk-ESS per second on eight schools and on a 3-state HMM whose path is collapsed.

Eight schools (non-centered), 4 chains, 1000 warmup + 1000 draws:

- ``ours``: ``ppl.infer(schools, Y, SIGMA, backend="mcmc", num_chains=4, warmup_steps=1000, num_samples=1000)``,
  otherwise defaults: our batched NUTS on the compiled log density (the backend's traced graph of all chains);
  the time is the whole call (compilation, the potential's build, warmup, draws, R-hat/ESS and the Posterior);
- ``pyro NUTS``: ``pyro.infer.MCMC(NUTS(model))``, one chain after another (no JIT);
- posterior means of mu and tau of each against a long reference run (our backend, 4 x ``REF_DRAWS`` draws after
  1000 warmup, another seed), as ``(mean - reference) / MCSE`` with ArviZ's MCSE of the 4 x 1000 draws.

HMM, K = 3 states, T = 500 steps (simulated with a fixed seed: sticky transitions, emissions N(loc_z, 1) with
loc = (-2, 0, 2)), transition rows ~ Dirichlet(1, 1, 1), emission scale ~ HalfNormal(2); NUTS over the globals
(6 unconstrained dims) with the path summed out:

- ``ours``: ``ppl.infer(hmm3, y, backend="mcmc", num_chains=2, warmup_steps=HMM_WARMUP, num_samples=HMM_DRAWS)``:
  the chain collapsed by the exact HMM forward kernel;
- ``pyro NUTS, enumerated``: the same model in Pyro, one ``pyro.sample`` per step under ``pyro.markov`` with
  ``config_enumerate`` (TraceEnum-style contraction of the 500 enumerated steps). Its potential and gradient
  (``initialize_model``'s ``potential_fn``, what Pyro's NUTS calls at every leapfrog step) is timed here; a
  full Pyro NUTS run is out of reach on this machine (seconds per gradient, ~7 gradients per draw), so its
  ESS/s is the rate it would reach with our run's ESS and gradient count: ``min ESS / (leapfrog steps of our
  run x Pyro's seconds per gradient)``, an upper bound for it (its tree-building overhead is left out).
  ``bench/bench_hmm_nuts.py`` makes a real (short, single-chain) Pyro NUTS run of this model instead.

ESS is ArviZ's rank-normalized bulk ESS: the minimum over mu, tau and the 8 theta = mu + tau theta~ (schools),
over the 9 transition probabilities and the scale (HMM).

``python -m bench.bench_nuts [--quick]`` prints the tables; ``python -m bench.run --only nuts --repeats 1``
runs the eight-schools case through the harness (time ratios; ESS/s in the targets).
"""
from __future__ import annotations

import argparse
import os
import statistics
import time
from typing import Callable

import arviz as az
import numpy as np
import pyro
import pyro.distributions as dist
import torch
from pyro.infer import MCMC, NUTS, config_enumerate
from pyro.infer.mcmc.util import initialize_model

import ppl
from bench.harness import Case

Y = torch.tensor([28.0, 8.0, -3.0, 7.0, -1.0, 1.0, 18.0, 12.0], dtype=torch.float64)
SIGMA = torch.tensor([15.0, 10.0, 16.0, 11.0, 9.0, 11.0, 10.0, 18.0], dtype=torch.float64)
CHAINS, WARMUP, DRAWS, REF_DRAWS = 4, 1000, 1000, 10000
K, T = 3, 500
LOCS = torch.tensor([-2.0, 0.0, 2.0], dtype=torch.float64)
HMM_CHAINS, HMM_WARMUP, HMM_DRAWS = 2, 200, 200


@ppl.model
def schools(y, sigma):
    """Eight schools, non-centered: mu ~ N(0, 5), tau ~ HalfCauchy(5), theta~_j ~ N(0, 1),
    y_j ~ N(mu + tau theta~_j, sigma_j)."""
    mu = ppl.sample("mu", dist.Normal(torch.tensor(0.0, dtype=y.dtype), 5.0))
    tau = ppl.sample("tau", dist.HalfCauchy(torch.tensor(5.0, dtype=y.dtype)))
    with ppl.plate("school", y.shape[0]):
        theta_tilde = ppl.sample("theta_tilde", dist.Normal(torch.zeros_like(y), 1.0))
        ppl.sample("y", dist.Normal(mu + tau * theta_tilde, sigma), obs=y)


def pyro_schools(y, sigma):
    """The same model in plain Pyro."""
    mu = pyro.sample("mu", dist.Normal(torch.tensor(0.0, dtype=y.dtype), 5.0))
    tau = pyro.sample("tau", dist.HalfCauchy(torch.tensor(5.0, dtype=y.dtype)))
    with pyro.plate("school", y.shape[0]):
        theta_tilde = pyro.sample("theta_tilde", dist.Normal(torch.zeros_like(y), 1.0))
        pyro.sample("y", dist.Normal(mu + tau * theta_tilde, sigma), obs=y)


@ppl.model
def hmm3(y):
    """K-state HMM on ``y`` ``(T,)``: rows of ``trans`` ~ Dirichlet(1), uniform initial state, y_t ~ N(LOCS[z_t],
    scale), scale ~ HalfNormal(2)."""
    trans = ppl.sample("trans", dist.Dirichlet(torch.ones(K, K, dtype=y.dtype)).to_event(1))
    scale = ppl.sample("scale", dist.HalfNormal(torch.tensor(2.0, dtype=y.dtype)))
    z = ppl.markov_chain("z", K, trans, length=y.shape[-1])
    ppl.sample("y", dist.Normal(LOCS[z], scale).to_event(1), obs=y)


@config_enumerate
def pyro_hmm3(y):
    """The same HMM in Pyro: one enumerated site per step under ``pyro.markov``."""
    trans = pyro.sample("trans", dist.Dirichlet(torch.ones(K, K, dtype=y.dtype)).to_event(1))
    scale = pyro.sample("scale", dist.HalfNormal(torch.tensor(2.0, dtype=y.dtype)))
    z = pyro.sample("z_0", dist.Categorical(torch.full((K,), 1.0 / K, dtype=y.dtype)))
    pyro.sample("y_0", dist.Normal(LOCS[z], scale), obs=y[0])
    for t in pyro.markov(range(1, y.shape[0])):
        z = pyro.sample(f"z_{t}", dist.Categorical(trans[z]))
        pyro.sample(f"y_{t}", dist.Normal(LOCS[z], scale), obs=y[t])


def simulate_hmm(length: int = T, seed: int = 0) -> torch.Tensor:
    """``(length,)`` observations of a sticky 3-state chain (stay 0.9, else uniform), emissions N(LOCS[z], 1)."""
    g = torch.Generator().manual_seed(seed)
    trans = torch.full((K, K), 0.05, dtype=torch.float64) + 0.85 * torch.eye(K, dtype=torch.float64)
    z = int(torch.randint(K, (1,), generator=g))
    ys = []
    for _ in range(length):
        ys.append(LOCS[z] + torch.randn((), generator=g, dtype=torch.float64))
        z = int(torch.multinomial(trans[z], 1, generator=g))
    return torch.stack(ys)


# ---------------------------------------------------------------- eight schools


def _schools_summary(mu: np.ndarray, tau: np.ndarray, tt: np.ndarray) -> dict:
    """Draws ``(chains, draws[, 8])`` -> min bulk ESS over mu, tau, theta and the means and MCSEs of mu, tau."""
    theta = mu[..., None] + tau[..., None] * tt
    data = az.convert_to_dataset({"mu": mu, "tau": tau, "theta": theta})
    ess = az.ess(data, method="bulk")
    mcse = az.mcse(data)
    min_ess = min(float(ess["mu"]), float(ess["tau"]), float(ess["theta"].min()))
    return dict(min_ess=min_ess, mean_mu=float(mu.mean()), mean_tau=float(tau.mean()),
                mcse_mu=float(mcse["mu"]), mcse_tau=float(mcse["tau"]))


def run_backend(warmup: int, draws: int, seed: int = 0) -> dict:
    """``ppl.infer(schools, backend="mcmc")`` with 4 chains, timed as a whole."""
    start = time.perf_counter()
    post = ppl.infer(schools, Y, SIGMA, backend="mcmc", num_chains=CHAINS, warmup_steps=warmup,
                     num_samples=draws, seed=seed, progress=False)
    seconds = time.perf_counter() - start
    d = {k: v.numpy() for k, v in post.draws.items()}
    return dict(_schools_summary(d["mu"], d["tau"], d["theta_tilde"]), seconds=seconds,
                divergences=post.mcmc.divergences)


def run_pyro(warmup: int, draws: int, seed: int = 0) -> dict:
    """Pyro's NUTS, the 4 chains one after another, timed as a whole."""
    start = time.perf_counter()
    chains = []
    for c in range(CHAINS):
        pyro.set_rng_seed(seed + c)
        mcmc = MCMC(NUTS(pyro_schools, jit_compile=False), num_samples=draws, warmup_steps=warmup,
                    disable_progbar=True)
        mcmc.run(Y, SIGMA)
        chains.append({k: v.numpy() for k, v in mcmc.get_samples().items()})
    seconds = time.perf_counter() - start
    d = {k: np.stack([c[k] for c in chains]) for k in chains[0]}
    return dict(_schools_summary(d["mu"], d["tau"], d["theta_tilde"]), seconds=seconds, divergences=float("nan"))


def schools_rows(quick: bool) -> tuple[dict, dict]:
    """(name -> result, reference) for ours and Pyro, and the long reference run."""
    warmup, draws = (200, 200) if quick else (WARMUP, DRAWS)
    results = {"ours: ppl.infer(backend='mcmc')": run_backend(warmup, draws),
               "pyro NUTS": run_pyro(warmup, draws)}
    for r in results.values():
        r["ess_per_s"] = r["min_ess"] / r["seconds"]
    return results, run_backend(WARMUP, 2000 if quick else REF_DRAWS, seed=123)


def schools_table(results: dict, ref: dict) -> str:
    lines = ["| eight schools, 4 chains | seconds | min bulk ESS | min bulk ESS/s | divergences | "
             "mean mu (z vs ref) | mean tau (z vs ref) |", "|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        z_mu = (r["mean_mu"] - ref["mean_mu"]) / r["mcse_mu"]
        z_tau = (r["mean_tau"] - ref["mean_tau"]) / r["mcse_tau"]
        lines.append(f"| {name} | {r['seconds']:.1f} | {r['min_ess']:.0f} | {r['ess_per_s']:.1f} | "
                     f"{r['divergences']} | {r['mean_mu']:.3f} ({z_mu:+.1f}) | {r['mean_tau']:.3f} ({z_tau:+.1f}) |")
    lines.append(f"| reference (ours, 4 x {ref['n_draws']} draws) | {ref['seconds']:.1f} | | | | "
                 f"{ref['mean_mu']:.3f} | {ref['mean_tau']:.3f} |")
    ours, peer = results["ours: ppl.infer(backend='mcmc')"], results["pyro NUTS"]
    ratio = ours["ess_per_s"] / peer["ess_per_s"]
    within = ", ".join(f"{n}: {'yes' if _max_z(r, ref) < 3 else 'NO'}" for n, r in results.items())
    lines.append(f"\nours / Pyro min bulk-ESS/s: {ratio:.1f}x (target >= 3x: {'met' if ratio >= 3 else 'NOT met'}); "
                 f"ours {ours['ess_per_s']:.0f} min bulk-ESS/s (target >= 150: "
                 f"{'met' if ours['ess_per_s'] >= 150 else 'NOT met'}); means within 3 MCSE of the reference: {within}")
    return "\n".join(lines)


def _max_z(r: dict, ref: dict) -> float:
    """The larger of |mean - reference| / MCSE over mu and tau."""
    return max(abs(r["mean_mu"] - ref["mean_mu"]) / r["mcse_mu"], abs(r["mean_tau"] - ref["mean_tau"]) / r["mcse_tau"])


# ---------------------------------------------------------------- HMM


def run_backend_hmm(y: torch.Tensor, warmup: int, draws: int, seed: int = 0) -> dict:
    """``ppl.infer(hmm3, y, backend="mcmc")``: seconds, min bulk ESS (9 transition probabilities and the scale),
    leapfrog steps of the whole run (warmup included, all chains), posterior means."""
    start = time.perf_counter()
    post = ppl.infer(hmm3, y, backend="mcmc", num_chains=HMM_CHAINS, warmup_steps=warmup, num_samples=draws,
                     seed=seed, progress=False)
    seconds = time.perf_counter() - start
    trans, scale = post.draws["trans"].numpy(), post.draws["scale"].numpy()
    ess = az.ess(az.convert_to_dataset({"trans": trans, "scale": scale}), method="bulk")
    min_ess = min(float(ess["trans"].min()), float(ess["scale"]))
    steps = post.mcmc.per_draw["n_steps"]
    # the warmup's steps are not kept per draw: count them at the draws' mean rate
    total_steps = float(steps.sum()) * (warmup + draws) / draws
    return dict(seconds=seconds, min_ess=min_ess, ess_per_s=min_ess / seconds, leapfrog_steps=total_steps,
                mean_stay=trans.reshape(-1, K, K).mean(0).diagonal().tolist(), mean_scale=float(scale.mean()),
                divergences=post.mcmc.divergences)


def pyro_hmm_seconds_per_gradient(y: torch.Tensor, calls: int = 3) -> float:
    """Median seconds of one potential + gradient of Pyro's enumerated HMM (the call its NUTS makes per leapfrog
    step) at its initial point."""
    init, potential_fn, _, _ = initialize_model(pyro_hmm3, model_args=(y,), max_plate_nesting=0)
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        params = {k: v.detach().requires_grad_(True) for k, v in init.items()}
        torch.autograd.grad(potential_fn(params), list(params.values()))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def hmm_rows(quick: bool) -> dict:
    warmup, draws = (50, 50) if quick else (HMM_WARMUP, HMM_DRAWS)
    y = simulate_hmm()
    ours = run_backend_hmm(y, warmup, draws)
    per_grad = pyro_hmm_seconds_per_gradient(y, 1 if quick else 3)
    pyro_rate = ours["min_ess"] / (ours["leapfrog_steps"] * per_grad)
    return dict(ours=ours, pyro_seconds_per_gradient=per_grad, pyro_ess_per_s=pyro_rate,
                ours_seconds_per_gradient=ours["seconds"] / ours["leapfrog_steps"], warmup=warmup, draws=draws)


def hmm_table(h: dict) -> str:
    o = h["ours"]
    ratio = o["ess_per_s"] / h["pyro_ess_per_s"]
    return "\n".join([
        f"| HMM K={K}, T={T}, {HMM_CHAINS} chains x ({h['warmup']} warmup + {h['draws']} draws) | seconds | "
        "min bulk ESS | min bulk ESS/s | seconds per gradient (per chain) |",
        "|---|---|---|---|---|",
        f"| ours: ppl.infer(backend='mcmc'), chain collapsed | {o['seconds']:.1f} | {o['min_ess']:.0f} | "
        f"{o['ess_per_s']:.2f} | {h['ours_seconds_per_gradient']:.4f} (whole run / leapfrog steps) |",
        f"| pyro NUTS potential, enumerated (bound: our ESS and {o['leapfrog_steps']:.0f} steps) | "
        f"{o['leapfrog_steps'] * h['pyro_seconds_per_gradient']:.0f} (est.) | {o['min_ess']:.0f} | "
        f"{h['pyro_ess_per_s']:.4f} | {h['pyro_seconds_per_gradient']:.3f} (measured) |",
        f"\nours / Pyro min bulk-ESS/s: {ratio:.0f}x (target >= 5x: {'met' if ratio >= 5 else 'NOT met'}; Pyro's rate "
        f"is the bound above, not a run); ours: posterior mean stay probabilities "
        f"{', '.join(f'{p:.3f}' for p in o['mean_stay'])} (simulated with 0.9), scale {o['mean_scale']:.3f} (1), "
        f"{o['divergences']} divergences"])


# ---------------------------------------------------------------- bench.run integration

_ESS: dict[str, list[float]] = {}


def _recording(name: str, fn: Callable, warmup: int, draws: int) -> Callable[[], None]:
    def run():
        _ESS.setdefault(name, []).append(fn(warmup, draws)["min_ess"])
    return run


def cases(quick: bool) -> list[Case]:
    """The eight-schools case: the whole 4-chain run through ``ppl.infer`` against Pyro's NUTS."""
    warmup, draws = (200, 200) if quick else (WARMUP, DRAWS)
    _ESS.clear()
    task = f"NUTS eight schools, {CHAINS} chains x ({warmup} warmup + {draws} draws)"
    return [Case(task, ours=_recording("ours", run_backend, warmup, draws),
                 peers={"pyro NUTS": _recording("pyro NUTS", run_pyro, warmup, draws)},
                 note="ours = ppl.infer(backend='mcmc'); min bulk-ESS/s in the targets")]


def targets(rows: list[dict]) -> list[str]:
    """min bulk-ESS/s (median ESS of the timed runs / median time) against the issue's numbers: >= 3x Pyro NUTS
    and >= 150."""
    ours_time = next((r["ours"] for r in rows), None)
    peer = {r["peer"]: r["peer_time"] for r in rows}
    if ours_time is None or "ours" not in _ESS or "pyro NUTS" not in peer:
        return []
    rate = float(np.median(_ESS["ours"])) / ours_time
    pyro_rate = float(np.median(_ESS["pyro NUTS"])) / peer["pyro NUTS"]
    return [f"eight schools min bulk-ESS/s >= 3x Pyro NUTS (ppl.infer, backend='mcmc'): "
            f"{'met' if rate >= 3 * pyro_rate else 'NOT met'} ({rate:.0f} vs {pyro_rate:.0f}, {rate / pyro_rate:.1f}x)",
            f"eight schools min bulk-ESS/s >= 150: {'met' if rate >= 150 else 'NOT met'} ({rate:.0f})"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="200 + 200 (HMM 50 + 50) draws, short reference")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--only", choices=("schools", "hmm"), default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"load average before: {os.getloadavg()}")
    if args.only != "hmm":
        results, ref = schools_rows(args.quick)
        ref["n_draws"] = 2000 if args.quick else REF_DRAWS
        print(schools_table(results, ref))
    if args.only != "schools":
        print()
        print(hmm_table(hmm_rows(args.quick)))
    print(f"\nload average after: {os.getloadavg()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
