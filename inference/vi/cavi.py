r"""Coordinate ascent on the mean-field ELBO :math:`q(z)\prod_g q(g)` of a conjugate-exponential model.

.. math::
    \mathcal L(q) = E_q[\log p(y \mid z, g)] + E_q[\log p(z \mid g)] + H[q(z)] - \sum_g KL(q(g) \,\|\, p(g)).

- local step: :math:`q(z) \propto \exp(E_q[\log p(z \mid g)] + E_q[\log p(y \mid z, g)])`; for a mixture the
  responsibilities, for a ``markov_chain`` forward-backward on the sub-normalized tables
  :math:`E_q[\log \pi]`, :math:`E_q[\log A]`, :math:`E_q[\log p(y_t \mid k)]` (the VB-HMM), whose log
  normalizer is :math:`\log Z` with :math:`H[q(z)] = \log Z - E_q[\log p(z, y \mid g)]`;
- global step: each q(g) in closed form from the expected sufficient statistics (``families``, ``links``).

Each step maximizes the ELBO over its factor with the others fixed, so the ELBO never decreases; it is
computed in closed form after every sweep, term by term.

Stochastic natural-gradient VI (``stochastic_ascent``, Hoffman et al. 2013) for a mixture whose local has one
data dim: the local step on a minibatch B of the N rows (``subsample``), the global targets from its statistics
scaled by N / |B| (``global_step(..., scale)``), a step of size :math:`\rho_t = (\tau_0 + t)^{-\kappa}` towards
them in each family's natural parameters (``families``). A ``markov_chain`` stays full-batch: forward-backward
couples every step of a sequence.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, replace

import torch

from .. import training
from ..checkpoints import Checkpoints
from ..exact import hmm
from . import links, stochastic
from .conjugacy import Structure
from .families import FAMILIES, dirichlet_expected_log


@dataclass
class LocalState:
    """q(z): ``r (K, *zshape)`` = q(z = k); ``counts``: role -> expected counts for the local's Dirichlet priors
    (weights ``(*zshape, K)`` / initial ``(*batch, K)`` / transition ``(*batch, K, K)``, before summing over the
    data); ``entropy`` H[q(z)]."""

    r: torch.Tensor | None
    counts: dict
    entropy: torch.Tensor


def _lead(q: tuple, structure: Structure, glob: str) -> tuple:
    """A global's q params with the leading state dim the link functions expect (K = 1 when not indexed)."""
    return q if structure.globals[glob].indexed else tuple(x.unsqueeze(0) for x in q)


def child_tables(structure: Structure, q: dict) -> dict[str, torch.Tensor]:
    """child -> ``E_q[log p(y | z = k)]`` weighted, ``(K, *zshape)`` (K = 1 for a child without a local)."""
    return {c.name: links.table(c, _lead(q[c.glob], structure, c.glob) if c.glob else None)
            for c in structure.children}


def local_logs(structure: Structure, q: dict) -> dict[str, torch.Tensor]:
    """role -> E_q[log probabilities] of the local's own distribution (a Dirichlet global's, or the fixed ones)."""
    out = {}
    for role, src in structure.local.priors.items():
        out[role] = dirichlet_expected_log(q[src]) if isinstance(src, str) else src
    return out


def _summed_tables(structure: Structure, tables: dict) -> torch.Tensor:
    local = structure.local
    total = torch.zeros((local.K,) + local.zshape, dtype=structure.dtype, device=_device(structure))
    for c in structure.children:
        total = total + tables[c.name]
    return total


def _device(structure: Structure) -> torch.device:
    if structure.globals:
        return next(iter(structure.globals.values())).prior[0].device
    return structure.children[0].y.device


