"""Backend "exact": chains marginalized by exact message passing, globals by MAP.

Every latent chain is collapsed (forward algorithm for a ``markov_chain`` whose children are
tabulated state by state; Kalman filter for a ``gaussian_chain`` with linear-Gaussian
children), finite discrete latents are enumerated, and the remaining continuous latents and
parameters are fitted by maximizing the exact log joint ``log p(data, globals)`` (MAP, by
L-BFGS on the collapsed model, from data-driven restarts: ``fit_settings``). The chains' posteriors (marginals, Viterbi, smoothed means,
exact samples) are then computed at the MAP globals, and ``log_evidence`` is the exact
``log p(data | globals_MAP)``.
"""
from __future__ import annotations

import inspect

import pyro
import torch

from ppl.analysis import Facts
from ppl.backends import Backend, Rule, Verdict, needs_normalized_density
from ppl.posterior import LogEvidence, Posterior

from .. import chains, initialization, training
from ..checkpoints import Checkpoints
from ..results import make_posterior, warn_if_nearly_empty

NAME = "exact"


@needs_normalized_density
def supports(facts: Facts) -> Verdict:
    """Runs when every chain can be marginalized exactly and something (a chain or a finite discrete
    latent) is left to marginalize; names the chain or fact that stops it otherwise."""
    if facts.continuous and not facts.chains and not facts.enumerable:
        return Verdict(False, "the model has only continuous latents and no chain or finite discrete latent "
                              "to marginalize")
    for chain in facts.markov_chains:
        if not facts.tabulable.get(chain):
            return Verdict(False, f"markov_chain '{chain}' cannot be tabulated: its children do not use its "
                                  "value elementwise")
    for m, g in facts.switching:
        return Verdict(False, f"gaussian_chain '{g}' is switched by markov_chain '{m}' (a switching LDS): "
                              "its exact posterior is a mixture of exponentially many Gaussians")
    for chain in facts.gaussian_chains:
        if not facts.linear_gaussian.get(chain):
            return Verdict(False, f"gaussian_chain '{chain}' has children that are not linear-Gaussian in it "
                                  "(their log-density is not quadratic in the path, or a child is latent)")
    return Verdict(True)


def fit_settings() -> str:
    """The global fit's effective default settings in words, for the rules' reasons in ``plan.explain()`` (read
    from ``run``'s signature and the initializer's constants, so that they cannot drift from what runs; the plan's
    ``options`` line shows the values a call overrides)."""
    run_defaults = {k: p.default for k, p in inspect.signature(run).parameters.items()}
    start_steps = initialization.START_STEPS
    rel_tol = inspect.signature(training.optimize_lbfgs).parameters["rel_tol"].default
    return (f"L-BFGS, no closed-form M-step (conjugate models route to 'vi'): <= num_steps={run_defaults['num_steps']} "
            f"evaluations, stop when {training.LBFGS_BLOCK_ITERS} iterations change it by < {rel_tol:g} x "
            f"(1 + |objective|); restarts={run_defaults['restarts']}: init=, then distinct k-means++ labellings -> "
            "complete-data MAP (from the prior mean, the median where it is infinite; rounds of <= "
            f"{start_steps} evaluations until converged; one round of <= {start_steps // 5} warm-started), "
            f"successive halving by rounds of {SCREEN_EVALS} evaluations (every start, then the better half rounded "
            "up, ...), the last one fitted on (the same L-BFGS run continued)")


def treatments(graph, facts: Facts):
    """Chains: message passing; finite discrete sites: enumerated; other latents: MAP point estimates."""
    return chains.site_treatments(graph, facts, "point estimate",
                                  "MAP on the exact marginal likelihood (L-BFGS on the compiled log density)")


