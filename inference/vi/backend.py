r"""Backend "vi": variational Bayes on conjugate-exponential models (VB-EM / variational message passing).

For a model with one discrete local z (a Categorical mixture assignment in a plate, or a ``markov_chain``) and
continuous globals each conjugate to what it feeds (Dirichlet -> mixture weights / chain rows / categorical
emissions, Gamma -> Poisson rates, Beta -> Bernoulli probabilities, Normal or MultivariateNormal -> Gaussian
means with known covariance, ``ppl.NormalInverseWishart`` -> Gaussian mean and covariance), the mean-field
posterior :math:`q(z)\prod_g q(g)` is fitted by coordinate ascent with every update in closed form: exact
local messages (responsibilities; forward-backward on :math:`E_q[\log A]` for a chain) and conjugate global
updates from expected sufficient statistics. The ELBO is computed in closed form term by term and never
decreases. The result is the full posterior over the globals (draws from q, their mean ``post.mean``, the ELBO as
``log_evidence``). ``post.point`` is the mode of q, factor by factor (``families``: the argmax of each q(g)'s
density in the site's own parameterization, the variational counterpart of the exact backend's MAP; the mean where
a factor has no mode, e.g. a Dirichlet with an entry below 1). With flat conjugate priors it is the EM M-step
from the final expected statistics: a Dirichlet(1) transition row's mode is its normalized expected counts, where
q's mean :math:`(n_{ij} + 1) / (n_i + K)` is shrunk towards uniform.

The structure is found by probing the model (``conjugacy``); anything not recognized is refused with a reason
naming the site. A model without a discrete latent (a conjugate prior on observed data) runs too with
``backend="vi"``: one sweep gives the exact posterior and the ELBO equals log p(data).

Non-conjugate globals get a point estimate inside the same coordinate-ascent loop in two structures: a Gaussian
local whose observed children are affine in it (factor analysis, probabilistic CCA: ``factor_analysis``; its noise
sites, HalfNormal scales, an LKJ Cholesky factor, ...), and a discrete-local model (mixture or markov_chain) whose
non-conjugate globals feed observed sites only (``point_globals``: e.g. a GMM's or Gaussian HMM's HalfNormal
scales, given which the Normal means are conjugate). Their posterior draws are a point mass at it, the objective
(``history``) is the ELBO plus their log prior, and ``log_evidence`` the ELBO at the point estimate. The routing
rule leaves the second kind to the other backends (``VIFacts.point_estimated``): ``backend="vi"`` runs it.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

from ppl.analysis import Facts
from ppl.backends import Backend, Rule, Verdict, needs_normalized_density
from ppl.handlers import DiscreteTable
from ppl.plan import SiteTreatment
from ppl.posterior import LogEvidence, Posterior

from .. import initialization, training
from ..checkpoints import Checkpoints
from ..results import make_posterior
from . import cavi, lda, stochastic
from . import factor_analysis
from . import linear_chain
from . import nmf as poisson_nmf
from . import slds as slds_vi
from . import point_globals
from .conjugacy import NotConjugate, Structure, analyse, local_site
from .families import FAMILIES
from . import gaussian_chain as chain_vi

NAME = "vi"


@dataclass(frozen=True, eq=False, repr=False)
class ProbeResult:
    """The conjugate ``Structure`` the compile-time probe found on ``model(*args, **kwargs)``.

    ``run`` reuses it instead of probing again (two model runs with the local enumerated, ~0.2 s at 10^5 rows)
    only when it is called on those very objects, none of the tensors modified in place since (``versions``:
    their ``_version`` counters); ``ppl.infer`` compiles and runs on the same objects."""

    model: object
    args: tuple
    kwargs: dict
    versions: tuple
    structure: Structure

    @staticmethod
    def of(model, args: tuple, kwargs: dict, structure: Structure) -> "ProbeResult":
        return ProbeResult(model, tuple(args), dict(kwargs), _versions(args, kwargs), structure)

    def matches(self, model, args: tuple, kwargs: dict) -> bool:
        """Is ``(model, args, kwargs)`` what was probed, object for object and unmodified?"""
        return (self.model is model and len(args) == len(self.args) and set(kwargs) == set(self.kwargs)
                and all(a is b for a, b in zip(args, self.args))
                and all(kwargs[k] is self.kwargs[k] for k in kwargs)
                and _versions(args, kwargs) == self.versions)


def _versions(args: tuple, kwargs: dict) -> tuple:
    """The in-place modification counters of the tensors among ``args`` and ``kwargs``' values (in order)."""
    values = list(args) + [kwargs[k] for k in sorted(kwargs)]
    return tuple(v._version if isinstance(v, torch.Tensor) else None for v in values)