def local_step(structure: Structure, q: dict, tables: dict) -> LocalState:
    """The optimal q(z) given q(globals) (``tables`` = ``child_tables(structure, q)``)."""
    local = structure.local
    logs = local_logs(structure, q)
    lik = _summed_tables(structure, tables)
    if local.kind == "mixture":
        logits = lik + logs["weights"].expand(local.zshape + (local.K,)).movedim(-1, 0)
        log_r = torch.log_softmax(logits, 0)   # one fused pass (measured 2-3x faster than max/exp/sum/divide)
        r = log_r.exp()
        return LocalState(r, {"weights": r.movedim(0, -1)}, -(r * log_r).sum())  # entropy = log Z - E[logits]
    log_lik = lik.movedim(0, -1)
    batch = log_lik.shape[:-2]
    init = logs["initial"].expand(batch + logs["initial"].shape[-1:])
    trans = logs["transition"].expand(batch + logs["transition"].shape[-2:])
    post = hmm.posterior(init, trans, log_lik, time_varying=False)
    first, pairwise = post.marginals[..., 0, :], post.pairwise
    expected = (first * init).sum() + (pairwise * trans).sum() + (post.marginals * log_lik).sum()
    return LocalState(post.marginals.movedim(-1, 0), {"initial": first, "transition": pairwise},
                      post.log_normalizer.sum() - expected)


def hard_local(structure: Structure, labels: torch.Tensor) -> LocalState:
    """q(z) as a point mass on ``labels (*zshape)`` (a data-driven start), entropy 0."""
    local = structure.local
    onehot = torch.nn.functional.one_hot(labels.long(), local.K).to(structure.dtype)
    if local.kind == "mixture":
        return LocalState(onehot.movedim(-1, 0), {"weights": onehot}, onehot.new_zeros(()))
    pairwise = (onehot[..., :-1, :, None] * onehot[..., 1:, None, :]).sum(-3)
    return LocalState(onehot.movedim(-1, 0), {"initial": onehot[..., 0, :], "transition": pairwise},
                      onehot.new_zeros(()))


def _role_stats(counts: torch.Tensor, glob_shape: tuple) -> tuple:
    """Expected counts summed over the data dims down to the Dirichlet global's shape."""
    extra = counts.dim() - len(glob_shape)
    return (counts.sum(tuple(range(extra))) if extra > 0 else counts,)


def global_step(structure: Structure, state: LocalState | None, q: dict, scale: float = 1.0) -> dict:
    """Every q(g) in closed form: prior natural parameters plus the expected sufficient statistics, these times
    ``scale`` (N / |B| on a minibatch of B of N rows: an unbiased estimate of the full data's; 1 for all rows)."""
    stats: dict[str, list] = {g: [] for g in structure.globals}
    for c in structure.children:
        if c.glob is None:
            continue
        g = structure.globals[c.glob]
        r = state.r if g.indexed else c.w.new_ones((1,) + tuple(c.w.shape[:c.nz]))
        s = links.stats(c, r, _lead(q[c.glob], structure, c.glob))
        stats[c.glob].append(s if g.indexed else tuple(x.squeeze(0) for x in s))
    if structure.local is not None:
        for role, src in structure.local.priors.items():
            if isinstance(src, str):
                stats[src].append(_role_stats(state.counts[role], structure.globals[src].shape))
    out = {}
    for name, g in structure.globals.items():
        fam = FAMILIES[g.family]
        total = None
        for s in stats[name]:
            total = s if total is None else tuple(a + b for a, b in zip(total, s))
        if total is not None and scale != 1:
            total = tuple(scale * t for t in total)
        out[name] = g.prior if total is None else fam.update(g.prior, total)
    return out


def local_terms(structure: Structure, q: dict, tables: dict, state: LocalState | None) -> dict[str, torch.Tensor]:
    """The ELBO's terms that sum over the data: ``E log p(child)`` per observed site, ``E log p(local)`` and
    ``entropy(local)``."""
    terms = {}
    for c in structure.children:
        table = tables[c.name]
        terms[f"E log p({c.name})"] = (state.r * table).sum() if structure.local is not None else table.sum()
    if structure.local is not None:
        logs = local_logs(structure, q)
        terms[f"E log p({structure.local.name})"] = sum((state.counts[role] * logs[role]).sum() for role in logs)
        terms[f"entropy({structure.local.name})"] = state.entropy
    return terms