def run(model, args, kwargs, plan, num_steps: int = 500, lr: float = 0.05, num_samples: int = 100,
        init: dict | None = None, optimizer: str = "lbfgs", restarts: int = 3, seed: int = 0,
        progress: bool = True, checkpoint: str | None = None, checkpoint_every: int = 100,
        resume: str | None = None, **unused) -> Posterior:
    """MAP-fit the globals on the collapsed model, then exact chain posteriors at the MAP.

    Options: optimizer ("lbfgs": L-BFGS on the exact log joint, at most ``num_steps`` evaluations, stopping at
    convergence; "adam": ``num_steps`` Adam steps of rate ``lr``), init (site -> initial value: the first
    start), restarts (how many starts at most; beyond ``init``, data-driven ones from k-means hard assignments
    of the finite discrete latents, distinct labellings only, ``inference/initialization.py``; the fit with the
    best objective is kept;
    with L-BFGS and ``num_steps <= 60`` only the first start runs, as screening needs up to 30 evaluations a start),
    seed (of the k-means++ seeding), num_samples (exact chain draws kept), checkpoint (a file written every
    ``checkpoint_every`` steps, at the end and on Ctrl-C), resume (a checkpoint file of the same fit: continues it
    bit-identically, ``inference/checkpoints.py``). Warns ``DegenerateFit`` when a state of a discrete latent ends
    empty or nearly so, or two states coincide (``warn_if_nearly_empty``) and ``training.NotConverged`` when the
    objective still moved.
    """
    if unused:
        raise TypeError(f"backend 'exact' got unexpected options: {', '.join(unused)}")
    if not isinstance(restarts, int) or isinstance(restarts, bool) or restarts < 1:
        raise ValueError(f"restarts must be an integer >= 1, got {restarts!r}")
    if optimizer not in training.OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {training.OPTIMIZERS}, got {optimizer!r}")
    checkpoints = Checkpoints.from_options(checkpoint, checkpoint_every, resume)
    facts, graph = plan.facts, plan.graph
    spec = facts.collapse_spec()
    history, point = [], {}
    fmodel = chains.fit_model(model, facts)
    if facts.continuous or _has_params(model, args, kwargs, spec):
        starts = [init] if init else []
        if restarts > len(starts) and facts.continuous:
            starts += initialization.data_driven_starts(model, args, kwargs, plan, restarts - len(starts), seed)
        point, history = _best_map(fmodel, args, kwargs, plan, starts or [None], num_steps, lr, optimizer, progress,
                                   checkpoints)
    tables = chains.chain_tables(model, args, kwargs, point, spec)
    with torch.no_grad():
        evidence = _log_likelihood(model, fmodel, args, kwargs, point, plan)
    post = make_posterior(
        plan, model, args, kwargs, draws={k: v[None, None] for k, v in point.items()},
        log_evidence=LogEvidence(evidence, "exact log p(data | MAP globals)" if point else "exact log p(data)"),
        point=point, tables=tables, history=history,
        discrete=chains.discrete_marginals(model, args, kwargs, point, graph, facts))
    if point:
        warn_if_nearly_empty(post.discrete, NAME)
    return post


SCREEN_EVALS = 10  # L-BFGS evaluations of one screening round (successive halving: ``_best_map``)


def _map_fit(fmodel, args, kwargs, plan, start, state, num_steps, lr, optimizer, progress, desc, warn=True,
             checkpoints=None, memory=None):
    """One MAP fit from ``start`` in the parameter store ``state`` (a fresh one if None), L-BFGS continuing the run
    whose final state is ``memory`` (``training.optimize_lbfgs``): (best objective, store state after, point,
    history)."""
    with pyro.get_param_store().scope(state) as state:
        guide, _, history = training.fit_guide(fmodel, args, kwargs, plan, "delta", num_steps, lr, progress,
                                               start, desc=desc, optimizer=optimizer, warn=warn,
                                               checkpoints=checkpoints, memory=memory)
        with torch.no_grad():
            point = {k: v.detach() for k, v in guide.median(*args, **kwargs).items()}
    return min(history), state, point, history


def _continued(run, more) -> tuple:
    """``run`` (a ``_map_fit`` result) followed by ``more``, the fit that continued it: best objective, state and
    point of ``more``, the two histories joined (L-BFGS memory and interruption of ``more``)."""
    history = training.History(run[3] + more[3])
    history.interrupted, history.lbfgs = more[3].interrupted, getattr(more[3], "lbfgs", None)
    return min(history), more[1], more[2], history