@dataclass(frozen=True)
class VIFacts:
    """The vi backend's facts (``facts.of("vi")``). local: the discrete local (None: none); problem: why the
    backend cannot run the model ("" if it can, as far as the compiler let it look); probed: the model itself
    was probed at compile time (the compiler passed it), so ``updates`` names each closed-form update;
    ``probe_result``: what that probe found, for ``run`` (not compared, printed or pickled)."""

    local: str | None
    problem: str = ""
    probed: bool = False
    updates: dict = field(default_factory=dict)
    chain: str | None = None   # the gaussian_chain of a conjugate LDS (``gaussian_chain``), else None
    admixture: tuple | None = None   # (theta, z, w, topics) when the model is an LDA-style admixture (``lda``)
    factorization: tuple | None = None   # (counts, factor, factor) of a Poisson factorization (``nmf``)
    latent_factor: tuple | None = None   # (z, views) of a linear-Gaussian latent factor model (``factor_analysis``)
    point_estimated: tuple = ()   # non-conjugate globals of a discrete-local model point-estimated (``point_globals``)
    probe_result: ProbeResult | None = field(default=None, compare=False, repr=False)

    def __getstate__(self) -> dict:
        # the probe's Structure holds the data and its outer products: a saved plan leaves it out (run probes again)
        return dict(self.__dict__, probe_result=None)


def vi_facts(graph, facts: Facts, probe: tuple | None = None) -> VIFacts:
    """Structural checks from the graph; with ``probe = (model, args, kwargs)`` the full conjugacy probe."""
    if facts.gaussian_chains:
        return _chain_facts(graph, facts, probe)
    names = lda.admixture_sites(facts)
    if names is not None:
        return _admixture_facts(facts, names, probe)
    factors = poisson_nmf.factorization_sites(graph, facts)
    if factors is not None:
        return _factorization_facts(graph, facts, factors, probe)
    latent_factor = factor_analysis.latent_factor_sites(graph, facts)
    if latent_factor is not None:
        return _latent_factor_facts(graph, facts, latent_factor, probe)
    try:
        local = local_site(facts)
    except NotConjugate as exc:
        return VIFacts(None, str(exc))
    # (a global with a non-conjugate prior is point-estimated when it feeds observed sites only: the probe decides)
    if probe is None or local is None:  # the rule needs a local; without one, run() probes when asked for
        return VIFacts(local)
    model, args, kwargs = probe
    try:
        structure = analyse_local(model, args, kwargs, facts, graph)
    except Exception as exc:  # noqa: BLE001 - any failure means "not recognized"; compile must go on for the others
        return VIFacts(local, str(exc) if isinstance(exc, NotConjugate) else
                       f"probing the model for conjugate pairs failed ({type(exc).__name__}: {exc})", probed=True)
    updates = linear_chain.describe(structure) if isinstance(structure, linear_chain.LinearChainStructure) \
        else describe(structure)
    points = tuple(structure.points.values) if getattr(structure, "points", None) is not None else ()
    return VIFacts(local, "", True, updates, point_estimated=points,
                   probe_result=ProbeResult.of(model, args, kwargs, structure))


def analyse_local(model, args, kwargs, facts: Facts, graph):
    """The conjugate ``Structure`` of a model with one discrete local (``conjugacy.analyse``), or, for a markov_chain
    that probe does not recognize, a ``linear_chain.LinearChainStructure`` (a transition log-linear in Dirichlet
    globals and a Gaussian mean linear in a Normal one: a factorial HMM over its joint states); the generic probe's
    NotConjugate and the linear chain's when neither applies."""
    try:
        return analyse(model, args, kwargs, facts, graph)
    except NotConjugate as generic:
        if local_site(facts) not in facts.markov_chains:
            raise
        try:
            return linear_chain.analyse(model, args, kwargs, facts, graph)
        except NotConjugate as linear:
            raise NotConjugate(f"{generic}; nor is it a linear chain (linear_chain): {linear}") from None


