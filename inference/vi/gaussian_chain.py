r"""Variational Bayes for a linear dynamical system with conjugate priors (VB-EM; Beal 2003, ch. 5).

The model (one ``gaussian_chain`` x, observed y, t = 0..T-1, optionally N sequences in a plate):

.. math::
    (A, Q) \sim MNIW, \quad (C, R) \sim MNIW, \quad x_0 \sim N(m_0, P_0), \quad
    x_t \mid x_{t-1} \sim N(A x_{t-1}, Q), \quad y_t \mid x_t \sim N(C u_t, R),

with :math:`u_t = x_t` (C is ``(P, D)``) or :math:`u_t = (x_t, 1)` (C is ``(P, D + 1)``, its last column an
offset d). The mean-field posterior :math:`q(x_{0:T-1})\,q(A, Q)\,q(C, R)` is fitted by coordinate ascent,
every update in closed form:

- local step: :math:`q(x) \propto \exp(E_q\log p(x \mid A, Q) + E_q\log p(y \mid x, C, R))` is a Gaussian chain
  whose transition factors use :math:`E[Q^{-1}], E[Q^{-1}A], E[A^\top Q^{-1}A], E\log|Q|` and whose node
  potentials are :math:`J_t = E[C^\top R^{-1}C]_{xx}`,
  :math:`h_t = E[C^\top R^{-1}]_{x} y_t - E[C^\top R^{-1} C]_{x1}` (the conjugate likelihood potentials; the
  SVAE puts recognition potentials in the same slot). It is solved exactly by the SVAE's Gaussian-chain solver
  (``ppl.inference.svae.local.lds_local`` with ``expected=``), which returns the marginal and lag-one
  covariances (Kalman smoothing in information form; the expected blocks are not an (A, Q) pair, so the
  covariance-form RTS smoother does not apply);
- global step: :math:`q(A, Q) = MNIW(\eta_0 + \sum_t (E[x_tx_t^\top], E[x_tx_{t-1}^\top], E[x_{t-1}x_{t-1}^\top],
  1))` and :math:`q(C, R) = MNIW(\eta_0 + \sum_t (y_ty_t^\top, y_tE[u_t]^\top, E[u_tu_t^\top], 1))`.

ELBO, term by term (each in closed form; it never decreases):

.. math::
    \mathcal L = E_q\log p(y \mid x, C, R) + E_q\log p(x \mid A, Q) + H[q(x)]
                 - KL(q(A, Q)\|p(A, Q)) - KL(q(C, R)\|p(C, R)) + \log p(\text{sites with no latent parent}),

:math:`E_q\log N(y \mid Cu, R) = \langle E_q t(C, R), \sum_t(y y^\top, y E[u]^\top, E[uu^\top], 1)\rangle
- \tfrac{NTP}{2}\log 2\pi` (``expected_regression_log_lik``), the same pairing for the transitions, and
:math:`H[q(x)] = -KL_{local} - E_q\log p(x \mid A, Q)` from the solver's
:math:`KL_{local} = E_q\log q(x) - E_q\log p(x \mid A, Q)`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch

from ppl.expfam import mniw
from ppl.expfam._common import pair
from ppl.posterior import LogEvidence

from .. import training
from ..exact.kalman_info import LDSPrior
from ..results import make_posterior
from ..svae.local import expected_gaussian_log_density, lds_local
from .cavi import SweepRecord, best_of_restarts, sweep_until
from .conjugacy import NotConjugate
from .families import mniw_draws, mniw_mean
from .probe import close, is_global, peel, probe_runs

PRIOR = "MatrixNormalInverseWishart"


@dataclass(frozen=True)
class ChainStructure:
    """A conjugate LDS found by probing (``analyse_chain``). ``chain``: the gaussian_chain site; ``child``: the
    observed y ``(*batch, T, P)``; ``dynamics`` / ``emission``: the MNIW sites of (A, Q) and (C, R) with their
    prior natural parameters (float64, fields ``(D, D)`` and ``(P, m)``); ``offset``: C has an offset column
    (m = D + 1); ``initial_loc (*b, D)``, ``initial_cov (*b, D, D)``: x_0's known prior; ``constant``: log p of
    the observed sites that depend on no latent; ``dtype``: the data's (the fit runs in float64)."""

    chain: str
    child: str
    dynamics: str
    emission: str
    prior_dynamics: QState
    prior_emission: QState
    offset: bool
    initial_loc: torch.Tensor
    initial_cov: torch.Tensor
    y: torch.Tensor
    constant: float = 0.0
    dtype: torch.dtype = torch.float64

    @property
    def D(self) -> int:
        return self.initial_cov.shape[-1]

    @property
    def links(self) -> dict:
        return {self.dynamics: (self.chain,), self.emission: (self.child,)}


