"""Fit every model of the library on its simulated data and print the README table.

``python -m bench.fit_models [--only NAME]``: for each module in ``ppl.models.MODEL_MODULES``,
simulate (seed 0), compile, fit with the module's ``infer_options``, and report the latent
structure, the backend chosen, the fit time and the recovery errors against the tolerances.
"""
from __future__ import annotations

import argparse
import importlib
import time

import torch

import ppl
from ppl.models import MODEL_MODULES


def latent_structure(plan) -> str:
    """Short description of the local latent structure, from the plan's treatments and graph."""
    parts = []
    for t in plan.treatments:
        site = plan.graph.site(t.site)
        if t.treatment in ("message passing", "enumerate", "recognition potential"):
            kind = site.block or site.family
            size = f" K={site.discrete_size}" if site.discrete_size else ""
            parts.append(f"{t.site}: {kind}{size}")
    return "; ".join(parts) or "globals only"


def fit_row(name: str) -> dict:
    module = importlib.import_module(f"ppl.models.{name}")
    sim = module.simulate(seed=0)
    start = time.perf_counter()
    plan = ppl.compile(module.model, *sim.args, **sim.kwargs)
    post = ppl.infer(module.model, *sim.args, model_kwargs=sim.kwargs, progress=False, **module.infer_options(sim))
    elapsed = time.perf_counter() - start
    errors = module.recovery_errors(post, sim)
    ok = all(errors[k] < module.TOLERANCES[k] for k in errors)
    return dict(name=name, structure=latent_structure(plan), backend=plan.backend, seconds=elapsed,
                errors=", ".join(f"{k} {v:.3g} (< {module.TOLERANCES[k]})" for k, v in errors.items()), ok=ok)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--only", default=None)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    print("| model | latent structure | backend chosen | fit time (s) | recovery error (tolerance) |")
    print("|---|---|---|---|---|")
    for name in MODEL_MODULES:
        if args.only and args.only not in name:
            continue
        r = fit_row(name)
        mark = "" if r["ok"] else " **FAILED**"
        print(f"| `models/{name}.py` | {r['structure']} | {r['backend']} | {r['seconds']:.1f} | {r['errors']}{mark} |",
              flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