def _probed_facts(local: str | None, what: str, probe: tuple | None, analyse, describe_updates, **names) -> VIFacts:
    """The facts of a structure ``analyse(model, args, kwargs) -> structure`` recognizes (it probes the model when
    the compiler passes it: ``probe``), with ``names`` (the ``VIFacts`` field naming its sites) and the updates
    ``describe_updates(structure)`` names; or the reason it is not one (``what``: "an admixture", ...)."""
    if probe is None:
        return VIFacts(local, **names)
    try:
        structure = analyse(*probe)
    except Exception as exc:  # noqa: BLE001 - any failure means "not recognized"; compile must go on for the others
        return VIFacts(local, str(exc) if isinstance(exc, NotConjugate) else
                       f"probing the model for {what} failed ({type(exc).__name__}: {exc})", True, **names)
    return VIFacts(local, "", True, describe_updates(structure), probe_result=ProbeResult.of(*probe, structure),
                   **names)


def _admixture_facts(facts: Facts, names: tuple, probe: tuple | None) -> VIFacts:
    """An LDA-style admixture (``lda.analyse``)."""
    return _probed_facts(names[1], "an admixture", probe, lambda *m: lda.analyse(*m, facts),
                         lambda _: lda.describe(names), admixture=names)


def _factorization_facts(graph, facts: Facts, names: tuple, probe: tuple | None) -> VIFacts:
    """A Poisson factorization (``nmf.analyse``)."""
    return _probed_facts(None, "a Poisson factorization", probe, lambda *m: poisson_nmf.analyse(*m, facts, graph),
                         lambda _: poisson_nmf.describe(names), factorization=names)


def _latent_factor_facts(graph, facts: Facts, names: tuple, probe: tuple | None) -> VIFacts:
    """A linear-Gaussian latent factor model (``factor_analysis.analyse``)."""
    return _probed_facts(None, "a latent factor model", probe, lambda *m: factor_analysis.analyse(*m, facts, graph),
                         factor_analysis.describe, latent_factor=names)


def _chain_facts(graph, facts: Facts, probe: tuple | None) -> VIFacts:
    """The facts of a model with a gaussian_chain: a conjugate LDS or switching LDS (``gaussian_chain.analyse_chain``
    probes it when the compiler passes the model), or the reason it is not one."""
    chain = facts.gaussian_chains[0]
    local = facts.switching[0][0] if facts.switching else None   # a switching LDS's markov_chain
    problem = chain_vi.structural_problem(graph, facts)
    if problem or probe is None:
        return VIFacts(local, problem, chain=chain)
    try:
        analyse_chain = slds_vi.analyse_slds if facts.switching else chain_vi.analyse_chain
        structure = analyse_chain(*probe, facts, graph)
    except Exception as exc:  # noqa: BLE001 - any failure means "not recognized"; compile must go on for the others
        return VIFacts(local, str(exc) if isinstance(exc, NotConjugate) else
                       f"probing the model for a conjugate LDS failed ({type(exc).__name__}: {exc})", True,
                       chain=chain)
    describe = slds_vi.describe if facts.switching else chain_vi.describe
    return VIFacts(local, "", True, describe(structure), chain=chain)


STATS = {"Dirichlet": "expected counts", "Gamma": "expected counts and sums", "Beta": "expected successes and failures",
         "Normal": "precision-weighted expected sums", "Gaussian": "precision-weighted expected sums",
         "MultivariateNormal": "precision-weighted expected sums",
         "NormalInverseWishart": "expected counts, sums and scatter matrices"}


def describe(structure: Structure) -> dict[str, str]:
    """site -> the closed-form update ``plan.explain()`` prints, e.g. "q(weights) = Dirichlet: closed form from
    expected counts of z.weights"."""
    out = {}
    for name, g in structure.globals.items():
        fed = ", ".join(structure.links.get(name, ())) or "nothing (q = prior)"
        out[name] = f"q({name}) = {FAMILIES[g.family].q_name}: closed form from {STATS[g.family]} of {fed}"
    if structure.points is not None:
        out.update(point_globals.describe(structure))
    return out


def _prior_family(site) -> str | None:
    """The prior's family as the graph shows it (under ``.to_event`` read off its support), for explain() only."""
    if site.family != "Independent":
        return site.family
    known = (("Simplex", "Dirichlet"), ("Real", "Normal"), ("Interval(lower_bound=0.0, upper_bound=1.0", "Beta"),
             ("lower_bound=0.0", "Gamma"))
    for word, family in known:
        if word in site.support:
            return family
    return None


def _structural_update(graph, name: str) -> str:
    """The update ``explain()`` names before the model was probed (the pairing is confirmed when ``run`` starts)."""
    family = _prior_family(graph.site(name))
    kids = ", ".join(graph.children_of(name)) or "nothing"
    if family not in STATS:
        return f"q({name}) in its prior's conjugate family: closed form from expected sufficient statistics of {kids}"
    q = "MultivariateNormal" if family == "Normal" and graph.site(name).event_shape else family
    return (f"q({name}) = {q}: closed form from {STATS[family]} of {kids} (pairing checked by probing when the fit "
            "starts)")


