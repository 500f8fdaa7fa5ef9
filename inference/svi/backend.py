"""Backend "svi": stochastic variational inference in Pyro.

Finite discrete latents are enumerated (TraceEnum_ELBO), chains that an exact kernel can
marginalize are collapsed, and the remaining continuous latents get an AutoNormal
(``guide="normal"``) or AutoDelta (``guide="delta"``, MAP) guide.
"""
from __future__ import annotations

from typing import Callable

import torch
from pyro.infer import Predictive
from pyro.poutine.messenger import Messenger

from ppl.analysis import Facts
from ppl.backends import Backend, Rule, Verdict, needs_normalized_density
from ppl.posterior import LogEvidence, Posterior

from .. import chains, compiled, distributed, training
from ..checkpoints import Checkpoints
from ..minibatch import batch_rows, check_batch_size, data_plate, minibatch
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
        checkpoint_every: int = 100, resume: str | None = None, batch_size: int | None = None,
        **unused) -> Posterior:
    """Fit and collect the posterior: guide draws, plug-in discrete/chain posteriors at the guide median.

    Options: num_steps, lr (Adam), num_samples (guide draws kept), guide ("normal", "delta", or a guide factory
    ``(model, init_loc_fn=...) -> autoguide`` such as ``ppl.flow_guide("iaf")``: a normalizing-flow guide),
    init (site -> initial value, e.g. data points for mixture locations), checkpoint (a file written every
    ``checkpoint_every`` steps, at the end and on Ctrl-C), resume (a checkpoint file of the same fit: continues it
    bit-identically, ``inference/checkpoints.py``), batch_size (rows of the data plate per step, all processes
    together, the plate's sites scaled by N / B: ``Minibatches``; global latents only). lr follows
    ``training.cosine_tail`` (constant for the first half of the steps, then a cosine down to a tenth): the
    one-draw ELBO gradient is noisy with or without minibatches, and a constant step leaves the last iterate
    wherever the noise put it (a Bayesian linear regression's AutoNormal means: 0.11-0.51 posterior sd from the
    optimum at seeds 0-3 with a constant step, 0.07-0.21 with the tail). Data parallel under an
    initialized ``torch.distributed`` process group: each process fits its share of every batch, gradients
    averaged (``inference/distributed.py``).
    """
    if unused:
        raise TypeError(f"backend 'svi' got unexpected options: {', '.join(unused)}")
    check_batch_size(batch_size, NAME)
    checkpoints = Checkpoints.from_options(checkpoint, checkpoint_every, resume)
    fmodel = chains.fit_model(model, plan.facts)
    fit_model, after_backward = fmodel, None
    if batch_size is not None or distributed.world()[1] > 1:
        fit_model = Minibatches(fmodel, args, kwargs, plan, batch_size)
        progress, checkpoints = distributed.main_only(progress, checkpoints)
        after_backward = distributed.average_gradients
    fitted, elbo, history = training.fit_guide(fit_model, args, kwargs, plan, guide, num_steps, lr, progress, init,
                                               desc=NAME, checkpoints=checkpoints, after_backward=after_backward,
                                               schedule=training.cosine_tail, trace=fit_model is fmodel)
    training.warn_if_still_moving(history, NAME)
    return _collect(model, args, kwargs, plan, fmodel, fitted, elbo, history, num_samples)


def estimate_elbo(loss: Callable[[], float], tol: float = 0.05, batch: int = 10, most: int = 200) -> float:
    r"""The ELBO as the mean of one-draw estimates ``-loss()``, drawn ``batch`` at a time until the standard error
    of the mean is below ``tol`` nats or ``most`` were drawn: :math:`\hat L = -\frac1S \sum_s \ell_s`,
    :math:`\mathrm{se} = \mathrm{sd}(\ell) / \sqrt S`. (Five draws, as before, left errors of ~0.3 nats on a
    2-latent model: enough to rank two guides wrongly.)"""
    losses: list[float] = []
    while len(losses) < most:
        losses.extend(loss() for _ in range(batch))
        values = torch.tensor(losses, dtype=torch.float64)
        if not bool(torch.isfinite(values).all()) or float(values.std() / len(losses) ** 0.5) < tol:
            break
    return -float(torch.tensor(losses, dtype=torch.float64).mean())


class _ScalePlate(Messenger):
    """Multiplies the scale of every sample site inside plate ``plate`` by ``factor`` (the compiled log density
    and Pyro's ELBOs both read a site's scale)."""

    def __init__(self, plate: str, factor: float):
        super().__init__()
        self.plate, self.factor = plate, factor

    def _pyro_sample(self, msg):
        if any(frame.name == self.plate for frame in msg["cond_indep_stack"]):
            msg["scale"] = msg["scale"] * self.factor