def _mniw_prior(name: str, site_a: dict, site_b: dict, batch: tuple = ()) -> mniw.MNIWNatural:
    """The prior natural parameters (float64) of MNIW global ``name``; NotConjugate for another family, a batch
    shape other than ``batch``, or parameters that depend on a latent."""
    base, other = peel(site_a["fn"])[0], peel(site_b["fn"])[0]
    family = type(base).__name__
    if family != PRIOR:
        raise NotConjugate(f"site '{name}': a {family} prior; backend 'vi' fits a gaussian_chain whose dynamics "
                           "(A, Q) and emission (C, R) have ppl.MatrixNormalInverseWishart priors")
    nat_a, nat_b = base.natural(), other.natural()
    for fa, fb in zip(nat_a, nat_b):
        if not close(fa, fb):
            raise NotConjugate(f"site '{name}': its prior's parameters depend on a latent variable")
    if tuple(nat_a.count.shape) != tuple(batch):
        raise NotConjugate(f"site '{name}': a MatrixNormalInverseWishart of batch shape {tuple(nat_a.count.shape)}; "
                           f"backend 'vi' needs batch shape {tuple(batch)} here (one (A, Q) per regime of a "
                           "switching chain, else one (A, Q) and one (C, R))")
    return mniw.MNIWNatural(*(f.detach().to(torch.float64) for f in nat_a))