@needs_normalized_density
def supports(facts: Facts) -> Verdict:
    """Runs a model with at most one discrete local and conjugate continuous globals; the reason names the site
    otherwise (what only a probe of the model shows is checked when ``run`` starts, with the same kind of reason)."""
    v = facts.of(NAME)
    return Verdict(not v.problem, v.problem)


def treatments(graph, facts: Facts) -> list[SiteTreatment]:
    """Local: responsibilities (mixture) or VB-HMM forward-backward (chain); globals: closed-form conjugate updates."""
    v = facts.of(NAME)
    if v.admixture is not None:
        return lda.treatment_rows(graph, v.admixture)
    if v.factorization is not None:
        return poisson_nmf.treatment_rows(graph, v.factorization)
    if v.latent_factor is not None:
        return factor_analysis.treatment_rows(graph, v.latent_factor[0], v.updates)
    rows = []
    for s in graph.sites():
        if s.observed:
            rows.append(SiteTreatment(s.name, "observed", f"{s.family}, shape {s.value_shape}"))
        elif s.name == v.chain:
            rows.append(SiteTreatment(s.name, "message passing",
                                      slds_vi.LOCAL_TREATMENT if facts.switching else chain_vi.LOCAL_TREATMENT))
        elif s.name == v.local and s.block == "markov_chain":
            rows.append(SiteTreatment(s.name, "message passing", "q(z): forward-backward on E_q[log initial], "
                                      "E_q[log transition] and expected log-likelihoods (VB-HMM)"))
        elif s.name == v.local:
            rows.append(SiteTreatment(s.name, "enumerate", "q(z) = Categorical: responsibilities from E_q[log "
                                      "weights] and expected log-likelihoods"))
        else:
            update = v.updates.get(s.name) or _structural_update(graph, s.name)
            rows.append(SiteTreatment(s.name, "point estimate" if update.startswith("point estimate") else
                                      "natural gradient", update))
    return rows


def _check_options(num_steps, tol, restarts, num_samples) -> None:
    for name, value in (("num_steps", num_steps), ("restarts", restarts), ("num_samples", num_samples)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"backend 'vi': {name} must be an integer >= 1, got {value!r}")
    if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not tol >= 0:
        raise ValueError(f"backend 'vi': tol must be a number >= 0, got {tol!r}")


def _start_labels(structure: Structure, restarts: int, seed: int) -> list[torch.Tensor]:
    """Labels ``(*zshape)`` of the local, one per restart: k-means++ and Lloyd labels
    (``initialization.kmeans_labels``, seeded by ``seed``) of the local's observed data, entries where it is
    missing left out; random labels when no child is laid out like the local."""
    local = structure.local
    gen = torch.Generator().manual_seed(seed)
    rows = _features(structure)
    out = []
    for _ in range(restarts):
        if rows is not None and rows.shape[0] >= local.K:
            labels = _kmeans_start(rows, local.K, gen).reshape(local.zshape)
        else:
            labels = torch.randint(local.K, local.zshape, generator=gen)
        out.append(labels.to(_device(structure)))
    return out


SCREEN_ROWS = 10_000  # a mixture with more than 2 x this many rows screens its restarts on this many (``_screened``)
SCREEN_TOL = 1e-4     # screening fits stop at this relative ELBO change (or the fit's tol if looser): they rank the
                      # starts (scikit-learn's mixtures stop every start at a change of 1e-3 nats per data point)


def _screened(structure: Structure, labels: list, num_steps: int, tol: float, seed: int, progress: bool,
              checkpoints: Checkpoints | None = None):
    """Restarts screened on a subsample: each start's coordinate ascent on ``SCREEN_ROWS`` random rows
    (``subsample``, rows drawn with ``seed``) to a relative ELBO change of ``max(tol, SCREEN_TOL)``. Returns
    ``(start, interrupted)``: ``start`` = q(z) of every row under the q(globals) of the subsample fit with the best
    ELBO (one local step: the fit continues from there on all rows to ``tol``), or None when the structure cannot
    be subsampled or has at most 2 x ``SCREEN_ROWS`` rows; ``interrupted``: Ctrl-C stopped the screening.
    ``checkpoints``: each screening fit is checkpointed and resumed under its own key (``cavi.coordinate_ascent``)."""
    local = structure.local
    N = local.zshape[0] if local.kind == "mixture" and len(local.zshape) == 1 else 0
    if N <= 2 * SCREEN_ROWS:
        return None, False
    rows = torch.randperm(N, generator=torch.Generator().manual_seed(seed))[:SCREEN_ROWS].sort().values
    sub = cavi.subsample(structure, rows)
    if sub is None:
        return None, False
    starts = [cavi.hard_local(sub, lab.index_select(0, rows.to(lab.device))) for lab in labels]
    screen_tol = max(tol, SCREEN_TOL)
    best, interrupted = cavi.best_of_restarts(
        lambda i, desc, on_step: cavi.coordinate_ascent(sub, starts[i], num_steps, screen_tol, on_step, checkpoints,
                                                        desc),
        len(starts), num_steps, screen_tol, progress, f"{NAME} screening on {SCREEN_ROWS} rows",
        check_convergence=False)
    with torch.no_grad():
        return cavi.local_step(structure, best.q, cavi.child_tables(structure, best.q)), interrupted