def elbo_terms(structure: Structure, q: dict, tables: dict, state: LocalState | None) -> dict[str, torch.Tensor]:
    """The ELBO term by term: ``local_terms``, ``-KL(global)`` per global (so that the ELBO is their sum), and
    ``log p(constant sites)``."""
    terms = local_terms(structure, q, tables, state)
    for name, g in structure.globals.items():
        terms[f"-KL({name})"] = -FAMILIES[g.family].kl(q[name], g.prior)
    if structure.constant:
        terms["log p(sites with no latent parent)"] = torch.tensor(structure.constant, dtype=structure.dtype)
    return terms


class ELBODecreased(UserWarning):
    """A coordinate-ascent sweep lowered the ELBO by more than round-off (it never should: a bug or a numerical
    breakdown, e.g. a nearly singular covariance)."""


@dataclass
class SweepRecord:
    """What every coordinate-ascent run of the vi backend records besides its q's: ``history`` the ELBO per sweep,
    ``terms`` name -> value per sweep, ``converged``, ``interrupted`` (stopped by Ctrl-C). Each structure's fit
    (``Fit`` here, ``lda.LDAFit``, ``gaussian_chain.ChainFit``, ``slds.SLDSFit``, ``nmf.NMFFit``) adds its q's as
    keyword fields."""

    history: list
    terms: dict
    converged: bool
    interrupted: bool = False

    @property
    def elbo(self) -> float:
        return self.history[-1]


@dataclass(kw_only=True)
class Fit(SweepRecord):
    """One coordinate-ascent run: final ``q`` (global -> params), ``state`` q(z), ``tables`` E_q log-likelihoods,
    ``history`` ELBO per sweep, ``terms`` name -> value per sweep, ``converged``."""

    q: dict
    state: LocalState | None
    tables: dict


def round_off(value: float, dtype: torch.dtype) -> float:
    """How much a sum of ELBO terms of size ``value`` may move by rounding alone."""
    return 1e3 * torch.finfo(dtype).eps * (abs(value) + 1.0)


def best_of_restarts(fit_one, restarts: int, num_steps: int, tol: float, progress: bool, name: str = "vi",
                     check_convergence: bool = True):
    """Run ``fit_one(i, desc, on_step) -> fit`` for the starts ``i < restarts`` (each under a progress bar of
    ``num_steps`` sweeps that ``on_step(elbo)`` advances; gradients off) and keep the one with the best
    ``fit.elbo``. A fit ended by Ctrl-C (``fit.interrupted``) stops the restarts with a ``training.Interrupted``
    warning; ``training.NotConverged`` warns when the best fit did not converge (``check_convergence``).
    Returns ``(best fit, interrupted)``."""
    fits = []
    with torch.no_grad():
        for i in range(restarts):
            desc = name if restarts == 1 else f"{name} start {i + 1}/{restarts}"
            bar = training.progress_bar(desc, num_steps, progress)
            fits.append(fit_one(i, desc, lambda v: (bar.update(1), bar.set_postfix(elbo=f"{v:.6g}"))))
            bar.close()
            if fits[-1].interrupted:
                warnings.warn(f"vi: interrupted by the user in {desc} after {len(fits[-1].history)} sweeps; the "
                              "result is the best run so far (post.interrupted is True)", training.Interrupted,
                              stacklevel=3)
                break
    best = max(fits, key=lambda f: f.elbo)
    interrupted = fits[-1].interrupted
    if check_convergence and not best.converged and not interrupted:
        warnings.warn(f"vi: the ELBO still moved by more than tol={tol:g} (relative) after {num_steps} sweeps; "
                      "raise num_steps", training.NotConverged, stacklevel=3)
    return best, interrupted



