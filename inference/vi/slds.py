r"""Variational Bayes for a switching linear dynamical system by structured mean field (Ghahramani & Hinton 2000).

The model (``ppl.switching_chain``: a ``markov_chain`` z selecting the dynamics of a ``gaussian_chain`` x):

.. math::
    \pi_{k,:} \sim \mathrm{Dir}(\alpha_k)\ (\text{or fixed}), \quad (A_k, Q_k) \sim MNIW_k, \quad (C, R) \sim MNIW, \\
    z_0 \sim \mathrm{Cat}(p_0), \quad z_t \mid z_{t-1} \sim \mathrm{Cat}(\pi_{z_{t-1},:}), \quad
    x_0 \sim N(m_0, P_0), \quad x_t \mid x_{t-1}, z_t \sim N(A_{z_t}x_{t-1}, Q_{z_t}), \quad
    y_t \mid x_t \sim N(Cu_t, R),

with :math:`u_t = x_t` or :math:`(x_t, 1)`. The posterior is approximated by
:math:`q(z_{0:T-1})\,q(x_{0:T-1})\,q(\pi)\prod_k q(A_k, Q_k)\,q(C, R)`; every factor is updated in closed form:

- q(x) given :math:`r_{tk} = q(z_t = k)`: a Gaussian chain whose step-t transition factor is
  :math:`\exp\sum_k r_{tk}E_q\log N(x_t \mid A_kx_{t-1}, Q_k)` (blocks :math:`\sum_k r_{tk}E[Q_k^{-1}]`,
  :math:`\sum_k r_{tk}E[Q_k^{-1}A_k]`, :math:`\sum_k r_{tk}E[A_k^\top Q_k^{-1}A_k]`,
  :math:`\sum_k r_{tk}E\log|Q_k|`) with the conjugate emission potentials of the LDS (``gaussian_chain``): the
  same exact solver (``ppl.inference.svae.local.lds_local``, time-varying expected blocks);
- q(z) given q(x): forward-backward with :math:`E_q\log p_0`, :math:`E_q\log\pi` and the expected
  log-likelihoods :math:`L_{tk} = E_q\log N(x_t \mid A_kx_{t-1}, Q_k)` (t >= 1; :math:`L_{0k} = 0`);
- globals: :math:`q(A_k, Q_k) = MNIW(\eta_k + \sum_t r_{tk}(E[x_tx_t^\top], E[x_tx_{t-1}^\top],
  E[x_{t-1}x_{t-1}^\top], 1))`, :math:`q(\pi_{j,:}) = \mathrm{Dir}(\alpha_j + \sum_t \xi_t(j, :))`, q(C, R) as
  for the LDS.

ELBO, term by term: :math:`E\log p(y) + E\log p(x \mid z) + E\log p(z) + H[q(x)] + H[q(z)] - \sum KL`, with
:math:`H[q(z)] = \log Z_z - E_{q(z)}[\log p_0 + E\log\pi + L]` and :math:`H[q(x)] = -KL_{local} -
E_q\log\tilde p(x)` from the solver (``gaussian_chain``). Every update is an exact coordinate maximum, so it
never decreases.

Speed (``bench/bench_slds.py``): the sweeps skip the MNIW input checks (the priors are validated once, when the model
is analysed; ``gaussian_chain.posterior``); plain coordinate ascent crawls along the free latent basis, so every two
sweeps are followed by a SQUAREM extrapolation of the globals' natural parameters (``extrapolate``), kept only when
its sweep does not lower the ELBO; restarts are screened by ``SCREEN_SWEEPS`` sweeps each and only the best start
is continued (``fit``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ppl.expfam import mniw
from ppl.handlers import DiscreteTable
from ppl.posterior import LogEvidence

from .. import training
from ..exact import hmm
from ..exact.kalman_info import LDSPrior
from ..results import make_posterior
from ..svae.local import expected_gaussian_log_density, lds_local
from . import gaussian_chain as lds
from .cavi import SweepRecord, best_of_restarts, record_sweep
from .conjugacy import NotConjugate
from .families import FAMILIES, dirichlet_expected_log
from .probe import close, is_global, peel, probe_runs


@dataclass(frozen=True)
class SLDSStructure:
    """A conjugate switching LDS found by probing (``analyse_slds``): ``z`` the markov_chain, ``chain`` the
    gaussian_chain, ``child`` the observed y ``(*batch, T, P)``; ``dynamics``: the MNIW site of the K regimes'
    (A_k, Q_k) (prior ``QState`` of batch (K,)); ``trans``: the Dirichlet site of the transition rows (prior
    concentration ``(K, K)``) or None with ``log_trans`` fixed ``(K, K)``; ``log_init (K,)`` fixed; ``emission``,
    ``offset``, ``initial_loc``, ``initial_cov``, ``constant``, ``dtype`` as ``gaussian_chain.ChainStructure``."""

    z: str
    chain: str
    child: str
    dynamics: str
    emission: str
    trans: str | None
    prior_dynamics: lds.QState
    prior_emission: lds.QState
    prior_trans: torch.Tensor | None
    log_trans: torch.Tensor | None
    log_init: torch.Tensor
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
    def K(self) -> int:
        return self.log_init.shape[-1]


def analyse_slds(model, args, kwargs, facts, graph) -> SLDSStructure:
    """Probe ``model(*args, **kwargs)`` for a conjugate switching LDS: a ``markov_chain`` z whose transition matrix is
    a Dirichlet global's value (or fixed) and initial distribution fixed, a ``gaussian_chain`` x switched by z whose
    per-step (A_t, Q_t) are ``(A[z_t], Q[z_t])`` for (A, Q) the unpacked value of one
    ``ppl.MatrixNormalInverseWishart`` of batch (K,), and one MultivariateNormal child as for the LDS
    (``gaussian_chain.analyse_chain``). NotConjugate names the site otherwise."""
    if len(facts.switching) != 1 or facts.enumerable or facts.unenumerable or facts.neural or \
            len(facts.markov_chains) != 1 or len(facts.gaussian_chains) != 1:
        raise NotConjugate("backend 'vi' fits one switching chain (a markov_chain selecting the dynamics of one "
                           "gaussian_chain) with no other discrete latent and no network")
    z, chain = facts.switching[0]
    try:
        a, b = probe_runs(model, args, kwargs, None)
    except (RuntimeError, IndexError, TypeError, ValueError) as exc:
        raise NotConjugate(f"the model fails when run with fresh prior draws: {type(exc).__name__}: {exc}") from exc
    if a.params:
        raise NotConjugate(f"'{a.params[0]}' is a learnable parameter (ppl.param / ppl.module): backend 'vi' fits "
                           "no parameters")
    zfn_a, zfn_b = peel(a.sites[z]["fn"])[0], peel(b.sites[z]["fn"])[0]
    lds._check_plain(z, a.sites[z], "markov_chain")
    if zfn_a.time_varying:
        raise NotConjugate(f"markov_chain '{z}': time-varying transitions have no conjugate Dirichlet update")
    K = int(zfn_a.num_states)
    if not close(zfn_a.log_init, zfn_b.log_init) or zfn_a.log_init.dim() != 1:
        raise NotConjugate(f"markov_chain '{z}': backend 'vi' needs a fixed, unbatched initial distribution")
    trans, prior_trans, log_trans = None, None, None
    for g in facts.continuous:
        base = peel(a.sites[g]["fn"])[0]
        if type(base).__name__ == "Dirichlet" and is_global(zfn_a.log_trans.exp(), a.sites[g]["value"]) and \
                is_global(zfn_b.log_trans.exp(), b.sites[g]["value"]) and a.sites[g]["value"].shape == (K, K):
            if not close(base.concentration, peel(b.sites[g]["fn"])[0].concentration):
                raise NotConjugate(f"site '{g}': its prior's concentration depends on a latent variable")
            trans, prior_trans = g, base.concentration.detach().to(torch.float64).expand(K, K)
            break
    if trans is None:
        if not close(zfn_a.log_trans, zfn_b.log_trans) or zfn_a.log_trans.shape != (K, K):
            raise NotConjugate(f"markov_chain '{z}': its transition matrix is neither a Dirichlet global's value "
                               "(K, K) nor fixed")
        log_trans = zfn_a.log_trans.detach().to(torch.float64)
    fn_a, fn_b = peel(a.sites[chain]["fn"])[0], peel(b.sites[chain]["fn"])[0]
    lds._check_plain(chain, a.sites[chain], "gaussian_chain")
    if fn_a.offsets is not None:
        raise NotConjugate(f"gaussian_chain '{chain}': control inputs have no conjugate MNIW update in backend 'vi'")
    D = fn_a.dim
    others = [g for g in facts.continuous if g != trans]
    dyn = None
    for g in others:
        if peel(a.sites[g]["fn"])[0].__class__.__name__ != lds.PRIOR or a.sites[g]["value"].shape != (K, D, 2 * D):
            continue
        ok = True
        for fn, run in ((fn_a, a), (fn_b, b)):
            A, Q = lds._unpack(run.sites[g]["value"], D)
            steps = run.sites[z]["value"][..., 1:].long()
            ok = ok and fn.time_varying and close(fn.dynamics, A[steps]) and close(fn.noise_cov, Q[steps])
        if ok:
            dyn = g
            break
    if dyn is None:
        raise NotConjugate(f"gaussian_chain '{chain}': its per-regime dynamics and noise_cov are not the unpacked "
                           f"value (A, Q) of a ppl.MatrixNormalInverseWishart of batch ({K},) (one per regime)")
    prior_dyn = lds._mniw_prior(dyn, a.sites[dyn], b.sites[dyn], (K,))
    priors = {g: lds._mniw_prior(g, a.sites[g], b.sites[g]) for g in others if g != dyn}
    init = {k: getattr(fn_a, k) for k in ("initial_loc", "initial_cov")}
    for k, v in init.items():
        if not close(v, getattr(fn_b, k)):
            raise NotConjugate(f"gaussian_chain '{chain}': its {k} depends on a latent variable")
    children = [n for n, s in a.sites.items() if s["observed"] and n in graph.children_of(chain)]
    if len(children) != 1:
        raise NotConjugate(f"gaussian_chain '{chain}': backend 'vi' needs exactly one observed child, got "
                           f"{children or 'none'}")
    child = children[0]
    emission, offset, y = lds._match_emission(child, a, b, chain, D, priors, dyn)
    unused = sorted(set(priors) - {emission})
    if unused:
        raise NotConjugate(f"site '{unused[0]}': a global that is neither the regimes' (A, Q), the transition "
                           "matrix nor the emission's (C, R)")
    constant = 0.0
    for name, site in a.sites.items():
        if site["observed"] and name != child:
            lp_a, lp_b = site["fn"].log_prob(site["value"]), b.sites[name]["fn"].log_prob(b.sites[name]["value"])
            if not close(lp_a, lp_b):
                raise NotConjugate(f"site '{name}': an observed site that depends on a latent other than through "
                                   f"'{child}' is not supported by backend 'vi' for a switching chain")
            constant += float(lp_a.sum())
    return SLDSStructure(z, chain, child, dyn, emission, trans, lds.q_state(prior_dyn), lds.q_state(priors[emission]),
                         prior_trans, log_trans, zfn_a.log_init.detach().to(torch.float64), offset,
                         init["initial_loc"].detach().to(torch.float64), init["initial_cov"].detach().to(torch.float64),
                         y.to(torch.float64), constant, y.dtype)


# ------------------------------------------------------------------------------------------------------------
# closed-form pieces


@dataclass
class Regimes:
    """q(z): ``r (*b, T, K)`` marginals, ``pairwise (K, K)`` expected transition counts summed over the batch and
    time, ``entropy`` H[q(z)] (a scalar)."""

    r: torch.Tensor
    pairwise: torch.Tensor
    entropy: torch.Tensor


def _lagged(local: lds.ChainLocal) -> torch.Tensor:
    m = local.mean
    return local.cross + m[..., 1:, :, None] * m[..., :-1, None, :]          # E[x_t x_{t-1}^T], t >= 1


def transition_table(e: mniw.MNIWExpectations, local: lds.ChainLocal) -> torch.Tensor:
    r""":math:`L_{tk} = E_q\log N(x_t \mid A_kx_{t-1}, Q_k)` for t = 1..T-1 under q(x) and q(A_k, Q_k) (expectations
    ``e`` of batch (K,)): ``(*b, T-1, K)``."""
    second = lds._second(local)
    S_next, S_prev, X = second[..., 1:, None, :, :], second[..., :-1, None, :, :], _lagged(local)[..., None, :, :]
    D = second.shape[-1]
    return (-0.5 * D * math.log(2 * math.pi) - 0.5 * e.logdet_Q - 0.5 * (e.Qinv * S_next).sum((-1, -2))
            + (e.Qinv_A * X).sum((-1, -2)) - 0.5 * (e.At_Qinv_A * S_prev).sum((-1, -2)))


def log_trans(s: SLDSStructure, q_trans: torch.Tensor | None) -> torch.Tensor:
    r""":math:`E_q\log\pi` ``(K, K)`` (the fixed log-probabilities when the transition matrix is not a global)."""
    return s.log_trans if q_trans is None else dirichlet_expected_log((q_trans,))


def _expected_log_x(s: SLDSStructure, e: mniw.MNIWExpectations, local: lds.ChainLocal, r: torch.Tensor):
    r""":math:`E_q\log p(x \mid z) = \sum E\log N(x_0 \mid m_0, P_0) + \sum_{t\ge1,k} r_{tk}L_{tk}`: a scalar."""
    first = expected_gaussian_log_density(s.initial_loc, torch.linalg.inv(s.initial_cov), local.mean[..., 0, :],
                                          local.cov[..., 0, :, :])
    return first.expand(local.mean.shape[:-2]).sum() + (r[..., 1:, :] * transition_table(e, local)).sum()


def x_step(s: SLDSStructure, q_dyn: lds.QState, q_em: lds.QState, r: torch.Tensor) -> lds.ChainLocal:
    """The optimal q(x) given q(z) marginals ``r (*b, T, K)`` and the globals, with its entropy."""
    J, h = lds.emission_potentials(s, q_em)
    e, w = q_dyn.expected, r[..., 1:, :]
    blocks = mniw.MNIWExpectations(*(torch.einsum("...tk,kij->...tij", w, f) for f in e[:3]), w @ e.logdet_Q)
    D = s.D
    unused = torch.eye(D, dtype=h.dtype, device=h.device)     # the per-step expected blocks replace (A_t, Q_t)
    sol = lds_local(LDSPrior(s.initial_loc, s.initial_cov, unused, unused, time_varying=True), J, h,
                    expected=blocks, moments=True)
    cov, cross = sol.moments
    local = lds.ChainLocal(sol.mean, cov, cross, torch.zeros((), dtype=h.dtype, device=h.device))
    local.entropy = -sol.kl - _expected_log_x(s, e, local, r)
    return local


def z_step(s: SLDSStructure, q_dyn: lds.QState, q_trans, local: lds.ChainLocal) -> Regimes:
    """The optimal q(z) given q(x) and the globals: forward-backward on ``E_q log pi`` and ``L`` (``hmm.posterior``)."""
    L = transition_table(q_dyn.expected, local)
    log_lik = torch.cat([torch.zeros_like(L[..., :1, :]), L], -2)
    batch = log_lik.shape[:-2]
    init, trans = s.log_init.expand(batch + (s.K,)), log_trans(s, q_trans).expand(batch + (s.K, s.K))
    post = hmm.posterior(init, trans, log_lik, time_varying=False)
    expected = (post.marginals[..., 0, :] * init).sum() + (post.pairwise * trans).sum() + (post.marginals * log_lik).sum()
    pairwise = post.pairwise.reshape(-1, s.K, s.K).sum(0)
    return Regimes(post.marginals, pairwise, post.log_normalizer.sum() - expected)


def global_step(s: SLDSStructure, local: lds.ChainLocal, regimes: Regimes):
    """(q(A_k, Q_k) of batch (K,), q(pi) concentration or None, q(C, R)) from the expected statistics."""
    second, w = lds._second(local), regimes.r[..., 1:, :]
    K = s.K
    flat = lambda x: x.reshape((-1,) + x.shape[-2:])  # noqa: E731 - (*b, T-1, D, D) -> (b (T-1), D, D)
    wf = w.reshape(-1, K)
    stats = mniw.MNIWNatural(torch.einsum("nk,nij->kij", wf, flat(second[..., 1:, :, :])),
                             torch.einsum("nk,nij->kij", wf, flat(_lagged(local))),
                             torch.einsum("nk,nij->kij", wf, flat(second[..., :-1, :, :])), wf.sum(0))
    q_dyn = lds.posterior(s.prior_dynamics, stats)
    q_trans = None if s.prior_trans is None else s.prior_trans + regimes.pairwise
    q_em = lds.posterior(s.prior_emission, lds.emission_stats(s, local))
    return q_dyn, q_trans, q_em


def elbo_terms(s: SLDSStructure, q_dyn, q_trans, q_em, local: lds.ChainLocal, regimes: Regimes) -> dict:
    """The ELBO term by term (module docstring); they sum to the ELBO."""
    r = regimes.r
    batch = r.shape[:-2]
    first = (r[..., 0, :] * s.log_init.expand(batch + (s.K,))).sum()
    terms = {f"E log p({s.child})": lds.expected_regression_log_lik(q_em.expected, lds.emission_stats(s, local)),
             f"E log p({s.chain})": _expected_log_x(s, q_dyn.expected, local, r),
             f"E log p({s.z})": first + (regimes.pairwise * log_trans(s, q_trans)).sum(),
             f"entropy({s.chain})": local.entropy,
             f"entropy({s.z})": regimes.entropy,
             f"-KL({s.dynamics})": -lds.mniw_kl(q_dyn, s.prior_dynamics).sum(),
             f"-KL({s.emission})": -lds.mniw_kl(q_em, s.prior_emission)}
    if q_trans is not None:
        terms[f"-KL({s.trans})"] = -FAMILIES["Dirichlet"].kl((q_trans,), (s.prior_trans,))
    if s.constant:
        terms["log p(sites with no latent parent)"] = torch.tensor(s.constant, dtype=torch.float64)
    return terms


# ------------------------------------------------------------------------------------------------------------
# fitting


PERTURBATION = 0.3
"""Sd of the seeded perturbation of each regime's starting dynamics (the label symmetry must be broken)."""


