"""Backend "svi": stochastic variational inference in Pyro.

Finite discrete latents are enumerated (TraceEnum_ELBO), chains that an exact kernel can
marginalize are collapsed, and the remaining continuous latents get an AutoNormal
(``guide="normal"``) or AutoDelta (``guide="delta"``, MAP) guide.
"""
from __future__ import annotations

from typing import Callable

import torch
from pyro.infer import Predictive

from ppl.analysis import Facts
from ppl.backends import Backend, Rule, Verdict, needs_normalized_density
from ppl.posterior import LogEvidence, Posterior

from .. import chains, training
from ..checkpoints import Checkpoints
from ..results import make_posterior

NAME = "svi"


@needs_normalized_density
def supports(facts: Facts) -> Verdict:
    """Runs any model whose markov_chains can be tabulated, whose discrete latents are finite and whose batch
    dims outside plates Pyro's ELBO accepts (``unplated_verdict``)."""
    untabulable = [c for c in facts.markov_chains if not facts.tabulable.get(c)]
    if untabulable:
        return Verdict(False, f"markov_chain '{untabulable[0]}' cannot be tabulated over its states "
                              "(its children must use its value elementwise and be sites of the model)")
    if facts.unenumerable:
        return Verdict(False, f"site '{facts.unenumerable[0]}' is discrete with infinite support")
    return unplated_verdict(facts)


def unplated_verdict(facts: Facts) -> Verdict:
    """Batch dims outside every plate (``facts.unplated``, e.g. N sequences batched in a chain's own shape).

    Trace_ELBO sums every log-density over all its dims, so such dims are fine when they lie left of all the
    model's plates (``training.make_elbo`` passes ``max_plate_nesting`` so that Pyro's shape check leaves them
    alone). Two layouts cannot run: a dim among the plate dims that no plate of the site indexes (Pyro's shape
    check rejects it), and any such dim when finite discrete sites are enumerated (the enumeration dims sit left
    of the plates, where these dims are).
    """
    nesting = facts.plate_nesting
    fix = "wrap that dim in ppl.plate(...) (or use backend='svae' for a structured VAE)"
    for site, dims in facts.unplated.items():
        for dim, size in dims:
            shape = f"batch dim {dim} of size {size}"
            if dim >= -nesting:
                return Verdict(False, f"site '{site}' has {shape} outside its plates but among the model's "
                                      f"{nesting} plate dims; {fix}")
            if facts.enumerable:
                return Verdict(False, f"site '{site}' has {shape} outside any plate, where enumerating "
                                      f"'{facts.enumerable[0]}' puts its own dims; {fix}")
    return Verdict(True)


def treatments(graph, facts: Facts):
    """Chains: message passing; finite discrete sites: enumerated; other latents: the guide."""
    return chains.site_treatments(graph, facts, "guide",
                                  "AutoNormal guide (mean-field Gaussian in unconstrained space), "
                                  "ELBO on the compiled log density")


def run(model, args, kwargs, plan, num_steps: int = 2000, lr: float = 0.02, num_samples: int = 1000,
        guide: str | Callable = "normal", init: dict | None = None, progress: bool = True,
        checkpoint: str | None = None,
        checkpoint_every: int = 100, resume: str | None = None, **unused) -> Posterior:
    """Fit and collect the posterior: guide draws, plug-in discrete/chain posteriors at the guide median.

    Options: num_steps, lr (Adam), num_samples (guide draws kept), guide ("normal", "delta", or a guide factory
    ``(model, init_loc_fn=...) -> autoguide`` such as ``ppl.flow_guide("iaf")``: a normalizing-flow guide),
    init (site -> initial value, e.g. data points for mixture locations), checkpoint (a file written every
    ``checkpoint_every`` steps, at the end and on Ctrl-C), resume (a checkpoint file of the same fit: continues it
    bit-identically, ``inference/checkpoints.py``).
    """
    if unused:
        raise TypeError(f"backend 'svi' got unexpected options: {', '.join(unused)}")
    checkpoints = Checkpoints.from_options(checkpoint, checkpoint_every, resume)
    fmodel = chains.fit_model(model, plan.facts)
    fitted, elbo, history = training.fit_guide(fmodel, args, kwargs, plan, guide, num_steps, lr, progress, init,
                                               desc=NAME, checkpoints=checkpoints)
    return _collect(model, args, kwargs, plan, fmodel, fitted, elbo, history, num_samples)


def _collect(model, args, kwargs, plan, fmodel, guide, elbo, history, num_samples) -> Posterior:
    """The Posterior of a fitted guide: its draws, the ELBO (mean of 5), chain/discrete posteriors at its median."""
    facts, graph = plan.facts, plan.graph
    with torch.no_grad():
        draws = {k: v.detach().reshape((num_samples,) + graph.site(k).value_shape) for k, v in
                 Predictive(guide, num_samples=num_samples, parallel=False)(*args, **kwargs).items()
                 if k in graph.nodes and not graph.site(k).observed}
        point = {k: v.detach() for k, v in guide.median(*args, **kwargs).items()}
        evidence = -sum(float(elbo.loss(fmodel, guide, *args, **kwargs)) for _ in range(5)) / 5
    return make_posterior(
        plan, model, args, kwargs, draws={k: v.unsqueeze(0) for k, v in draws.items()},
        log_evidence=LogEvidence(evidence, "elbo"), point=point, history=history,
        tables=chains.chain_tables(model, args, kwargs, point, facts.collapse_spec()),
        discrete=chains.discrete_marginals(model, args, kwargs, point, graph, facts))


RULES = (
    Rule("default-svi", lambda f: True, NAME,
         "stochastic variational inference: finite discrete latents enumerated, chains collapsed where exact, "
         "continuous latents fitted by an AutoNormal guide", order=1000),
)

BACKEND = Backend(NAME, run=run, supports=supports, treatments=treatments, rules=RULES)