def _best_map(fmodel, args, kwargs, plan, starts: list, num_steps: int, lr: float, optimizer: str,
              progress: bool, checkpoints=None) -> tuple[dict, list[float]]:
    """MAP by restarts, each start in its own parameter store. L-BFGS: successive halving; every start gets
    ``SCREEN_EVALS`` evaluations, the better half (rounded up) ``SCREEN_EVALS`` more each (the same L-BFGS runs
    continued, curvature pairs kept), and so on until one is left, which is fitted to convergence within
    ``num_steps`` evaluations in all (3 starts: 3 x 10 + 2 x 10 evaluations of screening, where every start had
    30 before: on the sunspot and El Nino HMMs and iris the same winner, the starts' rankings after 10 and 20
    evaluations already those after 30). Adam: every start runs ``num_steps`` steps. The winner's parameters are
    loaded into the current store; returns its point and objective history (screening included)."""
    if len(starts) == 1 or (optimizer == "lbfgs" and num_steps <= 6 * SCREEN_EVALS):
        starts = starts[:1]
    screen = SCREEN_EVALS if optimizer == "lbfgs" and len(starts) > 1 else num_steps
    runs = []
    for i, start in enumerate(starts):
        runs.append(_map_fit(fmodel, args, kwargs, plan, start, None, screen, lr, optimizer, progress,
                             NAME if len(starts) == 1 else f"{NAME} start {i + 1}/{len(starts)}",
                             warn=screen == num_steps, checkpoints=checkpoints))
        if runs[-1][3].interrupted:  # Ctrl-C: no further starts, no continuation
            break
    used = screen
    while len(runs) > 1 and not runs[-1][3].interrupted:
        runs = sorted(runs, key=lambda r: r[0])[:(len(runs) + 1) // 2]
        if len(runs) == 1:
            break
        runs = [_continued(r, _map_fit(fmodel, args, kwargs, plan, r[2], r[1], screen, lr, optimizer, progress,
                                       f"{NAME} screening", warn=False, checkpoints=checkpoints,
                                       memory=getattr(r[3], "lbfgs", None))) for r in runs]
        used += screen
    best = min(runs, key=lambda r: r[0])
    if used < num_steps and screen < num_steps and not best[3].interrupted:
        best = _continued(best, _map_fit(fmodel, args, kwargs, plan, best[2], best[1], num_steps - used, lr,
                                         optimizer, progress, NAME, checkpoints=checkpoints,
                                         memory=getattr(best[3], "lbfgs", None)))
    _, state, point, history = best
    pyro.get_param_store().set_state(state)
    return point, history


def _has_params(model, args, kwargs, spec) -> bool:
    """Does the model declare learnable ``ppl.param``/``ppl.module`` parameters?"""
    trace = pyro.poutine.trace(chains.collapse(model, spec)).get_trace(*args, **kwargs)
    return any(site["type"] == "param" for site in trace.nodes.values())


def _log_likelihood(model, fmodel, args, kwargs, point, plan) -> float:
    """log p(data | globals) with every chain and enumerable site marginalized exactly: the exact
    log joint at the point (an ELBO with no latent left is exact) minus the log-density of the
    MAP globals and of the sites fixed by ``ppl.condition`` (they are not data)."""
    fixed = pyro.poutine.condition(fmodel, data=point)
    elbo = training.make_elbo(plan.graph, plan.facts)
    joint = -elbo.loss(fixed, lambda *a, **k: None, *args, **kwargs)
    trace = pyro.poutine.trace(fixed).get_trace(*args, **kwargs)
    not_data = set(point) | set(getattr(model, "fixed_sites", ()))
    prior = sum(float(trace.nodes[name]["fn"].log_prob(trace.nodes[name]["value"]).sum()) for name in not_data
                if name in trace.nodes)
    return joint - prior


def _nothing_latent(f: Facts) -> bool:
    return not (f.chains or f.enumerable or f.unenumerable or f.continuous)


def _discrete_only(f: Facts) -> bool:
    return bool(f.enumerable) and not (f.chains or f.unenumerable or f.continuous)


def _discrete_with_globals(f: Facts) -> bool:
    return (bool(f.enumerable) and bool(f.continuous) and not (f.chains or f.unenumerable or f.continuous_local))


def _exact_chains(f: Facts) -> bool:
    return bool(f.chains) and f.exactly_collapsible and not f.unenumerable


RULES = (
    Rule("nothing-latent", _nothing_latent, NAME,
         "every random variable is observed or fixed: the log-likelihood is evaluated exactly", order=10),
    Rule("discrete-only", _discrete_only, NAME,
         "the only latents are finite discrete ones (e.g. a mixture with its globals fixed): they are summed "
         "out by enumeration, so the log-likelihood and their posteriors are exact", order=20),
    Rule("discrete-with-globals", _discrete_with_globals, NAME,
         "finite discrete latents (e.g. mixture assignments) are summed out exactly and the global parameters "
         "fitted by MAP on the exact marginal likelihood: EM-quality fits at a fraction of SVI's cost; "
         "backend='svi' or 'mcmc' gives uncertainty over the globals. Fit: " + fit_settings(), order=25),
    Rule("exact-chains", _exact_chains, NAME,
         "every latent chain is marginalized exactly by message passing (forward-backward / Kalman); "
         "global parameters (and any network weights) by MAP on the exact marginal likelihood. Fit: " + fit_settings(),
         order=30),
)

BACKEND = Backend(NAME, run=run, supports=supports, treatments=treatments, rules=RULES)