def start(s: SLDSStructure, x: lds.ChainLocal, seed: int):
    """A start (q(A_k, Q_k), q(pi), q(C, R), uniform q(z) marginals) from the hard path ``x``: the globals' update
    with q(z) uniform, then each regime's mean dynamics M_k moved by a seeded N(0, PERTURBATION^2) draw."""
    r = x.mean.new_full(x.mean.shape[:-1] + (s.K,), 1.0 / s.K)
    counts = x.mean.new_full((s.K, s.K), float(r[..., 1:, :].sum()) / s.K)
    q_dyn, q_trans, q_em = global_step(s, x, Regimes(r, counts, x.mean.new_zeros(())))
    std = mniw.standard_from_natural(q_dyn.natural)
    gen = torch.Generator().manual_seed(seed)
    loc = std.loc + PERTURBATION * torch.randn(std.loc.shape, generator=gen, dtype=std.loc.dtype).to(std.loc.device)
    q_dyn = lds.q_state(mniw.natural_from_standard(loc, std.col_precision, std.scale, std.df))
    return q_dyn, q_trans, q_em, r


@dataclass(kw_only=True)
class SLDSFit(SweepRecord):
    """One coordinate-ascent run: the q's, q(x), q(z), ELBO and terms per sweep."""

    q_dyn: lds.QState
    q_trans: torch.Tensor | None
    q_em: lds.QState
    local: lds.ChainLocal
    regimes: Regimes