KMEANS_ROWS = 10_000  # k-means++ and Lloyd run on at most this many rows; every row then joins its nearest center


def _kmeans_start(rows: torch.Tensor, K: int, gen: torch.Generator) -> torch.Tensor:
    """Labels ``(n,)`` of ``rows (n, F)``: ``initialization.kmeans_labels`` on a random subset of ``KMEANS_ROWS``
    rows (all when fewer), then each row's nearest center in the standardized features (a start, not a fit)."""
    if rows.shape[0] <= KMEANS_ROWS:
        return initialization.kmeans_labels(rows, K, gen)
    pick = torch.randperm(rows.shape[0], generator=gen)[:KMEANS_ROWS]
    labels = initialization.kmeans_labels(rows[pick], K, gen)
    finite = torch.isfinite(rows)
    col_mean = torch.where(finite, rows, 0).sum(0) / finite.sum(0).clamp_min(1)
    x = torch.where(finite, rows, col_mean)
    x = (x - x.mean(0)) / x.std(0).clamp_min(1e-12)
    onehot = torch.nn.functional.one_hot(labels, K).to(x.dtype)
    centers = (onehot.T @ x[pick]) / onehot.sum(0).clamp_min(1)[:, None]
    return torch.cdist(x, centers).argmin(-1)


def _features(structure: Structure) -> torch.Tensor | None:
    """The first observed child's values as rows indexed like the local, ``(prod(zshape), F)`` on the CPU, NaN
    where missing (k-means fills them with the column mean); None if no child is laid out like the local."""
    zshape = structure.local.zshape
    for c in structure.children:
        if c.nz == len(zshape) and tuple(c.y.shape[:c.nz]) == zshape and c.y.numel():
            y = c.y.double()
            keep = (c.w != 0).reshape(c.w.shape + (1,) * (y.dim() - c.w.dim()))
            y = torch.where(keep, y, torch.full_like(y, float("nan")))
            return y.reshape(int(torch.Size(zshape).numel()), -1).cpu()
    return None


def _device(structure: Structure) -> torch.device:
    return structure.children[0].y.device if structure.children else torch.device("cpu")


def _chain_table(structure: Structure, fit: cavi.Fit) -> dict:
    """The VB-HMM's sub-normalized tables at the final q, as a DiscreteTable (marginals, Viterbi, FFBS draws)."""
    local = structure.local
    if local is None or local.kind != "chain":
        return {}
    logs = cavi.local_logs(structure, fit.q)
    lik = sum(fit.tables[c.name] for c in structure.children).movedim(0, -1)
    return {local.name: DiscreteTable(logs["initial"], logs["transition"], lik.detach(), False)}


