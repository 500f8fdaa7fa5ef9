"""Backend "mcmc": NUTS (Pyro) over the continuous latents, with finite discrete latents
enumerated and chains marginalized exactly by the exact kernels; several chains, run one
after another; R-hat, effective sample size, divergences and per-draw sampler statistics reported."""
from __future__ import annotations

import torch
from pyro.infer import MCMC, NUTS
from pyro.ops.stats import effective_sample_size, split_gelman_rubin

from ppl.analysis import Facts
from ppl.backends import Backend, Rule, Verdict
from ppl.posterior import LogEvidence, MCMCStats, Posterior

from .. import chains, training
from ..results import make_posterior

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


class _DrawStats:
    """MCMC hook recording, per draw after warmup, what Pyro's NUTS wrote: step size, whether the
    transition diverged, and its acceptance probability (recovered from the running mean Pyro keeps)."""

    def __init__(self):
        self.step_size, self.diverging, self.accept_prob = [], [], []
        self._divergences, self._mean = 0, 0.0

    def __call__(self, kernel, params, stage: str, i: int):
        if not stage.startswith("Sample"):
            return
        n, mean = i + 1, float(kernel._mean_accept_prob)
        self.accept_prob.append(min(1.0, max(0.0, n * mean - (n - 1) * self._mean)))
        self._mean = mean
        self.step_size.append(float(kernel.step_size))
        self.diverging.append(len(kernel._divergences) > self._divergences)
        self._divergences = len(kernel._divergences)

    def tensors(self) -> dict[str, torch.Tensor]:
        """statistic -> ``(draws,)``: "step_size", "diverging", "accept_prob"."""
        return {"step_size": torch.tensor(self.step_size, dtype=torch.float64),
                "diverging": torch.tensor(self.diverging, dtype=torch.bool),
                "accept_prob": torch.tensor(self.accept_prob, dtype=torch.float64)}


def _run_chain(fmodel, args, kwargs, plan, seed, num_samples, warmup_steps, progress, chain):
    torch.manual_seed(seed + chain)
    stats = _DrawStats()
    kernel = NUTS(fmodel, max_plate_nesting=training.max_plate_nesting(plan.graph), jit_compile=False)
    mcmc = MCMC(kernel, num_samples=num_samples, warmup_steps=warmup_steps, num_chains=1,
                disable_progbar=not progress, hook_fn=stats)
    mcmc.run(*args, **kwargs)
    return mcmc.get_samples(), stats.tensors()


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


def _mcmc_stats(draws: dict, per_chain: list[dict]) -> MCMCStats:
    num_chains, num_samples = next(iter(draws.values())).shape[:2]
    r_hat, ess = {}, {}
    for k, v in draws.items():
        if num_chains > 1 and num_samples > 3:
            r_hat[k] = split_gelman_rubin(v.double(), chain_dim=0, sample_dim=1)
        ess[k] = effective_sample_size(v.double(), chain_dim=0, sample_dim=1)
    per_draw = {k: torch.stack([c[k] for c in per_chain]) for k in per_chain[0]}
    return MCMCStats(r_hat=r_hat, ess=ess, divergences=int(per_draw["diverging"].sum()), per_draw=per_draw)


def run(model, args, kwargs, plan, num_samples: int = 500, warmup_steps: int | None = None, num_chains: int = 2,
        seed: int = 0, progress: bool = True, **unused) -> Posterior:
    """NUTS with ``num_chains`` chains of ``num_samples`` draws after ``warmup_steps`` (default num_samples);
    chain c is seeded with ``seed + c``. Chain posteriors are exact at the posterior mean of the globals;
    discrete marginals are averaged over up to MAX_PLUGIN_DRAWS draws."""
    if unused:
        raise TypeError(f"backend 'mcmc' got unexpected options: {', '.join(unused)}")
    if num_chains < 1 or num_samples < 1:
        raise ValueError(f"num_chains and num_samples must be >= 1, got {num_chains}, {num_samples}")
    warmup_steps = num_samples if warmup_steps is None else warmup_steps
    fmodel = chains.fit_model(model, plan.facts)
    runs = [_run_chain(fmodel, args, kwargs, plan, seed, num_samples, warmup_steps, progress, c)
            for c in range(num_chains)]
    graph = plan.graph
    draws = {k: torch.stack([r[0][k] for r in runs]).reshape((num_chains, num_samples) + graph.site(k).value_shape)
             for k in runs[0][0] if k in graph.nodes}
    point = {k: v.reshape((-1,) + v.shape[2:]).mean(0) for k, v in draws.items()}
    return make_posterior(
        plan, model, args, kwargs, draws=draws, log_evidence=LogEvidence(float("nan"), "not computed by mcmc"),
        point=point, tables=chains.chain_tables(model, args, kwargs, point, plan.facts.collapse_spec()),
        discrete=_averaged_marginals(model, args, kwargs, plan, draws),
        mcmc=_mcmc_stats(draws, [r[1] for r in runs]))


def _small_continuous(f: Facts) -> bool:
    return (not f.chains and not f.neural and not f.enumerable and not f.unenumerable
            and 0 < f.latent_dim <= SMALL_LATENT_DIM)


RULES = (
    Rule("small-continuous", _small_continuous, NAME,
         f"only continuous latents, {SMALL_LATENT_DIM} dims or fewer, no networks: NUTS gives the full posterior",
         order=50),
)

BACKEND = Backend(NAME, run=run, supports=supports, treatments=treatments, rules=RULES)