@dataclass
class Sweep:
    """One sweep's result: the globals ``q = (q_dyn, q_trans, q_em)``, q(x) ``local``, q(z) ``regimes``, the ELBO
    ``terms`` (floats) and ``scale`` (the size of the terms' parts, for the round-off of the decrease test)."""

    q: tuple
    local: lds.ChainLocal
    regimes: Regimes
    terms: dict
    scale: float

    @property
    def elbo(self) -> float:
        return sum(self.terms.values())


def sweep(s: SLDSStructure, q: tuple, r: torch.Tensor) -> Sweep:
    """One coordinate-ascent sweep from globals ``q = (q_dyn, q_trans, q_em)`` and q(z) marginals ``r (*b, T, K)``:
    q(x) (``x_step``), q(z) (``z_step``), the globals (``global_step``), the ELBO at the new factors."""
    q_dyn, q_trans, q_em = q
    local = x_step(s, q_dyn, q_em, r)
    regimes = z_step(s, q_dyn, q_trans, local)
    new = global_step(s, local, regimes)
    terms = {k: float(v) for k, v in elbo_terms(s, *new, local, regimes).items()}
    scale = sum(abs(v) for v in terms.values()) + float(s.prior_dynamics.log_partition.abs().sum()) + \
        abs(float(s.prior_emission.log_partition))
    return Sweep(new, local, regimes, terms, scale)


