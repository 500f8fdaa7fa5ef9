"""Backend "mcmc": NUTS (Pyro) over the continuous latents, with finite discrete latents
enumerated and chains marginalized exactly by the exact kernels; several chains, run one
after another; R-hat, effective sample size and divergences reported."""
from __future__ import annotations

import torch
from pyro.infer import MCMC, NUTS
from pyro.ops.stats import effective_sample_size, split_gelman_rubin

from ppl.posterior import LogEvidence, Posterior

from .. import common
from ..base import Verdict

NAME = "mcmc"
MAX_PLUGIN_DRAWS = 20


def supports(facts) -> Verdict:
    if facts.neural:
        return Verdict(False, f"site '{facts.neural[0]}' depends on a neural network (too many parameters for NUTS)")
    uncollapsed = [c for c in facts.chains if c not in facts.collapse_spec().discrete
                   and c not in facts.collapse_spec().gaussian]
    if [c for c in uncollapsed if c in facts.markov_chains]:
        return Verdict(False, f"markov_chain '{uncollapsed[0]}' cannot be marginalized exactly, and NUTS cannot sample it")
    if facts.unenumerable:
        return Verdict(False, f"site '{facts.unenumerable[0]}' is discrete with infinite support")
    if not facts.continuous and not facts.gaussian_chains:
        return Verdict(False, "the model has no continuous latent for NUTS to sample")
    return Verdict(True)


def treatments(graph, facts):
    return common.treatments(graph, facts, "sampled", "NUTS (Hamiltonian Monte Carlo)")


def _run_chain(fmodel, args, kwargs, plan, seed, num_samples, warmup_steps, progress, chain):
    torch.manual_seed(seed + chain)
    kernel = NUTS(fmodel, max_plate_nesting=common.max_plate_nesting(plan.graph), jit_compile=False)
    mcmc = MCMC(kernel, num_samples=num_samples, warmup_steps=warmup_steps, num_chains=1,
                disable_progbar=not progress)
    mcmc.run(*args, **kwargs)
    divergences = sum(len(v) for v in mcmc.diagnostics().get("divergences", {}).values())
    return mcmc.get_samples(), divergences


def _draws_subset(draws: dict, k: int) -> list[dict]:
    flat = {n: v.reshape((-1,) + v.shape[2:]) for n, v in draws.items()}
    total = next(iter(flat.values())).shape[0]
    idx = torch.linspace(0, total - 1, min(k, total)).long()
    return [{n: v[i] for n, v in flat.items()} for i in idx]


def _averaged_marginals(model, args, kwargs, plan, draws) -> dict:
    """Discrete and chain marginals averaged over up to MAX_PLUGIN_DRAWS posterior draws."""
    facts, spec = plan.facts, plan.facts.collapse_spec()
    totals: dict = {}
    subset = _draws_subset(draws, MAX_PLUGIN_DRAWS)
    for values in subset:
        marg = common.discrete_marginals(model, args, kwargs, values, plan.graph, facts)
        if spec.discrete:
            marg.update(common.chain_results(common.chain_tables(model, args, kwargs, values, spec))[0])
        for k, v in marg.items():
            totals[k] = totals.get(k, 0) + v / len(subset)
    return totals


def run(model, args, kwargs, plan, num_samples: int = 500, warmup_steps: int | None = None, num_chains: int = 2,
        seed: int = 0, progress: bool = True, **unused) -> Posterior:
    """NUTS with ``num_chains`` chains of ``num_samples`` draws after ``warmup_steps`` (default num_samples)."""
    if unused:
        raise TypeError(f"backend 'mcmc' got unexpected options: {', '.join(unused)}")
    if num_chains < 1 or num_samples < 1:
        raise ValueError(f"num_chains and num_samples must be >= 1, got {num_chains}, {num_samples}")
    warmup_steps = num_samples if warmup_steps is None else warmup_steps
    fmodel = common.fit_model(model, plan.facts)
    runs = [_run_chain(fmodel, args, kwargs, plan, seed, num_samples, warmup_steps, progress, c)
            for c in range(num_chains)]
    graph = plan.graph
    draws = {k: torch.stack([r[0][k] for r in runs]).reshape((num_chains, num_samples) + graph.site(k).value_shape)
             for k in runs[0][0] if k in graph.nodes}
    diagnostics = {"divergences": sum(r[1] for r in runs), "r_hat": {}, "ess": {}}
    for k, v in draws.items():
        if num_chains > 1 and num_samples > 3:
            diagnostics["r_hat"][k] = split_gelman_rubin(v.double(), chain_dim=0, sample_dim=1)
        diagnostics["ess"][k] = effective_sample_size(v.double(), chain_dim=0, sample_dim=1)
    point = {k: v.reshape((-1,) + v.shape[2:]).mean(0) for k, v in draws.items()}
    spec = plan.facts.collapse_spec()
    tables = common.chain_tables(model, args, kwargs, point, spec) if spec else {}
    _, paths, means = common.chain_results(tables)
    diagnostics.update(point=point, smoothed_means=means)
    latent = tuple(s.name for s in graph.latent())
    return Posterior(plan=plan, draws=draws, log_evidence=LogEvidence(float("nan"), "not computed by mcmc"),
                     discrete=_averaged_marginals(model, args, kwargs, plan, draws), map_paths=paths,
                     diagnostics=diagnostics, chain_sampler=common.chain_sampler(tables) if tables else None,
                     predictive_fn=common.predictive(model, args, kwargs, latent))
