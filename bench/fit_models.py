"""Fit every model of the library on its simulated data and print the README table.

``python -m bench.fit_models [--only NAME] [--threads 1] [--repeat 1]``: for each module in
``ppl.models.MODEL_MODULES``, simulate (seed 0), compile, fit with the module's ``infer_options``,
and print the README table (model, latent structure, backend chosen, fit time, file), then the
recovery errors against the tolerances (exit status 1 if any fails).
"""
from __future__ import annotations

import argparse
import importlib
import time

import pyro
import torch

import ppl
from ppl.models import MODEL_MODULES


def latent_structure(plan) -> str:
    """Short description of the latents and how the plan treats them.

    Local latents (a chain block, a finite discrete site, or a site sharing a plate with an observed
    site, e.g. one per data point or document) are listed one by one, e.g.
    ``z: markov_chain K=3 (message passing)``; the rest are summarized as ``n globals (treatment)``.
    """
    data_plates = {p for s in plan.graph.observed() for p in s.plates}
    local, globals_ = [], {}
    for t in plan.treatments:
        if t.treatment == "observed":
            continue
        site = plan.graph.site(t.site)
        if site.block or site.discrete_size or data_plates.intersection(site.plates):
            kind = site.block or ("Categorical" if site.discrete_size else "continuous")
            size = f" K={site.discrete_size}" if site.discrete_size else ""
            where = "".join(f" per {p[0]}" for p in site.plates if p in data_plates)
            local.append(f"{t.site}: {kind}{size}{where} ({t.treatment})")
        else:
            globals_[t.treatment] = globals_.get(t.treatment, 0) + 1
    parts = local + [f"{n} global{'s' * (n > 1)} ({how})" for how, n in globals_.items()]
    return "; ".join(parts) or "nothing latent"


def title(module) -> str:
    """The model's name: its docstring's first line, up to a colon, without the final period."""
    return module.__doc__.strip().splitlines()[0].split(":")[0].rstrip(".")


def fit_row(name: str, repeat: int = 1) -> dict:
    """Simulate (seed 0), compile and fit ``ppl.models.<name>``; ``seconds`` is the fastest of
    ``repeat`` fits (compile + infer; the least disturbed by other load on the machine)."""
    module = importlib.import_module(f"ppl.models.{name}")
    sim = module.simulate(seed=0)
    times = []
    for _ in range(repeat):
        pyro.clear_param_store()
        torch.manual_seed(0)
        start = time.perf_counter()
        plan = ppl.compile(module.model, *sim.args, **sim.kwargs)
        post = ppl.infer(module.model, *sim.args, model_kwargs=sim.kwargs, progress=False,
                         **module.infer_options(sim))
        times.append(time.perf_counter() - start)
    errors = module.recovery_errors(post, sim)
    ok = all(errors[k] < module.TOLERANCES[k] for k in errors)
    return dict(name=name, title=title(module), structure=latent_structure(plan), backend=plan.backend,
                seconds=min(times), ok=ok,
                errors=", ".join(f"{k} {v:.3g} (< {module.TOLERANCES[k]})" for k, v in errors.items()))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--only", default=None)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeat", type=int, default=1, help="fits per model; the fastest is reported")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = []
    print("| model | latent structure | backend chosen | fit time (s) | file |")
    print("|---|---|---|---|---|")
    for name in MODEL_MODULES:
        if args.only and args.only not in name:
            continue
        r = fit_row(name, args.repeat)
        rows.append(r)
        print(f"| {r['title']} | {r['structure']} | {r['backend']} | {r['seconds']:.1f} | `models/{name}.py` |",
              flush=True)
    print("\n| model | recovery error (tolerance) |\n|---|---|")
    for r in rows:
        print(f"| `{r['name']}` | {r['errors']}{'' if r['ok'] else ' **FAILED**'} |")
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