def _fields(q: tuple) -> list[torch.Tensor]:
    """The globals' natural parameters as one list of tensors (MNIW fields of q(A_k, Q_k), q(C, R); q(pi))."""
    q_dyn, q_trans, q_em = q
    return list(q_dyn.natural) + list(q_em.natural) + ([] if q_trans is None else [q_trans])


def extrapolate(s: SLDSStructure, q0: tuple, q1: tuple, q2: tuple, step_max: float):
    r"""SQUAREM's step (Varadhan & Roland 2008, scheme S3) on the globals' natural parameters: from three
    successive sweeps' :math:`\eta_0, \eta_1, \eta_2`, with :math:`r = \eta_1 - \eta_0`,
    :math:`v = \eta_2 - 2\eta_1 + \eta_0` and :math:`\alpha = \min(\|r\| / \|v\|, \text{step\_max})`,

    .. math:: \eta' = \eta_0 + 2\alpha r + \alpha^2 v

    (:math:`\alpha = 1` gives :math:`\eta_2`). Coordinate ascent on a switching LDS crawls along the latent basis
    (x -> Mx, A_k -> MA_kM^{-1}, C -> CM^{-1} leave the likelihood unchanged; only the weak priors pin M): each
    sweep moves the same way by a nearly constant fraction, which this step covers at once. Where :math:`\eta'` is
    not a valid natural parameter (a matrix not positive definite, a degree of freedom or a concentration out of
    range), :math:`\alpha \leftarrow (\alpha + 1) / 2`, at most ``BACKTRACKS`` times. Returns
    ``(alpha, globals or None)``: None when :math:`\alpha \le 1` or no valid :math:`\eta'` was found."""
    f0, f1, f2 = _fields(q0), _fields(q1), _fields(q2)
    r = [b - a for a, b in zip(f0, f1)]
    v = [c - 2 * b + a for a, b, c in zip(f0, f1, f2)]
    r2, v2 = sum(float((x * x).sum()) for x in r), sum(float((x * x).sum()) for x in v)
    alpha = min(math.sqrt(r2 / v2), step_max) if v2 > 0 else step_max
    if not alpha > 1:
        return alpha, None
    for _ in range(BACKTRACKS):
        jumped = _globals([a + 2 * alpha * dr + alpha ** 2 * dv for a, dr, dv in zip(f0, r, v)])
        if jumped is not None:
            return alpha, jumped
        alpha = 0.5 * (alpha + 1.0)
    return alpha, None