def screened_fit(run, start, num_steps: int, tol: float, restarts: int, seed: int, progress: bool, label: str,
                 screen_sweeps: int):
    """Restarts screened, then the best continued: ``restarts`` starts ``start(i, gen)`` (i = 0, 1, ..., one
    generator seeded by ``seed``) each run for ``screen_sweeps`` sweeps by ``run(state, num_sweeps, tol, on_step)
    -> fit`` (a ``SweepRecord`` with a ``state`` field to continue from), the one with the best objective then
    run on to ``num_steps`` sweeps in all (or the relative change ``tol``), its histories and terms joined.
    ``(that fit, interrupted by Ctrl-C)`` (``best_of_restarts``; with one start no screening)."""
    gen = torch.Generator().manual_seed(seed)
    screen = num_steps if restarts == 1 else min(num_steps, screen_sweeps)
    best, interrupted = best_of_restarts(
        lambda i, desc, on_step: run(start(i, gen), screen, tol, on_step), restarts, screen, tol, progress,
        label if restarts == 1 else f"{label} screening", check_convergence=restarts == 1)
    if restarts == 1 or interrupted or best.converged or screen == num_steps:
        return best, interrupted

    def go_on(i: int, desc: str, on_step):
        rest = run(best.state, num_steps - screen, tol, on_step)
        terms = {k: v + rest.terms[k] for k, v in best.terms.items()}
        return type(rest)(best.history + rest.history, terms, rest.converged, rest.interrupted, state=rest.state)

    return best_of_restarts(go_on, 1, num_steps - screen, tol, progress, label)

def record_sweep(terms: dict[str, float], history: list, terms_history: dict, tol: float, dtype: torch.dtype,
                 on_step=None, scale: float | None = None) -> bool:
    """Book one coordinate-ascent sweep: its ELBO (the sum of ``terms``) appended to ``history``, each term to
    ``terms_history[name]``; ``ELBODecreased`` warned when it fell below the last one by more than the round-off
    of ``scale`` (default: the last ELBO) in ``dtype``; ``on_step(elbo)`` called. Returns whether the fit has
    converged: relative change of the ELBO <= ``tol``."""
    value = sum(terms.values())
    for k, v in terms.items():
        terms_history.setdefault(k, []).append(v)
    if history and value < history[-1] - round_off(history[-1] if scale is None else scale, dtype):
        warnings.warn(f"vi: the ELBO decreased from {history[-1]:.6g} to {value:.6g} in sweep "
                      f"{len(history) + 1}", ELBODecreased, stacklevel=4)
    history.append(value)
    if on_step is not None:
        on_step(value)
    return len(history) > 1 and abs(history[-1] - history[-2]) <= tol * abs(history[-1])


def sweep_until(step, state, num_steps: int, tol: float, dtype: torch.dtype, on_step=None) -> tuple:
    """The loop of every coordinate-ascent fit of the vi backend: ``step(state, history) -> (state, terms, scale)``
    (one sweep from ``state``; its objective's ``terms``; ``scale`` the round-off reference of ``record_sweep``, None:
    the last value) run until the relative change of the objective is at most ``tol`` or ``num_steps`` sweeps ran.
    A sweep counts once ``step`` has returned: Ctrl-C stops at the last whole one (re-raised before the first).
    Returns ``(state, history, terms_history, converged, interrupted)``."""
    history, terms_history, converged, interrupted = [], {}, False, False
    try:
        for _ in range(num_steps):
            state, terms, scale = step(state, history)
            if record_sweep(terms, history, terms_history, tol, dtype, on_step, scale):
                converged = True
                break
    except KeyboardInterrupt:
        if not history:
            raise
        interrupted = True
    return state, history, terms_history, converged, interrupted


