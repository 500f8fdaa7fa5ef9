"""NUTS on eight schools (non-centered), 4 chains, 1000 warmup + 1000 draws: min bulk-ESS per second, ours
against Pyro's NUTS, side by side in one process; posterior means of mu and tau against a long reference run.

Rows (all sample the same posterior, over (mu, log tau, theta~_1..8)):

- ``ours, mcmc backend``: ``ppl.infer(schools, backend="mcmc")``: our batched NUTS on the potential the backend
  builds today (Pyro's ``potential_fn``, the 4 chains evaluated one after another per gradient call);
- ``ours, batched tensor potential``: the same sampler (``nuts.sample``) on a hand-written torch log density
  batched over the 4 chains: what the backend becomes once the compiled density (issue 13 item 1) lands;
- ``pyro NUTS``: ``pyro.infer.MCMC(NUTS(model))``, one chain after another (the issue's 27 min-ESS/s figure),
  no JIT.

ESS is ArviZ's rank-normalized bulk ESS, the minimum over mu, tau and the 8 theta = mu + tau theta~; time is the
whole run (warmup included). The reference means come from the batched-potential sampler with 4 x 20,000 draws;
``|mean - reference| / MCSE`` (ArviZ's MCSE of the 4 x 1000 draws) is printed for mu and tau.

``python -m bench.bench_nuts [--quick]`` prints the table; ``python -m bench.run --only nuts --repeats 1``
runs it through the harness (time ratios, ESS/s in the targets).
"""
from __future__ import annotations

import argparse
import math
import time
from typing import Callable

import arviz as az
import numpy as np
import pyro
import pyro.distributions as dist
import torch
from pyro.infer import MCMC, NUTS

import ppl
from bench.harness import Case
from ppl.inference.mcmc import nuts

Y = torch.tensor([28.0, 8.0, -3.0, 7.0, -1.0, 1.0, 18.0, 12.0], dtype=torch.float64)
SIGMA = torch.tensor([15.0, 10.0, 16.0, 11.0, 9.0, 11.0, 10.0, 18.0], dtype=torch.float64)
CHAINS, WARMUP, DRAWS = 4, 1000, 1000


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


def batched_potential(y: torch.Tensor, sigma: torch.Tensor) -> Callable:
    """``z (C, 10) = (mu, log tau, theta~) -> (U (C,), grad (C, 10))``, U = -log p(mu, log tau, theta~ | y) (with the
    log-Jacobian log tau), by hand in torch: one call for all chains."""
    log_hc = math.log(2 / (math.pi * 5))

    def potential_and_grad(z):
        with torch.enable_grad():
            z = z.detach().requires_grad_(True)
            mu, log_tau, tt = z[:, 0], z[:, 1], z[:, 2:]
            tau = log_tau.exp()
            log_p = (-0.5 * (mu / 5) ** 2 + log_hc - torch.log1p((tau / 5) ** 2) + log_tau
                     - 0.5 * (tt ** 2).sum(-1) - 0.5 * (((y - mu[:, None] - tau[:, None] * tt) / sigma) ** 2).sum(-1))
            (grad,) = torch.autograd.grad(-log_p.sum(), z)
        return -log_p.detach(), grad

    return potential_and_grad


def _summary(mu: np.ndarray, tau: np.ndarray, tt: np.ndarray) -> dict:
    """Draws ``(chains, draws[, 8])`` -> min bulk ESS over mu, tau, theta and the means and MCSEs of mu, tau."""
    theta = mu[..., None] + tau[..., None] * tt
    data = az.convert_to_dataset({"mu": mu, "tau": tau, "theta": theta})
    ess = az.ess(data, method="bulk")
    mcse = az.mcse(data)
    min_ess = min(float(ess["mu"]), float(ess["tau"]), float(ess["theta"].min()))
    return dict(min_ess=min_ess, mean_mu=float(mu.mean()), mean_tau=float(tau.mean()),
                mcse_mu=float(mcse["mu"]), mcse_tau=float(mcse["tau"]))


def run_backend(warmup: int, draws: int, seed: int = 0) -> dict:
    """Our sampler through ``ppl.infer`` (the backend's Pyro potential)."""
    post = ppl.infer(schools, Y, SIGMA, backend="mcmc", num_chains=CHAINS, warmup_steps=warmup,
                     num_samples=draws, seed=seed, progress=False)
    d = {k: v.numpy() for k, v in post.draws.items()}
    return _summary(d["mu"], d["tau"], d["theta_tilde"])