class Minibatches:
    r"""The model on a minibatch of its data plate, for a guide whose latents are all global.

    Called like the model (its own arguments are ignored), it draws B distinct rows of the N in the data plate
    (``minibatch.batch_rows``, the same rows on every process: same seed), keeps this process's B/W
    (``distributed.shard``) and runs the model on them with the plate's sites scaled by :math:`N/(B/W)`:

    .. math:: \log p(\theta) + \frac{N}{B/W}\sum_{n \in B_r} \log p(x_n \mid \theta),

    unbiased for the full log joint; with the gradients averaged over the W processes the step equals one process
    on the whole batch. Its data change from call to call, so the fit runs it in the interpreter (a recorded
    density, ``compiled.TracedDensity``, would keep the first batch). Finite discrete latents of the plate
    (enumerated, no guide parameters) are allowed; a continuous local latent (its guide parameters live on every
    row) or a chain is refused with a ValueError naming the site (``backend='amortized'`` fits local latents
    on minibatches with an encoder).
    """

    def __init__(self, fmodel: Callable, args: tuple, kwargs: dict, plan, batch_size: int | None):
        self.fmodel, self.args, self.kwargs = fmodel, args, kwargs
        self.plate, self.size = _data_plate(plan)
        self.batch_size = self.size if batch_size is None else min(batch_size, self.size)
        self.mine = distributed.shard(self.batch_size)

    def model_on(self, rows: torch.Tensor) -> Callable:
        """The model on ``rows`` of the data plate, its sites scaled by N / len(rows): ``f(*_, **_)``."""
        args, kwargs = minibatch(self.args, self.kwargs, self.size, rows)
        scale = self.size / len(rows)

        def on_rows(*_, **__):
            with _ScalePlate(self.plate, scale):
                return self.fmodel(*args, **kwargs)

        return on_rows

    def __call__(self, *_, **__):
        return self.model_on(batch_rows(self.size, self.batch_size, None)[self.mine])()


def _data_plate(plan) -> tuple[str, int]:
    """(name, N) of the plate every observed site sits in first; ValueError naming the site for a continuous
    latent or chain inside it, an observed site outside it or whose value does not have the N rows first."""
    graph, facts = plan.graph, plan.facts
    chain = (facts.markov_chains + facts.gaussian_chains)[:1]
    if chain:
        raise ValueError(f"backend '{NAME}': batch_size= and data-parallel training do not split chains; site "
                         f"'{chain[0]}' is one (fit it on all the data, one process)")
    observed = [s for s in graph.sites() if s.observed]
    plates = {s.name: data_plate(graph, s.name) for s in observed}
    if len(set(plates.values())) != 1:
        raise ValueError(f"backend '{NAME}': batch_size= needs every observed site in one data plate, got {plates}")
    plate, size = next(iter(plates.values()))
    for s in graph.sites():
        if s.observed and (not s.value_shape or s.value_shape[0] != size):
            raise ValueError(f"site '{s.name}' has shape {s.value_shape}: plate '{plate}' must index its first dim "
                             f"(size {size}) to be fitted on minibatches")
        if not s.observed and any(p == plate for p, _ in s.plates) and s.name not in facts.enumerable:
            raise ValueError(f"site '{s.name}' is a latent local to plate '{plate}': backend '{NAME}' with "
                             "batch_size= or data-parallel training fits global latents only (a per-row guide "
                             "would not follow the batch); use backend='amortized' (an encoder network)")
    return plate, size


def _collect(model, args, kwargs, plan, fmodel, guide, elbo, history, num_samples) -> Posterior:
    """The Posterior of a fitted guide: its draws, the ELBO (``estimate_elbo``), chain/discrete posteriors at its
    median."""
    facts, graph = plan.facts, plan.graph
    with torch.no_grad():
        draws = {k: v.detach().reshape((num_samples,) + graph.site(k).value_shape) for k, v in
                 Predictive(guide, num_samples=num_samples, parallel=False)(*args, **kwargs).items()
                 if k in graph.nodes and not graph.site(k).observed}
        point = {k: v.detach() for k, v in guide.median(*args, **kwargs).items()}
        evidence = estimate_elbo(lambda: float(elbo.loss(fmodel, guide, *args, **kwargs)))
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


def density_facts(graph, facts: Facts, model=None, args: tuple = (), kwargs: dict | None = None) -> dict:
    """The svi backend's facts: ``density_refusal``, why the compiled log density cannot run the model (naming
    the site; None when it can: ``compiled.refusal``). The compiler puts it in ``plan.density`` for the backends
    that fit on the compiled density, so ``plan.explain()`` names the fallback before the fit. Without the model
    (facts computed from the graph alone) nothing is known: ``{}``."""
    if model is None:
        return {}
    return {"density_refusal": compiled.refusal(model, chains.fit_model(model, facts), args, kwargs or {}, graph,
                                                facts)}


BACKEND = Backend(NAME, run=run, supports=supports, treatments=treatments, rules=RULES, facts=density_facts)
