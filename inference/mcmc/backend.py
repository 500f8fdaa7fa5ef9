"""Backend "mcmc": NUTS (``nuts.py``, several chains advanced in one batch) over the continuous latents, with
finite discrete latents enumerated and chains marginalized exactly by the exact kernels; R-hat, effective
sample sizes, divergences, tree depths and per-draw sampler statistics reported; a run can be continued
(``resume=``) and Ctrl-C returns the draws reached."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from pyro.ops.stats import effective_sample_size, split_gelman_rubin

import ppl

from ppl.analysis import Facts
from ppl.backends import Backend, Rule, Verdict
from ppl.posterior import LogEvidence, MCMCStats, Posterior

from .. import chains, training
from ..results import make_posterior
from . import nuts
from .potential import Layout, make_potential

NAME = "mcmc"
MAX_PLUGIN_DRAWS = 20
SMALL_LATENT_DIM = 20


def supports(facts: Facts) -> Verdict:
    """Runs models without networks whose markov_chains can be marginalized exactly and that have a continuous
    latent for NUTS to sample."""
    if facts.neural:
        return Verdict(False, f"site '{facts.neural[0]}' depends on a neural network (too many parameters for NUTS)")
    spec = facts.collapse_spec()
    uncollapsed = [c for c in facts.markov_chains if c not in spec.discrete]
    if uncollapsed:
        return Verdict(False, f"markov_chain '{uncollapsed[0]}' cannot be marginalized exactly, and NUTS cannot sample it")
    if facts.unenumerable:
        return Verdict(False, f"site '{facts.unenumerable[0]}' is discrete with infinite support")
    if not facts.continuous and not facts.gaussian_chains:
        return Verdict(False, "the model has no continuous latent for NUTS to sample")
    return Verdict(True)


def treatments(graph, facts: Facts):
    """Chains: message passing; finite discrete sites: enumerated; other latents: sampled by NUTS."""
    return chains.site_treatments(graph, facts, "sampled", "NUTS (Hamiltonian Monte Carlo)")


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
        marg = chains.discrete_marginals(model, args, kwargs, values, plan.graph, facts)
        if spec.discrete:
            marg.update(chains.chain_results(chains.chain_tables(model, args, kwargs, values, spec))[0])
        for k, v in marg.items():
            totals[k] = totals.get(k, 0) + v / len(subset)
    return totals


@dataclass(frozen=True)
class NUTSStats(MCMCStats):
    """``MCMCStats`` plus what only this sampler writes.

    ess_bulk, ess_tail: site -> ArviZ's rank-normalized bulk and tail ESS ``(*value_shape)`` (Vehtari et al.
                        2021; empty without the ``arviz`` extra)
    per_draw:           statistic -> ``(chains, draws)``: "diverging", "tree_depth", "n_steps", "step_size",
                        "accept_prob", "energy"
    state:              ``nuts.SamplerState`` where the chains stopped (positions, adapted step size and
                        mass matrix, random streams): ``resume=`` continues from it
    layout:             the flat unconstrained layout the state refers to
    """

    ess_bulk: dict[str, torch.Tensor] = field(default_factory=dict)
    ess_tail: dict[str, torch.Tensor] = field(default_factory=dict)
    state: nuts.SamplerState | None = None
    layout: Layout | None = None


def _arviz_ess(draws: dict[str, torch.Tensor]) -> tuple[dict, dict]:
    """(bulk, tail) ESS per site from draws ``(chains, draws, *shape)`` by ArviZ; ({}, {}) without arviz."""
    try:
        import arviz as az
    except ImportError:
        return {}, {}
    data = az.convert_to_dataset({k: v.detach().cpu().double().numpy() for k, v in draws.items()})
    out = []
    for method in ("bulk", "tail"):
        ess = az.ess(data, method=method)
        out.append({k: torch.as_tensor(ess[k].values, dtype=torch.float64) for k in draws})
    return out[0], out[1]


def _mcmc_stats(draws: dict, per_draw: dict, state, layout) -> NUTSStats:
    num_chains, num_samples = next(iter(draws.values())).shape[:2]
    r_hat, ess = {}, {}
    for k, v in draws.items():
        if num_chains > 1 and num_samples > 3:
            r_hat[k] = split_gelman_rubin(v.double(), chain_dim=0, sample_dim=1)
        ess[k] = effective_sample_size(v.double(), chain_dim=0, sample_dim=1)
    bulk, tail = _arviz_ess(draws) if num_samples > 3 else ({}, {})
    return NUTSStats(r_hat=r_hat, ess=ess, divergences=int(per_draw["diverging"].sum()), per_draw=per_draw,
                     ess_bulk=bulk, ess_tail=tail, state=state, layout=layout)


def _check_count(name: str, value, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"backend 'mcmc': {name} must be an integer >= {low}, got {value!r}")


def _check_options(num_samples, warmup_steps, num_chains, dense_mass, target_accept, max_tree_depth) -> None:
    """ValueError naming the first bad option, before any model is run."""
    _check_count("num_samples", num_samples, 1)
    if warmup_steps is not None:
        _check_count("warmup_steps", warmup_steps, 0)
    if num_chains is not None:
        _check_count("num_chains", num_chains, 1)
    _check_count("max_tree_depth", max_tree_depth, 1)
    if not isinstance(dense_mass, bool):
        raise ValueError(f"backend 'mcmc': dense_mass must be True or False, got {dense_mass!r}")
    if isinstance(target_accept, bool) or not isinstance(target_accept, (int, float)) or not 0 < target_accept < 1:
        raise ValueError(f"backend 'mcmc': target_accept must be a number in (0, 1), got {target_accept!r}")


def _resume_state(resume, model, num_chains, warmup_steps) -> NUTSStats:
    """The stats (with the sampler state) of the Posterior to continue; ValueError when it cannot be continued."""
    if not isinstance(resume, Posterior):
        raise ValueError(f"backend 'mcmc': resume= takes a Posterior of backend 'mcmc', got {type(resume).__name__}")
    stats = resume.mcmc
    if resume.backend != NAME or not isinstance(stats, NUTSStats) or stats.state is None:
        raise ValueError(f"backend 'mcmc': resume= needs a Posterior sampled by this NUTS (backend 'mcmc'); "
                         f"this one is from backend '{resume.backend}' and holds no sampler state")
    if resume.model is not model:
        raise ValueError(f"backend 'mcmc': resume= holds a fit of model '{getattr(resume.model, '__name__', '?')}', "
                         f"not of '{getattr(model, '__name__', '?')}'")
    chains_before = stats.state.z.shape[0]
    if num_chains is not None and num_chains != chains_before:
        raise ValueError(f"backend 'mcmc': resume= continues the {chains_before} chains of the previous run; "
                         f"got num_chains={num_chains}")
    if warmup_steps:
        raise ValueError(f"backend 'mcmc': resume= continues without warmup (the step size and mass matrix are "
                         f"kept); got warmup_steps={warmup_steps}")
    return stats


def run(model, args, kwargs, plan, num_samples: int = 500, warmup_steps: int | None = None,
        num_chains: int | None = None, seed: int = 0, progress: bool = True, dense_mass: bool = False,
        target_accept: float = 0.8, max_tree_depth: int = 10, resume: Posterior | None = None,
        **unused) -> Posterior:
    """NUTS (``nuts.sample``) with ``num_chains`` chains (default 2) advanced together, ``num_samples`` draws
    each after ``warmup_steps`` adaptation steps (default ``num_samples``).

    dense_mass: adapt a dense inverse mass matrix (else diagonal); target_accept: the acceptance statistic
    step-size adaptation aims at; max_tree_depth: at most ``2^max_tree_depth - 1`` leapfrog steps per draw;
    seed: chain c's random stream is ``nuts.chain_seeds(seed, num_chains)[c]`` (starting points from ``seed``).
    resume: a Posterior of this backend on the same model: continue its chains for ``num_samples`` more draws
    from their last state with the adapted step size and mass matrix (no warmup); the result holds all draws.
    Ctrl-C during the draws returns the draws reached (``post.interrupted``).

    Chain posteriors are exact at the posterior mean of the globals; discrete marginals are averaged over up to
    MAX_PLUGIN_DRAWS draws."""
    if unused:
        raise TypeError(f"backend 'mcmc' got unexpected options: {', '.join(unused)}")
    _check_options(num_samples, warmup_steps, num_chains, dense_mass, target_accept, max_tree_depth)
    before = _resume_state(resume, model, num_chains, warmup_steps) if resume is not None else None
    num_chains = before.state.z.shape[0] if before is not None else (num_chains or 2)
    warmup_steps = 0 if before is not None else (num_samples if warmup_steps is None else warmup_steps)
    potential = make_potential(model, args, kwargs, plan, num_chains)
    if before is not None and before.layout != potential.layout:
        raise ValueError(f"backend 'mcmc': resume= was sampled over latents {before.layout}, this model has "
                         f"{potential.layout}")
    result = nuts.sample(potential.potential_and_grad, potential.init, num_samples, warmup_steps, seed=seed,
                         dense_mass=dense_mass, target_accept=target_accept, max_tree_depth=max_tree_depth,
                         state=None if before is None else before.state, progress=progress)
    graph = plan.graph
    draws = {k: v.reshape((num_chains, v.shape[1]) + graph.site(k).value_shape)
             for k, v in potential.constrain(result.draws).items() if k in graph.nodes}
    per_draw = result.stats
    if before is not None:
        draws = {k: torch.cat([resume.draws[k], v], 1) for k, v in draws.items()}
        per_draw = {k: torch.cat([before.per_draw[k], v], 1) for k, v in per_draw.items()}
        plan = plan.with_options(resume=f"continued after {before.per_draw['diverging'].shape[1]} draws per chain")
    history = training.History()
    history.interrupted = result.interrupted
    point = {k: v.reshape((-1,) + v.shape[2:]).mean(0) for k, v in draws.items()}
    return make_posterior(
        plan, model, args, kwargs, draws=draws, log_evidence=LogEvidence(float("nan"), "not computed by mcmc"),
        point=point, tables=chains.chain_tables(model, args, kwargs, point, plan.facts.collapse_spec()),
        discrete=_averaged_marginals(model, args, kwargs, plan, draws), history=history,
        mcmc=_mcmc_stats(draws, per_draw, result.state, potential.layout))


def continue_sampling(post: Posterior, num_samples: int, progress: bool = True) -> Posterior:
    """``post``'s chains continued for ``num_samples`` more draws each (``ppl.infer(..., resume=post)`` on the
    model and data ``post`` holds): a new Posterior with all draws; ``post`` is left as it is."""
    return ppl.infer(post.model, *post.args, backend=NAME, model_kwargs=post.kwargs, num_samples=num_samples,
                     progress=progress, resume=post)


def _small_continuous(f: Facts) -> bool:
    return (not f.chains and not f.neural and not f.enumerable and not f.unenumerable
            and 0 < f.latent_dim <= SMALL_LATENT_DIM)


RULES = (
    Rule("small-continuous", _small_continuous, NAME,
         f"only continuous latents, {SMALL_LATENT_DIM} dims or fewer, no networks: NUTS gives the full posterior",
         order=50),
)

BACKEND = Backend(NAME, run=run, supports=supports, treatments=treatments, rules=RULES)