def run(model, args, kwargs, plan, num_steps: int = 500, tol: float = 1e-6, restarts: int = 3, seed: int = 0,
        num_samples: int = 1000, progress: bool = True, checkpoint: str | None = None, checkpoint_every: int = 100,
        resume: str | None = None, batch_size: int | None = None, tau0: float = stochastic.DEFAULT_TAU0,
        kappa: float = stochastic.DEFAULT_KAPPA, **unused) -> Posterior:
    """Coordinate ascent from ``restarts`` data-driven starts (k-means++ hard assignments, seeded by ``seed``),
    keeping the best ELBO; each runs at most ``num_steps`` sweeps, stopping when the relative ELBO change is
    below ``tol``. A mixture with more than 2 x ``SCREEN_ROWS`` data rows screens its starts on ``SCREEN_ROWS``
    random rows (each start's coordinate ascent there to a relative change of ``SCREEN_TOL``) and fits all rows
    from the best one only (``_screened``).
    Returns draws of every global from q (``num_samples``), the mode of q as ``point`` (module docstring), q(z)
    marginals, the ELBO as ``log_evidence``,
    ``history`` = the negative ELBO per sweep (the objective, as for every backend; it never increases; after
    screening, the sweeps on all rows) and ``elbo_terms`` (each term per sweep; they sum to ``-history[i]``).
    checkpoint / checkpoint_every / resume: as the other backends (per sweep; ``inference/checkpoints.py``);
    Ctrl-C keeps the best of the runs so far, marked ``post.interrupted``.

    batch_size / tau0 / kappa (an LDA-style admixture, ``lda``, or a mixture whose local has one data dim,
    ``cavi.stochastic_ascent``): ``batch_size=None`` fits by coordinate ascent; an integer B runs stochastic
    natural-gradient VI (Hoffman et al. 2013) on minibatches of B documents / data rows, ``num_steps`` passes,
    step sizes rho_t = (tau0 + t)^-kappa (``stochastic``), from the same starts; ``history`` is then minus each
    pass's noisy ELBO estimate, then minus the exact ELBO at the end (``elbo_terms``: that one entry each). A
    markov_chain or a gaussian_chain is fitted full-batch (ValueError with batch_size=).

    A linear-Gaussian latent factor model (``factor_analysis``): principal-component start and ``restarts - 1``
    random ones screened by a few sweeps; draws of z and of the Normal loadings / offsets from q, the non-conjugate
    noise sites as point masses at their point estimate (every draw the same value); ``history`` minus (ELBO + log
    prior of the point estimates)."""
    if unused:
        raise TypeError(f"backend 'vi' got unexpected options: {', '.join(unused)}")
    _check_options(num_steps, tol, restarts, num_samples)
    if plan.facts.of(NAME).admixture is not None:
        if checkpoint is not None or resume is not None:
            raise ValueError("backend 'vi': checkpoint=/resume= are not implemented for an LDA-style admixture")
        found = plan.facts.of(NAME).probe_result
        structure = found.structure if found is not None and found.matches(model, args, kwargs) else None
        return lda.run(model, args, kwargs, _without_probe_result(plan), num_steps, tol, restarts, seed,
                       num_samples, progress, batch_size, tau0, kappa, structure=structure)
    if batch_size is not None and plan.facts.of(NAME).chain is not None:
        raise ValueError(f"backend 'vi': batch_size={batch_size!r} (stochastic natural-gradient VI) is not "
                         f"implemented for a gaussian_chain ('{plan.facts.of(NAME).chain}'): Kalman smoothing couples "
                         "every step of a sequence, so it is fitted full-batch (leave batch_size=None)")
    stochastic.check_schedule(None, tau0, kappa, 1, "data units")
    for kind, runner, what in (("factorization", poisson_nmf, "a Poisson factorization"),
                               ("latent_factor", factor_analysis, "a latent factor model")):
        names = getattr(plan.facts.of(NAME), kind)
        if names is None:
            continue
        if checkpoint is not None or resume is not None:
            raise ValueError(f"backend 'vi': checkpoint=/resume= are not implemented for {what}")
        if batch_size is not None:
            raise ValueError(f"backend 'vi': batch_size={batch_size!r} (stochastic natural-gradient VI) is not "
                             f"implemented for {what} ('{names[0]}'): it is fitted full-batch (leave "
                             "batch_size=None)")
        found = plan.facts.of(NAME).probe_result
        structure = found.structure if found is not None and found.matches(model, args, kwargs) else None
        return runner.run(model, args, kwargs, _without_probe_result(plan), num_steps, tol, restarts, seed,
                          num_samples, progress, structure=structure)
    if plan.facts.of(NAME).chain is not None:
        if checkpoint is not None or resume is not None:
            raise ValueError("backend 'vi': checkpoint=/resume= are not implemented for a gaussian_chain model")
        fit_chain = slds_vi.run if plan.facts.switching else chain_vi.run
        return fit_chain(model, args, kwargs, plan, num_steps, tol, restarts, seed, num_samples, progress)
    checkpoints = Checkpoints.from_options(checkpoint, checkpoint_every, resume)
    structure = _structure(model, args, kwargs, plan)
    plan = _without_probe_result(plan)
    if isinstance(structure, linear_chain.LinearChainStructure):
        if checkpoint is not None or resume is not None or batch_size is not None:
            raise ValueError(f"backend 'vi': checkpoint=/resume=/batch_size= are not implemented for the markov_chain "
                             f"'{structure.chain}' with a log-linear transition (a factorial HMM over joint states)")
        return linear_chain.run(model, args, kwargs, plan, num_steps, tol, restarts, seed, num_samples, progress,
                                structure=structure)
    if structure.points is not None:
        if checkpoint is not None or resume is not None or batch_size is not None:
            raise ValueError(f"backend 'vi': checkpoint=/resume=/batch_size= are not implemented with point-estimated "
                             f"non-conjugate globals ({', '.join(structure.points.values)})")
        return _run_points(model, args, kwargs, plan, structure, num_steps, tol, restarts, seed, num_samples,
                           progress)
    if batch_size is not None:
        _check_minibatches(structure, batch_size, tau0, kappa, checkpoints)
    starts, interrupted = [None], False
    if structure.local is not None:
        labels = _start_labels(structure, restarts, seed)
        screened, interrupted = _screened(structure, labels, num_steps, tol, seed, progress, checkpoints) \
            if restarts > 1 else (None, False)
        starts = [screened] if screened is not None else [cavi.hard_local(structure, lab) for lab in labels]
    gen = torch.Generator().manual_seed(seed)

    def fit_one(i: int, desc: str, on_step) -> cavi.Fit:
        steps = 1 if interrupted else num_steps
        if batch_size is None:
            return cavi.coordinate_ascent(structure, starts[i], steps, tol, on_step, checkpoints, desc)
        return cavi.stochastic_ascent(structure, starts[i], steps, tol, batch_size, tau0, kappa, gen, on_step)

    best, stopped = cavi.best_of_restarts(fit_one, len(starts), num_steps, tol, progress, NAME,
                                          check_convergence=not interrupted and batch_size is None)
    return _posterior(model, args, kwargs, plan, structure, best, num_samples, interrupted or stopped)