def coordinate_ascent(structure: Structure, start: LocalState | None, num_steps: int, tol: float,
                      on_step=None, checkpoints: Checkpoints | None = None, desc: str = "vi") -> Fit:
    """Sweeps (local step, global step, ELBO) from the hard start ``start`` (None: no local) until the relative
    ELBO change is below ``tol`` or ``num_steps`` sweeps ran; warns ``ELBODecreased`` if a sweep lowers it by more
    than round-off. ``on_step(elbo)`` is called after each sweep (a progress bar).

    ``checkpoints`` (``inference/checkpoints.py``): the q's, q(z) and the ELBO history are written every
    ``checkpoints.every`` sweeps, at the end and on Ctrl-C; a saved run of the same key is restored (finished) or
    continued from its sweep (the sweeps are deterministic: bit-identical to the uninterrupted run). Ctrl-C
    stops at the last finished sweep (``Fit.interrupted``)."""
    key = checkpoints.key(desc) if checkpoints else None
    saved = checkpoints.resumed(key) if checkpoints else None
    if saved is not None:
        q, state, history, terms_history, converged = (saved["extra"][k] for k in
                                                        ("q", "state", "history", "terms", "converged"))
        if saved["done"]:
            return Fit(history, terms_history, converged, q=q, state=state, tables=child_tables(structure, q))
    else:
        q = global_step(structure, start, {g: G.prior for g, G in structure.globals.items()})
        state, history, terms_history, converged = start, [], {}, False
    tables = child_tables(structure, q)
    written = len(history)

    def write(done: bool) -> None:
        checkpoints.write(key, {"step": len(history), "done": done, "params": [], "optim": None, "rng": None,
                                "history": list(history),
                                "extra": {"q": q, "state": state, "history": list(history),
                                          "terms": {k: list(v) for k, v in terms_history.items()},
                                          "converged": converged}})

    interrupted = False
    try:
        for _ in range(len(history), num_steps):
            new_state = local_step(structure, q, tables) if structure.local is not None else state
            new_q = global_step(structure, new_state, q)
            new_tables = child_tables(structure, new_q)
            terms = {k: float(v) for k, v in elbo_terms(structure, new_q, new_tables, new_state).items()}
            state, q, tables = new_state, new_q, new_tables   # a sweep counts once it is whole (Ctrl-C)
            if record_sweep(terms, history, terms_history, tol, structure.dtype, on_step):
                converged = True
                break
            if checkpoints and checkpoints.due(len(history), written):
                write(False)
                written = len(history)
        if checkpoints:
            write(True)
    except KeyboardInterrupt:
        if not history:
            raise
        interrupted = True
        if checkpoints:
            write(False)
    return Fit(history, terms_history, converged, interrupted, q=q, state=state, tables=tables)


def _take(t, rows: torch.Tensor, dim: int, N: int):
    """``t`` restricted to ``rows`` along its data dim ``dim`` (size N; size 1 = broadcast, kept); a non-tensor is
    kept. Raises ValueError for any other layout (the caller then does not subsample)."""
    if not isinstance(t, torch.Tensor) or t.dim() <= dim or t.shape[dim] == 1:
        return t
    if t.shape[dim] != N:
        raise ValueError(f"dim {dim} of a {tuple(t.shape)} tensor is not the data's {N} rows")
    return t.index_select(dim, rows.to(t.device))