BACKTRACKS = 6
"""Tries of ``extrapolate`` before it gives up: an invalid extrapolated point halves the step's excess over 1."""


def _globals(fields: list[torch.Tensor]):
    """``(q_dyn, q_trans, q_em)`` from ``_fields``' layout, validated as user input (an extrapolated point is not a
    conjugate update of a validated prior); None if it is not a valid natural parameter."""
    try:
        q_dyn = lds.q_state(mniw.MNIWNatural(*fields[:4]))
        q_em = lds.q_state(mniw.MNIWNatural(*fields[4:8]))
    except ValueError:
        return None
    q_trans = fields[8] if len(fields) > 8 else None
    if q_trans is not None and not bool((q_trans > 0).all()):
        return None
    return q_dyn, q_trans, q_em


STEP_GROWTH = 4.0
"""SQUAREM's step bound: multiplied by this after a step that reached it, divided by it after a rejected one."""


def coordinate_ascent(s: SLDSStructure, first, num_steps: int, tol: float, on_step=None,
                      accelerate: bool = True) -> SLDSFit:
    """From ``first = start(...)``: sweeps (q(x), q(z), globals, ELBO) until the relative ELBO change of a sweep is
    below ``tol`` or ``num_steps`` sweeps ran. ``accelerate``: after every two plain sweeps, one sweep from the
    SQUAREM extrapolation of the globals (``extrapolate``), kept only if its ELBO is at least the last one's
    (else the fit continues from the plain sweeps and the step bound shrinks), so the recorded ELBO never
    decreases; ``cavi.ELBODecreased`` warns if a plain sweep lowers it beyond round-off. Every sweep tried counts
    towards ``num_steps``; ``history`` holds the ELBO of each kept sweep. Ctrl-C stops at the last kept sweep."""
    q_dyn, q_trans, q_em, r = first
    q = (q_dyn, q_trans, q_em)
    last = None
    history, terms_history, converged, interrupted = [], {}, False, False
    sweeps, step_max, recent = 0, 1.0, [q]

    def keep(result: Sweep) -> bool:
        nonlocal last, q, r
        last, q, r = result, result.q, result.regimes.r
        return record_sweep(result.terms, history, terms_history, tol, torch.float64, on_step, result.scale)

    try:
        while sweeps < num_steps:
            sweeps += 1
            if keep(sweep(s, q, r)):
                converged = True
                break
            recent.append(q)
            if not accelerate or len(recent) < 3 or sweeps >= num_steps:
                continue
            alpha, jumped = extrapolate(s, *recent, step_max)
            if jumped is not None:
                sweeps += 1
                trial = sweep(s, jumped, r)
                if trial.elbo < last.elbo:
                    jumped = None
                elif keep(trial):
                    converged = True
                    break
            if jumped is None and alpha > 1:          # invalid or rejected: shorter steps
                step_max = max(1.0, step_max / STEP_GROWTH)
            elif alpha >= step_max:                   # the bound was binding: allow longer steps
                step_max *= STEP_GROWTH
            recent = [q]
    except KeyboardInterrupt:
        if not history:
            raise
        interrupted = True
    return SLDSFit(history, terms_history, converged, interrupted, q_dyn=q[0], q_trans=q[1], q_em=q[2],
                   local=last.local, regimes=last.regimes)