def _run_points(model, args, kwargs, plan, structure: Structure, num_steps: int, tol: float, restarts: int, seed: int,
                num_samples: int, progress: bool) -> Posterior:
    """A discrete-local model with point-estimated non-conjugate globals (``point_globals``): ``restarts`` k-means
    starts (no screening), each fitted by ``point_globals.coordinate_ascent``, the best objective (ELBO + log prior of
    the point estimates) kept."""
    starts = [None]
    if structure.local is not None:
        starts = [cavi.hard_local(structure, lab) for lab in _start_labels(structure, restarts, seed)]
    best, stopped = cavi.best_of_restarts(
        lambda i, desc, on_step: point_globals.coordinate_ascent(structure, starts[i], num_steps, tol, on_step),
        len(starts), num_steps, tol, progress, NAME)
    return _posterior(model, args, kwargs, plan, best.structure, best, num_samples, stopped)


def _check_minibatches(structure: Structure, batch_size, tau0, kappa, checkpoints) -> None:
    """ValueError naming the reason when stochastic VI (``batch_size``) cannot run on ``structure``: no discrete
    local, a markov_chain (fitted full-batch), a local with several data dims or a child not laid out along its
    rows (``cavi.subsample``), checkpoints (not implemented), or a bad schedule (``stochastic.check_schedule``)."""
    local = structure.local
    what = f"backend 'vi': batch_size={batch_size!r} (stochastic natural-gradient VI)"
    if local is None:
        raise ValueError(f"{what} needs a discrete local latent to subsample the data by; this model has none (its "
                         "posterior is one closed-form sweep: leave batch_size=None)")
    if local.kind == "chain":
        raise ValueError(f"{what} is not implemented for the markov_chain '{local.name}': forward-backward couples "
                         "every step of a sequence, so a chain is fitted full-batch (leave batch_size=None)")
    if cavi.subsample(structure, torch.arange(min(1, local.zshape[0]))) is None:
        raise ValueError(f"{what} needs the local '{local.name}' to have one data dim and every observed site laid "
                         f"out along it; '{local.name}' has data shape {tuple(local.zshape)} (leave batch_size=None)")
    if checkpoints is not None:
        raise ValueError("backend 'vi': checkpoint=/resume= are not implemented with batch_size= (stochastic VI)")
    stochastic.check_schedule(batch_size, tau0, kappa, local.zshape[0], "data rows")


def _structure(model, args, kwargs, plan):
    """The model's conjugate structure: the compile-time probe's when ``plan`` was compiled on these very
    ``(model, args, kwargs)`` (``ProbeResult.matches``), else a fresh probe (``analyse_local``)."""
    found = plan.facts.of(NAME).probe_result
    if found is not None and found.matches(model, args, kwargs):
        return found.structure
    return analyse_local(model, args, kwargs, plan.facts, plan.graph)