def _unpack(value: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``[W | S]`` packed ``(n, m + n)`` -> (W ``(n, m)``, S ``(n, n)``)."""
    return value[..., :value.shape[-1] - n], value[..., value.shape[-1] - n:]


def _check_plain(name: str, site: dict, what: str) -> None:
    if site["mask"] is not None or not (isinstance(site["scale"], float) and site["scale"] == 1.0) or \
            peel(site["fn"])[2] is not None:
        raise NotConjugate(f"site '{name}': a masked or scaled {what} is not supported by backend 'vi' for a "
                           "gaussian_chain")


def analyse_chain(model, args, kwargs, facts, graph):
    """Probe ``model(*args, **kwargs)`` (two runs with different prior draws, ``probe.probe_runs``) for a conjugate
    LDS: one ``gaussian_chain`` x whose ``dynamics`` / ``noise_cov`` are the unpacked value of one
    ``ppl.MatrixNormalInverseWishart`` global, and one observed ``MultivariateNormal`` child whose loc is
    ``x @ C.T`` (or ``x @ C[:, :D].T + C[:, D]``) and whose covariance is R, (C, R) the unpacked value of another.
    NotConjugate names the site otherwise (a switching chain is ``slds.analyse_slds``'s)."""
    if len(facts.gaussian_chains) != 1:
        raise NotConjugate(f"sites {', '.join(map(repr, facts.gaussian_chains))}: backend 'vi' takes one "
                           "gaussian_chain")
    chain = facts.gaussian_chains[0]
    for what, sites in (("depends on a network: no conjugate update exists", facts.neural),
                        ("is a discrete latent; backend 'vi' fits a gaussian_chain without switching",
                         facts.markov_chains + facts.enumerable + facts.unenumerable)):
        if sites:
            raise NotConjugate(f"site '{sites[0]}' {what}")
    try:
        a, b = probe_runs(model, args, kwargs, None)
    except (RuntimeError, IndexError, TypeError, ValueError) as exc:
        raise NotConjugate(f"the model fails when run with fresh prior draws: {type(exc).__name__}: {exc}") from exc
    if a.params:
        raise NotConjugate(f"'{a.params[0]}' is a learnable parameter (ppl.param / ppl.module): backend 'vi' fits "
                           "no parameters; use backend='exact' or 'svi'")
    priors = {g: _mniw_prior(g, a.sites[g], b.sites[g]) for g in facts.continuous}
    fn_a, fn_b = peel(a.sites[chain]["fn"])[0], peel(b.sites[chain]["fn"])[0]
    _check_plain(chain, a.sites[chain], "gaussian_chain")
    if fn_a.time_varying or fn_a.offsets is not None:
        raise NotConjugate(f"gaussian_chain '{chain}': time-varying dynamics or control inputs have no conjugate "
                           "MNIW update in backend 'vi' (use backend='exact')")
    D = fn_a.dim
    dyn = [g for g in priors if priors[g].sum_yxT.shape == (D, D)
           and all(is_global(f.dynamics, _unpack(r.sites[g]["value"], D)[0])
                   and is_global(f.noise_cov, _unpack(r.sites[g]["value"], D)[1]) for f, r in ((fn_a, a), (fn_b, b)))]
    if not dyn:
        raise NotConjugate(f"gaussian_chain '{chain}': its dynamics and noise_cov are not the unpacked value (A, Q) "
                           "of a ppl.MatrixNormalInverseWishart global (A, Q = "
                           "ppl.MatrixNormalInverseWishart.unpack(value))")
    init = {k: getattr(fn_a, k) for k in ("initial_loc", "initial_cov")}
    for k, v in init.items():
        if not close(v, getattr(fn_b, k)):
            raise NotConjugate(f"gaussian_chain '{chain}': its {k} depends on a latent variable")
    children = [n for n, s in a.sites.items() if s["observed"] and n in graph.children_of(chain)]
    if len(children) != 1:
        raise NotConjugate(f"gaussian_chain '{chain}': backend 'vi' needs exactly one observed child, got "
                           f"{children or 'none'}")
    child = children[0]
    emission, offset, y = _match_emission(child, a, b, chain, D, priors, dyn[0])
    constant = 0.0
    for name, site in a.sites.items():
        if site["observed"] and name != child:
            lp_a, lp_b = site["fn"].log_prob(site["value"]), b.sites[name]["fn"].log_prob(b.sites[name]["value"])
            if not close(lp_a, lp_b):
                raise NotConjugate(f"site '{name}': an observed site that depends on a latent other than through "
                                   f"'{child}' is not supported by backend 'vi' for a gaussian_chain")
            constant += float(lp_a.sum())
    unused = sorted(set(priors) - {dyn[0], emission})
    if unused:
        raise NotConjugate(f"site '{unused[0]}': a global neither the chain's (A, Q) nor its emission's (C, R)")
    return ChainStructure(chain, child, dyn[0], emission, q_state(priors[dyn[0]]), q_state(priors[emission]), offset,
                          init["initial_loc"].detach().to(torch.float64),
                          init["initial_cov"].detach().to(torch.float64), y.to(torch.float64), constant, y.dtype)


def _match_emission(child: str, a, b, chain: str, D: int, priors: dict, dyn: str):
    """(emission global, offset, y) of the observed child: a MultivariateNormal with loc ``C u_t`` and
    covariance R for (C, R) an MNIW global's unpacked value in both probe runs."""
    site = a.sites[child]
    _check_plain(child, site, "observed child")
    base_a, base_b = peel(site["fn"])[0], peel(b.sites[child]["fn"])[0]
    if type(base_a).__name__ != "MultivariateNormal":
        raise NotConjugate(f"site '{child}': a {type(base_a).__name__} likelihood; backend 'vi' needs "
                           "MultivariateNormal(x @ C.T (+ d), R) with (C, R) from a ppl.MatrixNormalInverseWishart")
    y = site["value"]
    P = y.shape[-1]
    for g, prior in priors.items():
        n, m = prior.sum_yxT.shape
        if g == dyn or n != P or m not in (D, D + 1):
            continue
        ok = True
        for run, base in ((a, base_a), (b, base_b)):
            C, R = _unpack(run.sites[g]["value"], P)
            x = run.sites[chain]["value"]
            pred = x @ C[:, :D].mT + (C[:, D] if m == D + 1 else 0.0)
            ok = ok and close(base.loc, pred) and close(base.covariance_matrix, R)
        if ok:
            lead = tuple(base_a.loc.shape[:-1])
            return g, m == D + 1, y.expand(lead + (P,))
    raise NotConjugate(f"site '{child}': its loc and covariance are not (x @ C.T (+ d), R) for (C, R) the unpacked "
                       "value of a ppl.MatrixNormalInverseWishart global with C of shape (P, D) or (P, D + 1)")


# ------------------------------------------------------------------------------------------------------------
# closed-form pieces


class QState(NamedTuple):
    r"""An MNIW factor q(W, S) with what the sweeps read: ``natural`` (``mniw.MNIWNatural``), ``expected``
    (``mniw.MNIWExpectations``: :math:`E[S^{-1}], E[S^{-1}W], E[W^\top S^{-1}W], E\log|S|`) and
    ``log_partition`` :math:`A(\eta)` (each computed once per global step)."""

    natural: mniw.MNIWNatural
    expected: mniw.MNIWExpectations
    log_partition: torch.Tensor


def q_state(natural: mniw.MNIWNatural, validate: bool = True) -> QState:
    """``QState`` of the MNIW natural parameters ``natural`` (one factorization, ``mniw.factors``). ``validate``:
    True for a prior read off the model (checked once, when the model is analysed); False inside the sweeps,
    where ``natural`` is a validated prior plus expected statistics."""
    f = mniw.factors(natural, validate)
    return QState(natural, mniw.expectations_from_factors(f), mniw.log_partition_from_factors(f))


def posterior(prior: QState, stats: mniw.MNIWNatural) -> QState:
    """The conjugate update ``prior + stats`` inside a sweep (no re-validation; ``q_state``)."""
    return q_state(mniw.conjugate_update(prior.natural, stats, validate=False), validate=False)


def expected_t(e: mniw.MNIWExpectations) -> mniw.MNIWStats:
    r""":math:`E_q t(W, S) = (-\tfrac12 E[S^{-1}], E[S^{-1}W], -\tfrac12 E[W^\top S^{-1}W], -\tfrac12 E\log|S|)`."""
    return mniw.MNIWStats(-0.5 * e.Qinv, e.Qinv_A, -0.5 * e.At_Qinv_A, -0.5 * e.logdet_Q)


def mniw_kl(q: QState, prior: QState) -> torch.Tensor:
    r""":math:`KL(q\|p) = A(\eta_p) - A(\eta_q) - \langle\eta_p - \eta_q, E_q t\rangle` (``mniw.kl`` from the
    cached parts): a scalar."""
    diff = [p - q_ for p, q_ in zip(prior.natural, q.natural)]
    return prior.log_partition - q.log_partition - pair(diff, expected_t(q.expected), mniw.EVENT_DIMS)


def expected_regression_log_lik(e: mniw.MNIWExpectations, stats: mniw.MNIWNatural) -> torch.Tensor:
    r""":math:`E_{q(W, S)}\sum_i \log N(y_i \mid W u_i, S)` from regression statistics
    ``stats = (sum y y^T, sum y E[u]^T, sum E[u u^T], count)`` (``mniw.MNIWNatural`` layout, fields ``(n, n)``,
    ``(n, m)``, ``(m, m)``, ``()``) and q's expectations ``e``:
    :math:`\langle E_q t(W, S), \text{stats}\rangle - \tfrac{n\,\text{count}}{2}\log 2\pi`; a scalar."""
    n = stats.sum_yyT.shape[-1]
    return pair(expected_t(e), stats, mniw.EVENT_DIMS) - 0.5 * n * stats.count * math.log(2 * math.pi)


@dataclass
class ChainLocal:
    """q(x): ``mean (*b, T, D)``, ``cov (*b, T, D, D)`` Cov(x_t), ``cross (*b, T-1, D, D)`` Cov(x_{t+1}, x_t),
    ``entropy`` H[q(x)] (a scalar; 0 for a hard start)."""

    mean: torch.Tensor
    cov: torch.Tensor
    cross: torch.Tensor
    entropy: torch.Tensor


def _second(local: ChainLocal) -> torch.Tensor:
    m = local.mean
    s = local.cov + m[..., :, None] * m[..., None, :]
    return 0.5 * (s + s.mT)


def transition_stats(local: ChainLocal) -> mniw.MNIWNatural:
    r"""Expected transition statistics of q(x), summed over the batch:
    :math:`\sum(E[x_tx_t^\top]_{t\ge1}, E[x_tx_{t-1}^\top], E[x_{t-1}x_{t-1}^\top]_{t\le T-2}, T - 1)` with
    :math:`E[x_tx_s^\top] = \mathrm{Cov}(x_t, x_s) + m_tm_s^\top` (``mniw.expected_transition_stats``)."""
    m = local.mean
    T, D = m.shape[-2:]
    lagged = local.cross + m[..., 1:, :, None] * m[..., :-1, None, :]
    per_seq = mniw.expected_transition_stats(_second(local).reshape(-1, T, D, D), lagged.reshape(-1, T - 1, D, D))
    return mniw.MNIWNatural(*(f.sum(0) for f in per_seq))


def emission_stats(s: ChainStructure, local: ChainLocal) -> mniw.MNIWNatural:
    r"""Expected regression statistics of y on :math:`u_t`: :math:`\sum_t (y_ty_t^\top, y_tE[u_t]^\top,
    E[u_tu_t^\top], 1)`, summed over the batch and time; :math:`u_t = x_t` or :math:`(x_t, 1)`."""
    y = s.y.reshape(-1, s.y.shape[-1])
    mean = local.mean.expand(s.y.shape[:-1] + (s.D,)).reshape(-1, s.D)
    second = _second(local).expand(s.y.shape[:-1] + (s.D, s.D)).reshape(-1, s.D, s.D).sum(0)
    syx, sx = y.mT @ mean, mean.sum(0)
    count = torch.tensor(float(y.shape[0]), dtype=y.dtype, device=y.device)
    if s.offset:
        syx = torch.cat([syx, y.sum(0)[:, None]], -1)
        second = torch.cat([torch.cat([second, sx[:, None]], -1), torch.cat([sx, count[None]])[None]], -2)
    return mniw.MNIWNatural(y.mT @ y, syx, second, count)


def global_step(s: ChainStructure, local: ChainLocal) -> tuple[QState, QState]:
    """(q(A, Q), q(C, R)): the priors' natural parameters plus the expected statistics of ``local``."""
    return posterior(s.prior_dynamics, transition_stats(local)), posterior(s.prior_emission, emission_stats(s, local))


def emission_potentials(s: ChainStructure, q_em: QState) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Node potentials ``J (*b, T, D, D)``, ``h (*b, T, D)`` of :math:`E_{q(C, R)}\log N(y_t \mid Cu_t, R)` in
    :math:`x_t`: :math:`J = E[C^\top R^{-1}C]_{xx}`, :math:`h_t = E[R^{-1}C]_x^\top y_t - E[C^\top R^{-1}C]_{x1}`."""
    e = q_em.expected
    D = s.D
    J = e.At_Qinv_A[:D, :D]
    h = s.y @ e.Qinv_A[:, :D]
    if s.offset:
        h = h - e.At_Qinv_A[:D, D]
    return J.expand(s.y.shape[:-1] + (D, D)), h


def local_step(s: ChainStructure, q_dyn: QState, q_em: QState) -> ChainLocal:
    """The optimal q(x) given q(A, Q), q(C, R) (module docstring), with its entropy."""
    J, h = emission_potentials(s, q_em)
    e = q_dyn.expected
    T, D = h.shape[-2:]
    unused = torch.eye(D, dtype=h.dtype, device=h.device)     # (A, Q) are replaced by their expectations
    prior = LDSPrior(s.initial_loc, s.initial_cov, unused, unused)
    sol = lds_local(prior, J, h, expected=e, moments=True)
    cov, cross = sol.moments
    local = ChainLocal(sol.mean, cov, cross, torch.zeros((), dtype=h.dtype, device=h.device))
    local.entropy = -sol.kl - expected_log_prior(s, q_dyn, local)
    return local


def expected_log_prior(s: ChainStructure, q_dyn: QState, local: ChainLocal) -> torch.Tensor:
    r""":math:`E_{q(x)q(A,Q)}\log p(x \mid A, Q) = \sum E\log N(x_0 \mid m_0, P_0) + E\sum_{t\ge1}\log
    N(x_t \mid Ax_{t-1}, Q)`: a scalar."""
    first = expected_gaussian_log_density(s.initial_loc, torch.linalg.inv(s.initial_cov), local.mean[..., 0, :],
                                          local.cov[..., 0, :, :])
    first = first.expand(local.mean.shape[:-2]).sum()
    if local.mean.shape[-2] == 1:
        return first
    return first + expected_regression_log_lik(q_dyn.expected, transition_stats(local))


def elbo_terms(s: ChainStructure, q_dyn: QState, q_em: QState, local: ChainLocal) -> dict[str, torch.Tensor]:
    """The ELBO term by term (module docstring); they sum to the ELBO."""
    terms = {f"E log p({s.child})": expected_regression_log_lik(q_em.expected, emission_stats(s, local)),
             f"E log p({s.chain})": expected_log_prior(s, q_dyn, local),
             f"entropy({s.chain})": local.entropy,
             f"-KL({s.dynamics})": -mniw_kl(q_dyn, s.prior_dynamics),
             f"-KL({s.emission})": -mniw_kl(q_em, s.prior_emission)}
    if s.constant:
        terms["log p(sites with no latent parent)"] = torch.tensor(s.constant, dtype=torch.float64)
    return terms


def hard_start(s: ChainStructure, x: torch.Tensor) -> ChainLocal:
    """q(x) as a point mass on the path ``x (*b, T, D)`` (entropy 0): a data-driven start."""
    x = x.to(torch.float64)
    T, D = x.shape[-2:]
    zero = x.new_zeros(())
    return ChainLocal(x, zero.expand(x.shape + (D,)), zero.expand(x.shape[:-2] + (T - 1, D, D)), zero)


def projection_starts(s: ChainStructure, restarts: int, seed: int) -> list[ChainLocal]:
    """Hard starts: the first ``restarts`` paths are the data projected onto its top D principal directions
    (centred when C has an offset), then onto seeded random directions; each scaled to unit variance per
    coordinate (the states' scale is set by x_0's prior and Q, not by the data)."""
    y = s.y
    flat = y.reshape(-1, y.shape[-1])
    centred = flat - flat.mean(0) if s.offset else flat
    gen = torch.Generator().manual_seed(seed)
    directions = []
    _, _, vh = torch.linalg.svd(centred, full_matrices=False)
    pca = vh[:s.D].mT
    if pca.shape[1] < s.D:   # P < D: the missing directions at random
        extra = torch.randn(pca.shape[0], s.D - pca.shape[1], generator=gen, dtype=y.dtype).to(y.device)
        pca = torch.cat([pca, extra], 1)
    directions.append(pca)
    for _ in range(restarts - 1):
        directions.append(torch.randn(flat.shape[-1], s.D, generator=gen, dtype=y.dtype).to(y.device))
    out = []
    for V in directions:
        x = centred @ V
        x = x / x.std(0).clamp_min(1e-12) if x.shape[0] > 1 else x
        out.append(hard_start(s, x.reshape(y.shape[:-1] + (s.D,))))
    return out


@dataclass(kw_only=True)
class ChainFit(SweepRecord):
    """One coordinate-ascent run: q(A, Q), q(C, R) natural parameters, q(x), ELBO per sweep, terms per sweep."""

    q_dyn: QState
    q_em: QState
    local: ChainLocal


def coordinate_ascent(s: ChainStructure, start: ChainLocal, num_steps: int, tol: float, on_step=None) -> ChainFit:
    """From the hard start ``start``: the global step, then sweeps (local step, global step, ELBO) until the
    relative ELBO change is below ``tol`` or ``num_steps`` sweeps ran. The ELBO after each sweep is
    :math:`\\mathcal L(q(x), q(A, Q), q(C, R))` at the sweep's factors (both steps are exact coordinate maxima, so
    it never decreases; ``cavi.ELBODecreased`` warns otherwise). Ctrl-C stops at the last finished sweep."""
    def step(current, _):
        _, q_dyn, q_em = current
        local = local_step(s, q_dyn, q_em)
        q_dyn, q_em = global_step(s, local)
        terms = {k: float(v) for k, v in elbo_terms(s, q_dyn, q_em, local).items()}
        # round-off of the terms' own parts: the KLs cancel log-partitions of the size of the priors'
        scale = sum(abs(v) for v in terms.values()) + sum(abs(float(p.log_partition)) for p in
                                                         (s.prior_dynamics, s.prior_emission))
        return (local, q_dyn, q_em), terms, scale

    (local, q_dyn, q_em), *fields = sweep_until(step, (start, *global_step(s, start)), num_steps, tol,
                                                torch.float64, on_step)
    return ChainFit(*fields, q_dyn=q_dyn, q_em=q_em, local=local)


def describe(s) -> dict[str, str]:
    """site -> the closed-form update ``plan.explain()`` prints for an LDS (an SLDS: ``slds.describe``)."""
    return {s.dynamics: f"q({s.dynamics}) = MNIW over (A, Q): closed form from expected state statistics of "
                        f"{s.chain} (sum_t E[x_t x_t^T], E[x_t x_t-1^T], E[x_t-1 x_t-1^T], T - 1)",
            s.emission: describe_emission(s.emission, s.child, s.chain)}


def describe_emission(emission: str, child: str, chain: str) -> str:
    """The explain() line of the emission's q(C, R)."""
    return (f"q({emission}) = MNIW over (C, R): closed form from expected regression statistics of {child} on "
            f"{chain} (sum_t y_t y_t^T, y_t E[x_t]^T, E[x_t x_t^T], T)")


LOCAL_TREATMENT = ("q(x): Kalman smoothing (information form, exact) on the expected dynamics E_q[Q^-1], "
                   "E_q[Q^-1 A], E_q[A^T Q^-1 A], E_q[log|Q|] and the expected emission potentials E_q[C^T R^-1 C], "
                   "E_q[C^T R^-1] y_t (VB-LDS)")


def structural_problem(graph, facts) -> str:
    """Why the graph alone rules a gaussian_chain model out for backend 'vi' ("" if it does not; a switching chain
    is checked by probing, ``slds.analyse_slds``)."""
    if facts.switching:
        return ""
    if len(facts.gaussian_chains) != 1:
        return (f"sites {', '.join(map(repr, facts.gaussian_chains))}: backend 'vi' takes one gaussian_chain")
    for what, sites in (("depends on a network: no conjugate update exists", facts.neural),
                        ("is a discrete latent; backend 'vi' fits a gaussian_chain without switching",
                         facts.markov_chains + facts.enumerable + facts.unenumerable)):
        if sites:
            return f"site '{sites[0]}' {what}"
    for g in facts.continuous:
        family = graph.site(g).family
        if family != PRIOR:
            return (f"site '{g}': a {family} prior; backend 'vi' fits a gaussian_chain whose dynamics (A, Q) and "
                    "emission (C, R) have ppl.MatrixNormalInverseWishart priors")
    return ""


def run(model, args, kwargs, plan, num_steps: int, tol: float, restarts: int, seed: int, num_samples: int,
        progress: bool):
    """The vi backend's fit of a conjugate LDS (``backend.run`` hands it over): ``restarts`` hard starts
    (``projection_starts``, seeded by ``seed``), each at most ``num_steps`` sweeps of ``coordinate_ascent``, the
    best ELBO kept. Returns the Posterior: draws of (A, Q) and (C, R) from q packed as the sites' values,
    ``point`` their q means, ``smoothed_means[chain]`` = E_q[x], the ELBO as ``log_evidence``, ``history`` (the
    negative ELBO per sweep) and ``elbo_terms``. A switching chain is fitted by ``slds.run``."""
    s = analyse_chain(model, args, kwargs, plan.facts, plan.graph)
    starts = projection_starts(s, restarts, seed)
    best, interrupted = best_of_restarts(lambda i, desc, on_step: coordinate_ascent(s, starts[i], num_steps, tol,
                                                                                    on_step),
                                         len(starts), num_steps, tol, progress)
    draws, point = {}, {}
    for site, q in ((s.dynamics, best.q_dyn), (s.emission, best.q_em)):
        draws[site] = mniw_draws(q.natural, num_samples).to(s.dtype).unsqueeze(0)
        point[site] = mniw_mean(q.natural).to(s.dtype)
    history = training.History(-v for v in best.history)
    history.interrupted = interrupted
    return make_posterior(plan, model, args, kwargs, draws=draws, point=point, history=history,
                          log_evidence=LogEvidence(best.elbo, "ELBO (lower bound)"), elbo_terms=best.terms,
                          smoothed_means={s.chain: best.local.mean.to(s.dtype)})