def describe(s: SLDSStructure) -> dict[str, str]:
    """site -> the closed-form update ``plan.explain()`` prints."""
    out = {s.dynamics: f"q({s.dynamics}) = MNIW over (A_k, Q_k) per regime: closed form from expected state "
                       f"statistics of {s.chain} weighted by q({s.z}_t = k)",
           s.emission: lds.describe_emission(s.emission, s.child, s.chain)}
    if s.trans is not None:
        out[s.trans] = f"q({s.trans}) = Dirichlet: closed form from expected transition counts of {s.z}"
    return out


LOCAL_TREATMENT = ("structured mean field q(z) q(x): Kalman smoothing (information form, exact) on the q(z)-weighted "
                   "expected dynamics and the expected emission potentials, alternating with forward-backward on "
                   "E_q[log transition] and the expected transition log-likelihoods (Ghahramani & Hinton 2000)")


SCREEN_SWEEPS = 30
"""Sweeps each start runs before the best one alone is continued (``fit``)."""


def fit(s: SLDSStructure, num_steps: int, tol: float, restarts: int, seed: int, progress: bool = False):
    """Best of ``restarts`` starts by short runs: every start (the data's top principal directions as the hard path,
    each regime's dynamics perturbed with seed ``seed + i``; ``start``) runs ``SCREEN_SWEEPS`` sweeps, then only the
    one with the best ELBO continues, to convergence or ``num_steps`` sweeps in all ("small EM" screening, Biernacki
    et al. 2003: the starts differ in which local optimum they approach, which the first sweeps decide; the long
    tail of a fit is spent along the latent basis). One start (``restarts == 1``) runs ``num_steps`` sweeps.
    Returns ``(fit, interrupted)``: the continued ``SLDSFit`` with the history of its screening sweeps first."""
    hard = lds.projection_starts(s, 1, seed)[0]
    screen = num_steps if restarts == 1 else min(SCREEN_SWEEPS, num_steps)
    best, interrupted = best_of_restarts(lambda i, desc, on_step: coordinate_ascent(s, start(s, hard, seed + i),
                                                                                    screen, tol, on_step),
                                         restarts, screen, tol, progress, check_convergence=screen == num_steps)
    if restarts == 1 or best.converged or interrupted or screen >= num_steps:
        return best, interrupted
    rest, interrupted = best_of_restarts(
        lambda i, desc, on_step: coordinate_ascent(s, (best.q_dyn, best.q_trans, best.q_em, best.regimes.r),
                                                   num_steps - screen, tol, on_step),
        1, num_steps - screen, tol, progress, "vi best start")
    rest.history = best.history + rest.history
    rest.terms = {k: best.terms[k] + rest.terms[k] for k in rest.terms}
    return rest, interrupted


