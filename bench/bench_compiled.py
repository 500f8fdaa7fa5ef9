"""The compiled log density vs Pyro's interpreter: time of 20 SVI steps (loss + gradient) of every library
model, and whole AutoNormal fits of a 178-point 2-D mixture.

"graphppl" is the svi backend's objective now: the AutoNormal loss recorded once as one graph of tensor ops
(``compiled.NormalObjective``: the guide's draw, log q, the log density and the gradient, no Python of the model
or the guide per step) where it can be, the
interpreter where it cannot (the row says which). Peers, on the same guide, model (chains collapsed, discrete
sites enumerated) and data: "interpreter" is the compiled density run by its interpreter every step
(``trace=False``: the objective before the recording), "pyro ELBO" ``TraceEnum_ELBO`` / ``Trace_ELBO``
(``training.make_elbo``: the objective before the compiled density, and the fallback). Ratio > 1: ours is
faster. The fits run ``training.optimize`` (the loop the backends run) and record when ``training.fit_guide`` would
(``training.record_after``: a 2000-step Adam fit at its first step); their last-100-step mean losses are printed as
the targets' "same optimum" check. The per-model rows record at the first call (outside the timed calls).
"""
from __future__ import annotations

import importlib

import pyro
import pyro.poutine as poutine
import torch
from pyro.infer.autoguide import AutoNormal

import ppl
from ppl.inference import chains, compiled, training
from ppl.models import MODEL_MODULES, gmm

from .harness import Case

STEPS_PER_CALL = 20
"""SVI steps per timed call of the per-model rows (one step is a few ms: one call would be timer noise)."""

OPTIMA: dict[str, float] = {}
"""path -> mean loss of the last 100 steps of its latest GMM fit (the targets' same-optimum check)."""


def _steps(module_name: str) -> tuple:
    """(recorded step, interpreter step, Pyro step, why the recording is not used or None) of an AutoNormal
    guide on the library model's simulated data."""
    module = importlib.import_module(f"ppl.models.{module_name}")
    sim = module.simulate(seed=0)
    plan = ppl.compile(module.model, *sim.args, **sim.kwargs)
    fmodel = chains.fit_model(module.model, plan.facts)
    guide = AutoNormal(poutine.block(fmodel, hide=list(plan.facts.enumerable)))
    guide._pyro_name = f"bench_{module_name}"  # its own parameters in the shared store
    site_plan = compiled.SitePlan.of(plan)
    ours = compiled.guide_objective(fmodel, guide, sim.args, sim.kwargs, site_plan, record_after=1)
    interpreter = compiled.guide_objective(fmodel, guide, sim.args, sim.kwargs, site_plan, trace=False)
    ours()  # records the AutoNormal loss (compiled.NormalObjective) at its first evaluation
    elbo = training.make_elbo(plan.graph, plan.facts)

    def pyro_step():
        with pyro.validation_enabled(False):
            elbo.differentiable_loss(fmodel, guide, *sim.args, **sim.kwargs).backward()

    def repeated(one_step):
        def run():
            for _ in range(STEPS_PER_CALL):
                one_step()
        return run

    return (repeated(lambda: ours()[0].backward()), repeated(lambda: interpreter()[0].backward()),
            repeated(pyro_step), ours.density.reason)


def _mixture_fit(num_steps: int, path: str):
    """A 3-component GMM on 178 2-D points (wine-sized), AutoNormal, ``num_steps`` Adam steps (lr 0.02) through
    ``training.optimize``, from k-means++ locations (``gmm.infer_options``, what the library's svi fit starts
    from: without them the three objectives' different random draws pick different label-symmetric modes);
    ``path`` "recorded", "interpreter" or "pyro" (the objective). Guide creation, recording and its checks are
    inside the timed call."""
    x = gmm.simulate(seed=0, N=178, K=3, D=2).args[0]
    kwargs = {"K": 3, "covariance": "diag"}
    plan = ppl.compile(gmm.model, x, backend="svi", **kwargs)
    fmodel = chains.fit_model(gmm.model, plan.facts)

    def fit():
        with pyro.get_param_store().scope():
            pyro.set_rng_seed(0)
            guide = AutoNormal(poutine.block(fmodel, hide=list(plan.facts.enumerable)),
                               init_loc_fn=training.init_fn(gmm.init_locations(x, 3)))  # the svi backend's start
            if path == "pyro":
                elbo = training.make_elbo(plan.graph, plan.facts)
                step = training.traced_loss(training._unvalidated(
                    lambda: elbo.differentiable_loss(fmodel, guide, x, **kwargs)))
            else:
                step = compiled.guide_objective(fmodel, guide, (x,), kwargs, compiled.SitePlan.of(plan),
                                                trace=path == "recorded",
                                                record_after=training.record_after("adam", num_steps))
            history = training.optimize(step, num_steps, 0.02, False, "bench")
            OPTIMA[path] = sum(history[-100:]) / len(history[-100:])

    return fit


def cases(quick: bool) -> list[Case]:
    # a torch.optim optimizer's first use imports torch._dynamo (~1 s): paid here, not by the first timed peer
    torch.optim.Adam([torch.zeros(1, requires_grad=True)], fused=True)
    out = []
    for name in (("gmm", "hmm") if quick else MODEL_MODULES):
        ours, interpreter, theirs, why = _steps(name)
        note = "recorded" if why is None else f"interpreter: {why[:70]}"
        out.append(Case(f"{STEPS_PER_CALL} SVI steps (AutoNormal), models/{name}", ours,
                        {"interpreter": interpreter, "pyro ELBO": theirs}, note=note))
    steps = 200 if quick else 2000
    out.append(Case(f"GMM 178x2 K=3 AutoNormal, {steps} Adam steps", _mixture_fit(steps, "recorded"),
                    {"interpreter": _mixture_fit(steps, "interpreter"), "pyro ELBO": _mixture_fit(steps, "pyro")}))
    return out


def targets(rows) -> list[str]:
    """Issue 13: the 178-point GMM's 2000 AutoNormal steps in <= 2 s, at the same optimum."""
    out = []
    for row in rows:
        if row["task"].startswith("GMM 178x2") and "2000 Adam steps" in row["task"] and row["peer"] == "pyro ELBO":
            seconds = row["ours"]
            optima = ", ".join(f"{path} {value:.2f}" for path, value in sorted(OPTIMA.items()))
            out.append(f"GMM 178x2, 2000 AutoNormal steps: {seconds:.2f} s (target <= 2 s: "
                       f"{'met' if seconds <= 2 else 'not met'}); mean loss of the last 100 steps: {optima}")
    return out