def subsample(structure: Structure, rows: torch.Tensor) -> Structure | None:
    """The structure of the same model on the data rows ``rows (n,)`` only: a mixture whose local has one data dim
    ``(N,)`` and whose children are laid out ``(N, ...)`` (their values, weights, outer products, tabulated
    densities and known variances restricted to the rows). None for any other structure (a chain, several data
    dims, a child laid out otherwise)."""
    local = structure.local
    if local is None or local.kind != "mixture" or len(local.zshape) != 1:
        return None
    N = local.zshape[0]
    try:
        priors = {role: _take(v, rows, 0, N) for role, v in local.priors.items()}
        children = []
        for c in structure.children:
            if c.nz != 1:
                return None
            # known: "normal" variances (K, *zshape, *E) and "fixed" tables (K, *zshape) have the data at dim 1;
            # a "gaussian" child's (precision, log det) has no data dim
            known = _take(c.known, rows, 1, N) if c.kind in ("normal", "fixed") else c.known
            children.append(replace(c, y=_take(c.y, rows, 0, N), w=_take(c.w, rows, 0, N), known=known,
                                    yy=_take(c.yy, rows, 0, N)))
    except ValueError:
        return None
    return replace(structure, local=replace(local, zshape=(int(rows.shape[0]),), priors=priors),
                   children=tuple(children))


def stochastic_ascent(structure: Structure, start: LocalState, num_steps: int, tol: float, batch_size: int,
                      tau0: float, kappa: float, gen: torch.Generator, on_step=None) -> Fit:
    r"""Stochastic natural-gradient VI (Hoffman et al. 2013) on a mixture whose local has one data dim of N rows
    (``subsample`` must accept it): q(globals) starts at the global step from ``start`` (all rows, as
    ``coordinate_ascent``); then ``num_steps`` passes over the rows in random minibatches B of ``batch_size``
    (``stochastic.batches`` from ``gen``); step t: the local step on B, the targets
    :math:`\hat\lambda = \eta_0 + rac{N}{|B|}\sum_{n \in B} E_q[t_n]` (``global_step(..., scale=N / |B|)``) and
    :math:`\lambda \leftarrow (1 - 
ho_t)\lambda + 
ho_t\hat\lambda`, :math:`
ho_t = (	au_0 + t)^{-\kappa}`
    (``Family.blend``). With ``batch_size = N`` and :math:`
ho_1 = 1` (``tau0 = 0``) one pass is one
    coordinate-ascent sweep, bit for bit.

    ``history``: per pass the sum of its minibatches' data terms (each under the q it started from) minus the
    KLs at the pass's end (a noisy estimate, for progress; it stops early when that moves by less than ``tol``,
    relative), then the exact ELBO: a local step on all rows at the final q, whose terms are ``terms`` (one entry
    each) and whose q(z) is ``state``. Ctrl-C stops after the last whole step (``Fit.interrupted``)."""
    N = structure.local.zshape[0]
    q = global_step(structure, start, {g: G.prior for g, G in structure.globals.items()})
    history, converged, interrupted, t = [], False, False, 0
    try:
        for _ in range(num_steps):
            estimate = 0.0
            for rows in stochastic.batches(N, batch_size, gen):
                sub = subsample(structure, rows)
                tables = child_tables(sub, q)
                state = local_step(sub, q, tables)
                estimate += float(sum(local_terms(sub, q, tables, state).values()))
                target = global_step(sub, state, q, scale=N / rows.shape[0])
                t += 1
                rho = stochastic.step_size(t, tau0, kappa)
                q = {name: FAMILIES[g.family].blend(q[name], target[name], rho)
                     for name, g in structure.globals.items()}
            estimate -= sum(float(FAMILIES[g.family].kl(q[n], g.prior)) for n, g in structure.globals.items())
            history.append(estimate + structure.constant)
            if on_step is not None:
                on_step(history[-1])
            if len(history) > 1 and abs(history[-1] - history[-2]) <= tol * abs(history[-1]):
                converged = True
                break
    except KeyboardInterrupt:
        if t == 0:
            raise
        interrupted = True
    tables = child_tables(structure, q)
    state = local_step(structure, q, tables)
    terms = {k: [float(v)] for k, v in elbo_terms(structure, q, tables, state).items()}
    history.append(sum(v[0] for v in terms.values()))
    return Fit(history, terms, converged, interrupted, q=q, state=state, tables=tables)