def run(model, args, kwargs, plan, num_steps: int, tol: float, restarts: int, seed: int, num_samples: int,
        progress: bool):
    """The vi backend's fit of a conjugate switching LDS: ``fit`` (``restarts`` starts screened by
    ``SCREEN_SWEEPS`` sweeps each, the best continued to ``num_steps`` sweeps at most). The Posterior holds draws
    of every global from q, q(z) marginals (``post.discrete``), Viterbi paths of the final q(z) HMM,
    ``smoothed_means[chain]``, the ELBO and its terms."""
    s = analyse_slds(model, args, kwargs, plan.facts, plan.graph)
    best, interrupted = fit(s, num_steps, tol, restarts, seed, progress)
    draws, point = {}, {}
    for site, q in ((s.dynamics, best.q_dyn), (s.emission, best.q_em)):
        draws[site] = lds.mniw_draws(q.natural, num_samples).to(s.dtype).unsqueeze(0)
        point[site] = lds.mniw_mean(q.natural).to(s.dtype)
    if s.trans is not None:
        fam = FAMILIES["Dirichlet"]
        draws[s.trans] = fam.sample((best.q_trans,), num_samples).to(s.dtype).unsqueeze(0)
        point[s.trans] = fam.mean((best.q_trans,)).to(s.dtype)
    L = transition_table(best.q_dyn.expected, best.local)
    log_lik = torch.cat([torch.zeros_like(L[..., :1, :]), L], -2)
    batch = log_lik.shape[:-2]
    table = DiscreteTable(s.log_init.expand(batch + (s.K,)), log_trans(s, best.q_trans).expand(batch + (s.K, s.K)),
                          log_lik, False)
    history = training.History(-v for v in best.history)
    history.interrupted = interrupted
    return make_posterior(plan, model, args, kwargs, draws=draws, point=point, history=history,
                          log_evidence=LogEvidence(best.elbo, "ELBO (lower bound)"), elbo_terms=best.terms,
                          tables={s.z: table}, discrete={s.z: best.regimes.r.to(s.dtype)},
                          smoothed_means={s.chain: best.local.mean.to(s.dtype)})