def run_batched(warmup: int, draws: int, seed: int = 0, chains: int = CHAINS) -> dict:
    """Our sampler on the hand-written batched potential."""
    init = torch.rand(chains, 10, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 4 - 2
    run = nuts.sample(batched_potential(Y, SIGMA), init, draws, warmup, seed=seed)
    d = run.draws.numpy()
    return _summary(d[..., 0], np.exp(d[..., 1]), d[..., 2:])


def run_pyro(warmup: int, draws: int, seed: int = 0) -> dict:
    """Pyro's NUTS, one chain after another."""
    chains = []
    for c in range(CHAINS):
        pyro.set_rng_seed(seed + c)
        mcmc = MCMC(NUTS(pyro_schools, jit_compile=False), num_samples=draws, warmup_steps=warmup,
                    disable_progbar=True)
        mcmc.run(Y, SIGMA)
        chains.append({k: v.numpy() for k, v in mcmc.get_samples().items()})
    d = {k: np.stack([c[k] for c in chains]) for k in chains[0]}
    return _summary(d["mu"], d["tau"], d["theta_tilde"])


RUNNERS = {"ours, mcmc backend": run_backend, "ours, batched tensor potential": run_batched, "pyro NUTS": run_pyro}


def timed(fn: Callable, *args) -> dict:
    start = time.perf_counter()
    out = fn(*args)
    out["seconds"] = time.perf_counter() - start
    out["ess_per_s"] = out["min_ess"] / out["seconds"]
    return out


def reference(draws: int = 20000) -> dict:
    """Long run: 4 chains x ``draws`` of the batched-potential sampler (1000 warmup)."""
    return run_batched(WARMUP, draws, seed=123)


def measure(quick: bool) -> tuple[dict, dict]:
    """(name -> timed result, reference) for the three samplers."""
    warmup, draws = (200, 200) if quick else (WARMUP, DRAWS)
    results = {name: timed(fn, warmup, draws) for name, fn in RUNNERS.items()}
    return results, reference(2000 if quick else 20000)


def report(results: dict, ref: dict) -> str:
    lines = ["| sampler | seconds | min bulk ESS | min bulk ESS/s | mean mu (z vs ref) | mean tau (z vs ref) |",
             "|---|---|---|---|---|---|"]
    for name, r in results.items():
        z_mu = (r["mean_mu"] - ref["mean_mu"]) / r["mcse_mu"]
        z_tau = (r["mean_tau"] - ref["mean_tau"]) / r["mcse_tau"]
        lines.append(f"| {name} | {r['seconds']:.1f} | {r['min_ess']:.0f} | {r['ess_per_s']:.1f} | "
                     f"{r['mean_mu']:.3f} ({z_mu:+.1f}) | {r['mean_tau']:.3f} ({z_tau:+.1f}) |")
    lines.append(f"| reference (4 x long run) | | | | {ref['mean_mu']:.3f} | {ref['mean_tau']:.3f} |")
    pyro_rate = results["pyro NUTS"]["ess_per_s"]
    for name in ("ours, mcmc backend", "ours, batched tensor potential"):
        lines.append(f"\n{name}: {results[name]['ess_per_s'] / pyro_rate:.2f}x Pyro NUTS min bulk-ESS/s")
    return "\n".join(lines)


# ---------------------------------------------------------------- bench.run integration

_ESS: dict[str, list[float]] = {}


def _recording(name: str, fn: Callable, warmup: int, draws: int) -> Callable[[], None]:
    def run():
        _ESS.setdefault(name, []).append(fn(warmup, draws)["min_ess"])
    return run


def cases(quick: bool) -> list[Case]:
    """One case: the whole 4-chain run (ours on the batched potential; peers: Pyro NUTS and our backend today)."""
    warmup, draws = (200, 200) if quick else (WARMUP, DRAWS)
    _ESS.clear()
    task = f"NUTS eight schools, {CHAINS} chains x ({warmup} warmup + {draws} draws)"
    return [Case(task, ours=_recording("ours", run_batched, warmup, draws),
                 peers={"pyro NUTS": _recording("pyro NUTS", run_pyro, warmup, draws),
                        "ours, mcmc backend (Pyro potential)": _recording("backend", run_backend, warmup, draws)},
                 note="ours = batched tensor potential; min bulk-ESS/s in the targets")]


def targets(rows: list[dict]) -> list[str]:
    """min bulk-ESS/s (median ESS of the timed runs / median time) against the issue's numbers: >= 3x Pyro NUTS
    and >= 150."""
    ours_time = next((r["ours"] for r in rows), None)
    peer = {r["peer"]: r["peer_time"] for r in rows}
    if ours_time is None or "ours" not in _ESS:
        return []
    rate = float(np.median(_ESS["ours"])) / ours_time
    pyro_rate = float(np.median(_ESS["pyro NUTS"])) / peer["pyro NUTS"]
    backend_rate = float(np.median(_ESS["backend"])) / peer["ours, mcmc backend (Pyro potential)"]
    return [f"eight schools min bulk-ESS/s >= 3x Pyro NUTS (batched potential): "
            f"{'met' if rate >= 3 * pyro_rate else 'NOT met'} ({rate:.0f} vs {pyro_rate:.0f}, {rate / pyro_rate:.1f}x)",
            f"eight schools min bulk-ESS/s >= 150 (batched potential): {'met' if rate >= 150 else 'NOT met'} "
            f"({rate:.0f})",
            f"mcmc backend today (Pyro potential, chains looped): {backend_rate:.0f} min bulk-ESS/s, "
            f"{backend_rate / pyro_rate:.1f}x Pyro NUTS"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="200 warmup + 200 draws, short reference")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    results, ref = measure(args.quick)
    print(report(results, ref))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
