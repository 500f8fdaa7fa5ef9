"""Backend "svi": stochastic variational inference in Pyro.

Finite discrete latents are enumerated (TraceEnum_ELBO), chains that an exact kernel can
marginalize are collapsed, and the remaining continuous latents get an AutoNormal
(``guide="normal"``) or AutoDelta (``guide="delta"``, MAP) guide.
"""
from __future__ import annotations

import pyro
import pyro.poutine as poutine
import torch
from pyro.infer import Predictive, Trace_ELBO, TraceEnum_ELBO
from pyro.infer.autoguide import AutoDelta, AutoNormal, init_to_median, init_to_value

from ppl.posterior import LogEvidence, Posterior

from .. import common
from ..base import Verdict

NAME = "svi"
GUIDES = {"normal": AutoNormal, "delta": AutoDelta}


def supports(facts) -> Verdict:
    untabulable = [c for c in facts.markov_chains if not facts.tabulable.get(c)]
    if untabulable:
        return Verdict(False, f"markov_chain '{untabulable[0]}' cannot be tabulated over its states "
                              "(its children must use its value elementwise and be sites of the model)")
    if facts.unenumerable:
        return Verdict(False, f"site '{facts.unenumerable[0]}' is discrete with infinite support")
    return unplated_verdict(facts)


def unplated_verdict(facts) -> Verdict:
    """Batch dims outside every plate (``facts.unplated``, e.g. N sequences batched in a chain's own shape).

    Trace_ELBO sums every log-density over all its dims, so such dims are fine when they lie left of all the
    model's plates (``make_elbo`` passes ``max_plate_nesting`` so that Pyro's shape check leaves them alone).
    Two layouts cannot run: a dim among the plate dims that no plate of the site indexes (Pyro's shape check
    rejects it), and any such dim when finite discrete sites are enumerated (the enumeration dims sit left of
    the plates, where these dims are).
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


def treatments(graph, facts):
    return common.treatments(graph, facts, "guide", "AutoNormal guide (mean-field Gaussian in unconstrained space)")


def make_elbo(graph, facts, num_particles: int = 1):
    if facts.enumerable:
        return TraceEnum_ELBO(max_plate_nesting=common.max_plate_nesting(graph), num_particles=num_particles)
    # dims left of the plates are the model's own batch dims (see unplated_verdict): summed, not checked
    return Trace_ELBO(max_plate_nesting=facts.plate_nesting, num_particles=num_particles)


def init_fn(init: dict | None):
    """Initialize latents at ``init`` (site -> value) where given, else at the prior median.

    Each value is copied: an autoguide may make its parameter from the very tensor it is given, so without the
    copy a fit would write into the user's tensor, and one tensor given for two sites would tie their parameters.
    """
    fallback = init_to_median(num_samples=15)
    if not init:
        return fallback
    values = {site: torch.as_tensor(value).detach().clone() for site, value in init.items()}
    return init_to_value(values=values, fallback=fallback)


def fit(model, args, kwargs, plan, guide_kind: str, num_steps: int, lr: float, progress: bool,
        init: dict | None = None):
    """Fit a guide on the collapsed/enumerated model; returns (fit model, guide, elbo, history)."""
    if guide_kind not in GUIDES:
        raise ValueError(f"guide must be one of {sorted(GUIDES)}, got {guide_kind!r}")
    facts, graph = plan.facts, plan.graph
    fmodel = common.fit_model(model, facts)
    hidden = poutine.block(fmodel, hide=list(facts.enumerable))
    unknown = sorted(set(init or {}) - set(graph.nodes))
    if unknown:
        raise ValueError(f"init names unknown site(s) {unknown}; latent sites are {[s.name for s in graph.latent()]}")
    guide = GUIDES[guide_kind](hidden, init_loc_fn=init_fn(init))
    elbo = make_elbo(graph, facts)
    step = common.traced_loss(lambda: elbo.differentiable_loss(fmodel, guide, *args, **kwargs))
    history = common.optimize(step, num_steps, lr, progress, f"{NAME} ({guide_kind})")
    return fmodel, guide, elbo, history


def run(model, args, kwargs, plan, num_steps: int = 2000, lr: float = 0.02, num_samples: int = 1000,
        guide: str = "normal", init: dict | None = None, progress: bool = True, **unused) -> Posterior:
    """Fit and collect the posterior: guide draws, plug-in discrete/chain posteriors at the guide median.

    Options: num_steps, lr (Adam), num_samples (guide draws kept), guide ("normal" or "delta"),
    init (site -> initial value, e.g. data points for mixture locations).
    """
    if unused:
        raise TypeError(f"backend 'svi' got unexpected options: {', '.join(unused)}")
    fmodel, g, elbo, history = fit(model, args, kwargs, plan, guide, num_steps, lr, progress, init)
    return collect(model, args, kwargs, plan, fmodel, g, elbo, history, num_samples, kind="elbo")


def collect(model, args, kwargs, plan, fmodel, guide, elbo, history, num_samples, kind) -> Posterior:
    """Build the Posterior from a fitted guide."""
    facts, graph = plan.facts, plan.graph
    with torch.no_grad():
        draws = {k: v.detach().reshape((num_samples,) + graph.site(k).value_shape) for k, v in
                 Predictive(guide, num_samples=num_samples, parallel=False)(*args, **kwargs).items()
                 if k in graph.nodes and not graph.site(k).observed}
        point = {k: v.detach() for k, v in guide.median(*args, **kwargs).items()}
        evidence = -sum(float(elbo.loss(fmodel, guide, *args, **kwargs)) for _ in range(5)) / 5
    spec = facts.collapse_spec()
    tables = common.chain_tables(model, args, kwargs, point, spec) if spec else {}
    marg, paths, means = common.chain_results(tables)
    marg.update(common.discrete_marginals(model, args, kwargs, point, graph, facts))
    latent = tuple(s.name for s in graph.latent())
    return Posterior(plan=plan, draws={k: v.unsqueeze(0) for k, v in draws.items()},
                     log_evidence=LogEvidence(evidence, kind), discrete=marg, map_paths=paths,
                     history=history, diagnostics={"point": point, "smoothed_means": means},
                     params={k: v.detach().clone() for k, v in pyro.get_param_store().items()},
                     chain_sampler=common.chain_sampler(tables) if tables else None,
                     predictive_fn=common.predictive(model, args, kwargs, latent))