def _without_probe_result(plan):
    """``plan`` without the probe's Structure (the Posterior keeps the plan; the Structure is no longer needed)."""
    facts = plan.facts
    mine = replace(facts.of(NAME), probe_result=None)
    return replace(plan, facts=replace(facts, backend_facts={**facts.backend_facts, NAME: mine}))


def _history(fit: cavi.Fit, interrupted: bool) -> training.History:
    """The objective per sweep (the negative ELBO), marked interrupted when the user stopped the fit."""
    history = training.History(-v for v in fit.history)
    history.interrupted = interrupted
    return history


def _posterior(model, args, kwargs, plan, structure: Structure, fit: cavi.Fit, num_samples: int,
               interrupted: bool = False) -> Posterior:
    """The typed Posterior of the best fit: draws from q, ``point`` = the mode of q (its mean where none); the
    point-estimated sites of a ``point_globals.PointFit`` as point masses, ``log_evidence`` the ELBO at them."""
    draws, point = {}, {}
    for name, g in structure.globals.items():
        fam = FAMILIES[g.family]
        draws[name] = fam.sample(fit.q[name], num_samples).reshape((1, num_samples) + g.shape)
        point[name] = fam.mode(fit.q[name]).reshape(g.shape)
    evidence = LogEvidence(fit.elbo, "ELBO (lower bound)")
    if isinstance(fit, point_globals.PointFit):
        for name, value in fit.theta.items():
            draws[name] = value.expand((1, num_samples) + tuple(value.shape))
            point[name] = value
        evidence = LogEvidence(fit.elbo - fit.log_prior, f"ELBO (lower bound on log p(data | {', '.join(fit.theta)}) "
                                                          "at their point estimates)")
    local = structure.local
    discrete = {local.name: fit.state.r.movedim(0, -1)} if local is not None and local.kind == "mixture" else {}
    # history: the objective per sweep, the negative ELBO (as every backend's); elbo_terms sum to -history[i]
    return make_posterior(plan, model, args, kwargs, draws=draws, point=point, history=_history(fit, interrupted),
                          log_evidence=evidence, tables=_chain_table(structure, fit),
                          discrete=discrete, elbo_terms=fit.terms)


def _conjugate_local(f: Facts) -> bool:
    """One discrete local whose continuous globals (at least one: without any, the exact backend's log evidence is
    the same number, labelled exact) are each conjugate to what they feed; or one gaussian_chain whose (A, Q) and
    (C, R) are conjugate MNIW globals (``gaussian_chain.analyse_chain``); or a Poisson factorization with Gamma
    factors (``nmf.analyse``); or a linear-Gaussian latent factor model (``factor_analysis.analyse``: Normal
    loadings and offsets, the other globals point-estimated in the loop). Not a discrete-local model with
    point-estimated globals (``point_globals``; ``backend="vi"`` runs it, auto routing does not choose it)."""
    v = f.of(NAME)
    return v.probed and not v.problem and bool(f.continuous) and not v.point_estimated and (
        v.local is not None or v.chain is not None or v.factorization is not None or v.latent_factor is not None)


RULES = (
    Rule("conjugate-exponential", _conjugate_local, NAME,
         "one discrete latent (a mixture assignment or a markov_chain; or a markov_chain whose transition is "
         "log-linear in Dirichlet globals and whose Gaussian mean is linear in a Normal one, e.g. a factorial HMM "
         "over its joint states, its scale point-estimated in the loop), or a gaussian_chain with matrix-normal-"
         "inverse-Wishart priors on its dynamics and emission, or a Poisson factorization Poisson(W @ H) with "
         "Gamma factors (latent sources), or a Gaussian local whose observed children are affine in it "
         "(factor analysis / probabilistic CCA: Normal loadings and offsets, other globals point-estimated in the "
         "loop), whose globals are each conjugate to what they feed: variational Bayes by coordinate ascent, every "
         "update in closed form with exact local messages "
         "(forward-backward; Kalman smoothing on the expected dynamics for a gaussian_chain), the "
         "full posterior over the globals (not MAP) and the ELBO in closed form", order=22),
)


def _facts_hook(graph, facts, *probe):
    """``Backend.facts``: ``vi_facts``; the compiler may pass ``(model, args, kwargs)`` after the facts."""
    return vi_facts(graph, facts, tuple(probe) if len(probe) == 3 else None)


BACKEND = Backend(NAME, run=run, supports=supports, treatments=treatments, rules=RULES, facts=_facts_hook)
