r"""Variational Bayes for a markov_chain whose transition is log-linear in Dirichlet globals and whose Gaussian
emission mean is linear in a Normal global: the factorial HMM written over its joint states (Ghahramani &
Jordan 1997), and any chain of that form.

The structure (found by probing, below):

.. math::
    P_g \sim \mathrm{Dir}(\alpha_g), \quad w \sim N(m_0, \mathrm{diag}\,v_0), \quad \sigma \sim p(\sigma)
    \ (\text{or known}), \\
    z_0 \sim \mathrm{Cat}(p_0), \quad \log p(z_t = j \mid z_{t-1} = i) = \textstyle\sum_g (B_g \log P_g)_{ij},
    \quad y_t \mid z_t = s \sim N(J_s w + c_s, \sigma_s^2),

with :math:`B_g` a non-negative matrix (for a factorial HMM of M chains over :math:`K^M` joint states, the 0/1
incidence of joint transitions and per-chain ones: :math:`\log(P^{(1)} \otimes \cdots \otimes P^{(M)})_{ss'} =
\sum_m \log P^{(m)}_{z_m(s) z_m(s')}`) and :math:`J` the joint states' design over the per-chain means
(:math:`\mu_s = \sum_m W_{m, z_m(s)}`). The mean-field posterior :math:`q(z)\,q(w)\prod_g q(P_g)` with
:math:`\sigma` point-estimated (it is not conjugate) is fitted by coordinate ascent, every step an exact maximum:

- q(z): forward-backward on :math:`E_q\log A = \sum_g B_g E_q\log P_g` and the expected log-likelihoods
  :math:`E_q\log N(y_t \mid \mu_s, \sigma^2) = -\tfrac12\log 2\pi\sigma^2 - ((y_t - J_s m - c_s)^2 +
  J_s S J_s^\top) / 2\sigma^2`;
- :math:`q(P_g) = \mathrm{Dir}(\alpha_g + B_g^\top \xi)`, :math:`\xi` the expected joint transition counts;
- :math:`q(w) = N(m, S)`: :math:`S^{-1} = \mathrm{diag}(v_0)^{-1} + J^\top \mathrm{diag}(N_s / \sigma_s^2) J`,
  :math:`m = S(m_0 / v_0 + J^\top (\sum_t r_{ts}(y_t - c_s) / \sigma_s^2))` (Bayesian linear regression on the
  expected one-hot design), :math:`N_s = \sum_t r_{ts}`;
- :math:`\sigma`: the maximum of :math:`-n\log\sigma - R / 2\sigma^2 + \log p(\sigma)`,
  :math:`R = \sum_{t,s} r_{ts}((y_t - \mu_s)^2 + J_s S J_s^\top)`, by Newton steps on :math:`\log\sigma` (kept only
  where they raise it).

The objective, reported term by term, is the ELBO plus :math:`\log p(\sigma)` at the point estimate: :math:`\log
Z_{q(z)}` (the local part at the optimal q(z): expected log-likelihood, expected log prior of the path and the
entropy) minus the KLs of q(w) and each q(P_g) from their priors. It never decreases.

Probing: the model runs under ``probe.Tabulate`` (the chain enumerated), twice with fresh prior draws. The
transition's dependence on the Dirichlet globals is read as the Jacobian in their logs, by autograd through one
model run with every global held at the first run's values (``probe.run_held``), then checked exact at both runs:
:math:`\log A = B\log P` with no offset and :math:`B \ge 0`; likewise the emission mean's on the Normal global
(:math:`\mu = Jw + c`). Anything else is refused (``NotConjugate``) with the site and the reason; the generic
``conjugacy.analyse`` runs the plain HMM / mixture shapes.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ppl.handlers import DiscreteTable
from ppl.posterior import LogEvidence

from .. import initialization, training
from ..exact import hmm
from ..results import make_posterior
from .cavi import SweepRecord, screened_fit, sweep_until
from .conjugacy import NotConjugate, local_site
from .families import FAMILIES, dirichlet_expected_log
from .probe import PROBE_SEEDS, close, num_states, peel, probe_runs, run_held, site_weight

SCREEN_SWEEPS = 10     # sweeps each start runs before the best is continued (``cavi.screened_fit``)
NEWTON_STEPS = 50      # at most this many Newton steps on log sigma per sweep
LINEAR_RTOL = 1e-4     # how exactly a probed dependence must be (log-)linear, relative to its size


@dataclass(frozen=True)
class ScaleSite:
    """The emission scale: ``known`` variances ``(K,)`` (a fixed scale), or a global ``name`` with its ``prior``
    (a torch distribution over the scalar sigma), point-estimated."""

    known: torch.Tensor | None = None
    name: str | None = None
    prior: object = None


@dataclass(frozen=True)
class LinearChainStructure:
    """What the coordinate ascent runs on (module docstring): the chain (``K`` states, value shape ``zshape`` =
    ``(*batch, T)``), its fixed ``log_init (K,)``; ``trans``: Dirichlet global -> (prior concentration (value
    shape), B ``(K * K, value numel)``); ``log_trans_fixed (K, K)``: the part of log A no global feeds (zero when
    every entry is fed); the observed ``child``'s values ``y`` and weights ``w`` ``zshape``; the Normal global
    ``means`` (None: the emission mean is fixed) with prior mean / variance ``m0, v0`` (flat) and design ``J (K, n)``
    and offset ``c (K,)``; the ``scale``."""

    chain: str
    K: int
    zshape: tuple
    log_init: torch.Tensor
    trans: dict
    log_trans_fixed: torch.Tensor
    child: str
    y: torch.Tensor
    w: torch.Tensor
    means: str | None
    means_shape: tuple
    m0: torch.Tensor
    v0: torch.Tensor
    J: torch.Tensor
    c: torch.Tensor
    scale: ScaleSite
    dtype: torch.dtype = torch.float64
    out_dtype: torch.dtype = torch.float32   # the data's floating dtype: the posterior's draws are returned in it


def _chain_site(runs, local: str):
    """The markov_chain's fn in both probe runs; NotConjugate unless it is a homogeneous chain."""
    fa, fb = runs[0].sites[local]["fn"], runs[1].sites[local]["fn"]
    if not hasattr(fa, "log_trans"):
        raise NotConjugate(f"site '{local}': not a markov_chain (the linear-chain structure needs one)")
    if fa.time_varying:
        raise NotConjugate(f"markov_chain '{local}': input-driven (time-varying) transitions have no conjugate "
                           "Dirichlet update")
    return fa, fb


def _one_matrix(x: torch.Tensor, K: int, name: str, what: str) -> torch.Tensor:
    """``x (..., K, K)`` (or ``(..., K)``) as one matrix (vector): every batch entry must be the same."""
    flat = x.reshape((-1,) + tuple(x.shape[-2:] if what == "transition" else x.shape[-1:]))
    if not close(flat, flat[:1]):
        raise NotConjugate(f"markov_chain '{name}': its {what} probabilities differ across sequences")
    return flat[0]


JACOBIAN_ROWS = 1024   # output rows per batched backward pass of ``_jacobian``


def _jacobian(read, base: dict, names: tuple, transform) -> torch.Tensor:
    """``D (n_out, n_in)``: the Jacobian of ``read(values) -> (n_out,)`` at ``base`` in the coordinates
    ``forward(value)`` of the globals ``names`` (concatenated, flat), by autograd (one model run, then batched
    backward passes). ``transform = (forward, inverse)``: ``(log, exp)`` for Dirichlet values (a chain's rows must
    stay normalized, so the dependence is read at the point, not by bumping it), the identity for Normal ones."""
    forward, inverse = transform
    leaves = [forward(base[n].detach()).requires_grad_() for n in names]
    with torch.enable_grad():
        out = read({**base, **{n: inverse(u) for n, u in zip(names, leaves)}}, True)
        if not names:
            return out.new_zeros(out.shape + (0,))
        rows = []
        eye = torch.eye(out.numel(), dtype=out.dtype, device=out.device)
        for lo in range(0, out.numel(), JACOBIAN_ROWS):
            grads = torch.autograd.grad(out, leaves, eye[lo:lo + JACOBIAN_ROWS], retain_graph=True,
                                        is_grads_batched=True, allow_unused=True)
            rows.append(torch.cat([(g if g is not None else torch.zeros((eye[lo:lo + JACOBIAN_ROWS].shape[0],)
                                                                        + u.shape, dtype=out.dtype,
                                                                        device=out.device))
                                   .reshape(g.shape[0] if g is not None else -1, -1) for g, u in zip(grads, leaves)],
                                  -1))
    return torch.cat(rows).detach().to(out.dtype)


def _check_linear(name: str, what: str, targets: tuple, coords: tuple, D: torch.Tensor, offset: torch.Tensor) -> None:
    """NotConjugate unless ``target = D @ coord + offset`` at both probe runs."""
    for target, u in zip(targets, coords):
        fitted = D @ u.to(D) + offset
        size = float(target.abs().max()) + 1.0
        if float((fitted - target).abs().max()) > LINEAR_RTOL * size:
            raise NotConjugate(f"site '{name}': its {what} is not {'log-' if 'transition' in what else ''}linear "
                               "in the globals it depends on (backend 'vi' needs an exact conjugate form)")


def _emission(run, child: str, K: int, zshape: tuple, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean ``(K,)``, scale ``(K,)``) of the Normal child tabulated over the states in one probe run: each must be
    the same for every data entry."""
    base, _, _ = peel(run.sites[child]["fn"])
    if type(base).__name__ != "Normal":
        raise NotConjugate(f"site '{child}': a {type(base).__name__} likelihood; the linear-chain structure "
                           "takes a Normal one")
    pair = []
    for what, p in (("mean", base.loc), ("scale", base.scale)):
        try:
            full = torch.broadcast_to(p, (K,) + zshape).reshape(K, -1)
        except RuntimeError:
            raise NotConjugate(f"site '{child}': its {what} has shape {tuple(p.shape)}, not laid out as "
                               f"(states, *{zshape})") from None
        if not close(full, full[:, :1]):
            raise NotConjugate(f"site '{child}': its {what} varies across data points; the conjugate "
                               "update needs one value per state")
        pair.append(full[:, 0].to(dtype))
    return tuple(pair)


def analyse(model, args, kwargs, facts, graph) -> LinearChainStructure:
    """Probe ``model(*args, **kwargs)`` for the linear-chain structure (module docstring); NotConjugate names the
    site that stops it."""
    local = local_site(facts)
    if local is None or local not in facts.markov_chains:
        raise NotConjugate("the linear-chain structure needs one markov_chain")
    runs = probe_runs(model, args, kwargs, local)
    a, b = runs
    if a.params:
        raise NotConjugate(f"'{a.params[0]}' is a learnable parameter: backend 'vi' fits no parameters")
    fa, fb = _chain_site(runs, local)
    K = num_states(fa)
    zshape = tuple(fa.batch_shape + fa.event_shape)
    observed = [n for n, s in a.sites.items() if s["observed"]]
    if len(observed) != 1:
        raise NotConjugate(f"the linear-chain structure takes one observed site, got {', '.join(observed)}")
    child = observed[0]
    y = a.sites[child]["value"]
    dtype = torch.float64   # float32 sums of log Z over long chains move by more than the sweeps' gains
    if not close(fa.log_init, fb.log_init):
        raise NotConjugate(f"markov_chain '{local}': its initial probabilities must be fixed here (a Dirichlet "
                           "prior on them runs through the plain chain structure)")
    log_init = _one_matrix(fa.log_init, K, local, "initial").to(dtype)
    globals_ = tuple(facts.continuous)
    base_values = {g: a.sites[g]["value"] for g in globals_}
    families = {g: type(peel(a.sites[g]["fn"])[0]).__name__ for g in globals_}

    # emission scale (checked first: the cheapest refusal): known, or one scalar global point-estimated
    (mu_a, sd_a), (mu_b, sd_b) = (_emission(r, child, K, zshape, dtype) for r in runs)
    if close(sd_a, sd_b):
        scale = ScaleSite(known=sd_a ** 2)
        point = []
    else:
        point = [g for g in globals_ if families[g] not in ("Dirichlet", "Normal")
                 and a.sites[g]["value"].numel() == 1 and close(sd_a, a.sites[g]["value"].reshape(()).to(dtype))
                 and close(sd_b, b.sites[g]["value"].reshape(()).to(dtype))]
        if not point:
            raise NotConjugate(f"site '{child}': its scale depends on the latents other than through one scalar "
                               "global (the scale the linear-chain structure point-estimates)")
        scale = ScaleSite(name=point[0], prior=_in_float64(a.sites[point[0]]["fn"]))

    # transition: log A = sum_g B_g log P_g over the Dirichlet globals
    dirichlets = tuple(g for g in globals_ if families[g] == "Dirichlet")

    def held(values: dict, grad: bool):
        return run_held(model, args, kwargs, values, PROBE_SEEDS[0], grad, local)

    def read_trans(values: dict, grad: bool) -> torch.Tensor:
        log_trans = held(values, grad).sites[local]["fn"].log_trans
        return _one_matrix(log_trans, K, local, "transition").reshape(-1).to(dtype)

    B = _jacobian(read_trans, base_values, dirichlets, (torch.log, torch.exp))
    used = B.abs().amax(0) > 0
    targets = tuple(_one_matrix(f.log_trans, K, local, "transition").reshape(-1).to(dtype) for f in (fa, fb))
    coords = tuple(torch.cat([r.sites[g]["value"].log().reshape(-1).to(dtype) for g in dirichlets])
                   if dirichlets else targets[0].new_zeros(0) for r in runs)
    fixed = targets[0] - B @ coords[0]
    _check_linear(local, "transition", targets, coords, B, fixed)
    if bool((B < -LINEAR_RTOL).any()):
        raise NotConjugate(f"markov_chain '{local}': its log transition depends on a Dirichlet global with a "
                           "negative weight (no conjugate update)")
    trans, start = {}, 0
    for g in dirichlets:
        n = a.sites[g]["value"].numel()
        if bool(used[start:start + n].any()):
            conc = peel(a.sites[g]["fn"])[0].concentration
            if not close(conc, peel(b.sites[g]["fn"])[0].concentration):
                raise NotConjugate(f"site '{g}': its Dirichlet concentration depends on a latent")
            trans[g] = (conc.expand(a.sites[g]["value"].shape).to(dtype), B[:, start:start + n].clamp_min(0))
        start += n

    # emission mean: mu = J w + c over the Normal globals
    normals = tuple(g for g in globals_ if families[g] == "Normal")

    def read_mean(values: dict, grad: bool) -> torch.Tensor:
        return _emission(held(values, grad), child, K, zshape, dtype)[0]

    J = _jacobian(read_mean, base_values, normals, (lambda v: v, lambda u: u))
    mean_coords = tuple(torch.cat([r.sites[g]["value"].reshape(-1).to(dtype) for g in normals])
                        if normals else mu_a.new_zeros(0) for r in runs)
    c = mu_a - J @ mean_coords[0]
    _check_linear(child, "mean", (mu_a, mu_b), mean_coords, J, c)
    mean_globals = [g for g, (lo, hi) in zip(normals, _spans(a, normals)) if bool((J[:, lo:hi] != 0).any())]
    if len(mean_globals) > 1:
        raise NotConjugate(f"site '{child}': its mean depends on several Normal globals ({', '.join(mean_globals)}); "
                           "the linear-chain structure takes one")
    means = mean_globals[0] if mean_globals else None
    m0 = v0 = J.new_zeros(0)
    if means is not None:
        lo, hi = dict(zip(normals, _spans(a, normals)))[means]
        J = J[:, lo:hi]
        c = mu_a - J @ mean_coords[0][lo:hi]
        prior, prior_b = peel(a.sites[means]["fn"])[0], peel(b.sites[means]["fn"])[0]
        if not (close(prior.loc, prior_b.loc) and close(prior.scale, prior_b.scale)):
            raise NotConjugate(f"site '{means}': its Normal prior depends on a latent")
        shape = a.sites[means]["value"].shape
        m0 = prior.loc.expand(shape).reshape(-1).to(dtype)
        v0 = (prior.scale.expand(shape) ** 2).reshape(-1).to(dtype)
    else:
        J = J[:, :0]

    for g in globals_:
        if g not in trans and g != means and g not in point:
            raise NotConjugate(f"site '{g}': a {families[g]} global the linear-chain structure does not use "
                               "(neither a Dirichlet feeding the transitions, the Normal emission mean, nor the "
                               "emission scale)")
    site = a.sites[child]
    _, _, inner = peel(site["fn"])
    if tuple(y.shape) != zshape:
        raise NotConjugate(f"site '{child}': its value has shape {tuple(y.shape)}, not the chain's {zshape}")
    w = torch.broadcast_to(site_weight(site, inner, dtype, y.device), zshape)
    if not bool(torch.isfinite(y[w != 0]).all()):
        raise ValueError(f"site '{child}': observed values must be finite where observed; mark missing entries "
                         "with mask=")
    return LinearChainStructure(local, K, zshape, log_init, trans, fixed.reshape(K, K), child,
                                torch.where(w != 0, y, torch.zeros_like(y)).to(dtype), w, means,
                                tuple(a.sites[means]["value"].shape) if means else (), m0, v0, J, c, scale, dtype,
                                y.dtype if y.is_floating_point() else torch.get_default_dtype())


def _in_float64(fn):
    """``fn`` with its parameters in float64 (rebuilt from its ``arg_constraints``; an ``Independent`` around it
    kept), so that the scale's log prior does not quantize the Newton steps on a float32 model; ``fn`` itself when
    it cannot be rebuilt so."""
    if isinstance(fn, torch.distributions.Independent):
        return torch.distributions.Independent(_in_float64(fn.base_dist), fn.reinterpreted_batch_ndims)
    try:
        params = {k: getattr(fn, k).double() for k in fn.arg_constraints if k in fn.__dict__ or hasattr(fn, k)}
        return type(fn)(**params, validate_args=False)
    except (TypeError, ValueError, AttributeError, RuntimeError):
        return fn


def _sizes(run, names: tuple) -> list[int]:
    return [run.sites[n]["value"].numel() for n in names]


def _spans(run, names: tuple) -> list[tuple[int, int]]:
    """``(start, stop)`` of each global's entries in the concatenated flat coordinates."""
    spans, start = [], 0
    for n in _sizes(run, names):
        spans.append((start, start + n))
        start += n
    return spans


@dataclass
class Globals:
    """q(P_g) concentrations, q(w) = N(m, S) (empty when no Normal global), sigma^2 per state ``(K,)``."""

    alpha: dict
    m: torch.Tensor
    S: torch.Tensor
    var: torch.Tensor


@dataclass
class LocalStats:
    """q(z): marginals ``r (*zshape, K)``, expected transition counts ``xi (K, K)`` summed over the data, log Z
    summed, and the tables it was computed from (``log_trans (K, K)``, ``log_lik (*zshape, K)``)."""

    r: torch.Tensor
    xi: torch.Tensor
    log_z: torch.Tensor
    log_trans: torch.Tensor | None = None
    log_lik: torch.Tensor | None = None


def expected_log_trans(s: LinearChainStructure, alpha: dict) -> torch.Tensor:
    r""":math:`E_q\log A = \text{fixed} + \sum_g B_g E_q\log P_g`: ``(K, K)``."""
    out = s.log_trans_fixed.reshape(-1)
    for g, (_, B) in s.trans.items():
        out = out + B @ dirichlet_expected_log((alpha[g],)).reshape(-1)
    return out.reshape(s.K, s.K)


def emission_moments(s: LinearChainStructure, q: Globals) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Per state :math:`E_q\mu_s = J_s m + c_s` and :math:`\mathrm{Var}_q\mu_s = J_s S J_s^\top`: ``(K,)`` each."""
    if s.means is None:
        return s.c, torch.zeros_like(s.c)
    return s.J @ q.m + s.c, ((s.J @ q.S) * s.J).sum(-1)


def expected_log_lik(s: LinearChainStructure, q: Globals) -> torch.Tensor:
    r""":math:`w_t E_q\log N(y_t \mid \mu_s, \sigma_s^2)`: ``(*zshape, K)``."""
    mu, v = emission_moments(s, q)
    dev = (s.y.unsqueeze(-1) - mu) ** 2 + v
    return s.w.unsqueeze(-1) * (-0.5 * torch.log(2 * math.pi * q.var) - dev / (2 * q.var))


def local_step(s: LinearChainStructure, q: Globals) -> LocalStats:
    """The optimal q(z) given the globals' q: forward-backward on the expected tables."""
    log_trans = expected_log_trans(s, q.alpha)
    log_lik = expected_log_lik(s, q)
    batch = s.zshape[:-1]
    post = hmm.posterior(s.log_init.expand(batch + (s.K,)), log_trans.expand(batch + (s.K, s.K)), log_lik,
                         time_varying=False)
    xi = post.pairwise.reshape(-1, s.K, s.K).sum(0)
    return LocalStats(post.marginals, xi, post.log_normalizer.sum(), log_trans, log_lik)


def hard_local(s: LinearChainStructure, labels: torch.Tensor) -> LocalStats:
    """q(z) as a point mass on ``labels (*zshape)`` (a start)."""
    onehot = torch.nn.functional.one_hot(labels.long(), s.K).to(s.dtype)
    xi = (onehot[..., :-1, :, None] * onehot[..., 1:, None, :]).reshape(-1, s.K, s.K).sum(0)
    return LocalStats(onehot, xi, onehot.new_zeros(()))


def trans_step(s: LinearChainStructure, state: LocalStats) -> dict:
    r""":math:`\alpha_g' = \alpha_g + B_g^\top \xi`."""
    return {g: prior + (B.T @ state.xi.reshape(-1)).reshape(prior.shape) for g, (prior, B) in s.trans.items()}


def means_step(s: LinearChainStructure, state: LocalStats, var: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """q(w) = N(m, S) given q(z) and the variances (Bayesian linear regression on the expected design)."""
    if s.means is None:
        return s.c.new_zeros(0), s.c.new_zeros(0, 0)
    wr = s.w.unsqueeze(-1) * state.r                           # (*zshape, K)
    counts = wr.reshape(-1, s.K).sum(0)                        # N_s
    sums = (wr * (s.y.unsqueeze(-1) - s.c)).reshape(-1, s.K).sum(0)
    precision = torch.diag(1.0 / s.v0) + s.J.T @ ((counts / var)[:, None] * s.J)
    S = torch.cholesky_inverse(torch.linalg.cholesky(precision))
    S = 0.5 * (S + S.T)
    return S @ (s.m0 / s.v0 + s.J.T @ (sums / var)), S


def residual(s: LinearChainStructure, state: LocalStats, q: Globals) -> tuple[torch.Tensor, torch.Tensor]:
    r"""``(n, R)``: the observed weight :math:`n = \sum_t w_t` and :math:`R = \sum_{t,s} w_t r_{ts}((y_t - E\mu_s)^2
    + \mathrm{Var}\,\mu_s)`."""
    mu, v = emission_moments(s, q)
    dev = (s.y.unsqueeze(-1) - mu) ** 2 + v
    return s.w.sum(), (s.w.unsqueeze(-1) * state.r * dev).sum()


def _dtype_of(fn) -> torch.dtype:
    """The floating dtype a distribution computes in (its first tensor parameter's)."""
    base = fn.base_dist if isinstance(fn, torch.distributions.Independent) else fn
    for k in base.arg_constraints:
        value = getattr(base, k, None)
        if isinstance(value, torch.Tensor):
            return value.dtype
    return torch.get_default_dtype()


def scale_objective(s: LinearChainStructure, log_sigma: torch.Tensor, n: torch.Tensor, R: torch.Tensor):
    r""":math:`-n\log\sigma - R/2\sigma^2 + \log p(\sigma)` (sigma's part of the objective)."""
    sigma = log_sigma.exp()
    prior = s.scale.prior.log_prob(sigma.to(_dtype_of(s.scale.prior)).reshape(s.scale.prior.batch_shape)).sum()
    return -n * log_sigma - R / (2 * sigma ** 2) + prior.to(log_sigma)


def scale_step(s: LinearChainStructure, state: LocalStats, q: Globals) -> torch.Tensor:
    """sigma^2 ``(K,)``: the known variances, or the maximum of ``scale_objective`` from the current sigma (Newton on
    log sigma with step halving; a step is taken only where it raises the objective)."""
    if s.scale.known is not None:
        return s.scale.known
    n, R = residual(s, state, q)
    u = q.var[0].log() / 2
    with torch.enable_grad():
        for _ in range(NEWTON_STEPS):
            x = u.detach().requires_grad_()
            f = scale_objective(s, x, n, R)
            g, = torch.autograd.grad(f, x, create_graph=True)
            h, = torch.autograd.grad(g, x)
            g, h = g.detach(), h.detach()
            step = -g / h if float(h) < 0 else g.sign() * 0.5
            f0, taken = float(f.detach()), False
            for _ in range(30):
                if float(scale_objective(s, (u + step).detach(), n, R)) >= f0:
                    u, taken = (u + step).detach(), True
                    break
                step = step / 2
            if not taken or float(step.abs()) < 1e-12:
                break
    return (2 * u).exp().expand(s.K).clone()


def global_step(s: LinearChainStructure, state: LocalStats, q: Globals) -> Globals:
    """q(P_g), then q(w) given the current variances, then sigma given q(w): each an exact coordinate maximum."""
    alpha = trans_step(s, state)
    m, S = means_step(s, state, q.var)
    mid = Globals(alpha, m, S, q.var)
    return Globals(alpha, m, S, scale_step(s, state, mid))


def elbo_terms(s: LinearChainStructure, state: LocalStats, q: Globals) -> dict[str, float]:
    """The objective term by term at (q(z) = ``state``, q): ``local`` (log Z of q(z)), ``kl_<global>`` (minus each
    KL), ``log_prior_<scale>`` (the point estimate's log prior)."""
    terms = {"local": float(state.log_z)}
    dirichlet = FAMILIES["Dirichlet"]
    for g, (prior, _) in s.trans.items():
        terms[f"kl_{g}"] = -float(dirichlet.kl((q.alpha[g],), (prior,)))
    if s.means is not None:
        gaussian = FAMILIES["Gaussian"]
        terms[f"kl_{s.means}"] = -float(gaussian.kl((q.m[None], q.S[None]), (s.m0[None], torch.diag(s.v0)[None])))
    if s.scale.name is not None:
        terms[f"log_prior_{s.scale.name}"] = float(
            s.scale.prior.log_prob(q.var[0].sqrt().to(_dtype_of(s.scale.prior)).reshape(s.scale.prior.batch_shape))
            .sum())
    return terms


@dataclass(kw_only=True)
class LinearChainFit(SweepRecord):
    """One coordinate-ascent run: the final ``state`` (q(z), with the globals' q it was computed from: ``q``)."""

    state: tuple


def coordinate_ascent(s: LinearChainStructure, start: tuple, num_steps: int, tol: float,
                      on_step=None) -> LinearChainFit:
    """Sweeps (global step, local step, objective) from ``start = (LocalStats, Globals)`` until the relative change
    is below ``tol`` or ``num_steps`` sweeps ran (``cavi.record_sweep``: warns if it ever decreases)."""
    def step(current, _):
        state, q = current
        q = global_step(s, state, q)
        state = local_step(s, q)
        return (state, q), elbo_terms(s, state, q), None

    *fields, = sweep_until(step, start, num_steps, tol, s.dtype, on_step)
    return LinearChainFit(*fields[1:], state=fields[0])


def start_labels(s: LinearChainStructure, i: int, gen: torch.Generator) -> torch.Tensor:
    """Start i's labels ``zshape``: k-means of the observed values into K clusters (seeded), the clusters given to
    the states in the order of their centres (i = 0; the order of the states' mean under the prior design's sums,
    J.sum(-1), when there is a design) or in a random order (i > 0)."""
    flat = s.y.reshape(-1, 1)
    observed = s.w.reshape(-1) != 0
    labels = torch.zeros(flat.shape[0], dtype=torch.long, device=flat.device)
    rows = flat[observed]
    if rows.shape[0] >= s.K:
        labels[observed] = initialization.kmeans_labels(rows, s.K, gen)
    centres = torch.stack([rows[labels[observed] == k].mean() if bool((labels[observed] == k).any())
                           else rows.mean() for k in range(s.K)])
    cluster_rank = torch.argsort(torch.argsort(centres))                      # cluster -> its rank by centre
    state_order = torch.argsort(s.J.sum(-1)) if s.means is not None else torch.arange(s.K, device=flat.device)
    if i > 0:
        state_order = state_order[torch.randperm(s.K, generator=gen).to(state_order.device)]
    return state_order[cluster_rank[labels]].reshape(s.zshape)


def start(s: LinearChainStructure, i: int, gen: torch.Generator) -> tuple:
    """``(hard q(z), Globals)`` of start i: the labels of ``start_labels``, the priors' q, and sigma^2 the mean
    within-cluster variance (or the known variances)."""
    labels = start_labels(s, i, gen)
    state = hard_local(s, labels)
    if s.scale.known is not None:
        var = s.scale.known
    else:
        onehot = state.r * s.w.unsqueeze(-1)
        counts = onehot.reshape(-1, s.K).sum(0).clamp_min(1)
        centres = (onehot * s.y.unsqueeze(-1)).reshape(-1, s.K).sum(0) / counts
        spread = (onehot * (s.y.unsqueeze(-1) - centres) ** 2).sum() / s.w.sum().clamp_min(1)
        var = (spread.clamp_min(1e-6 * float(s.y.var()) + 1e-12)).expand(s.K).clone()
    m, S = (s.m0, torch.diag(s.v0)) if s.means is not None else (s.c.new_zeros(0), s.c.new_zeros(0, 0))
    return state, Globals({g: p for g, (p, _) in s.trans.items()}, m, S, var)


def describe(s: LinearChainStructure) -> dict[str, str]:
    """site -> the update ``plan.explain()`` prints."""
    out = {g: f"q({g}) = Dirichlet: closed form from expected transition counts of {s.chain} mapped through its "
              "log-linear transition (B' xi)" for g in s.trans}
    if s.means is not None:
        out[s.means] = (f"q({s.means}) = MultivariateNormal: closed form (Bayesian linear regression of "
                        f"{s.child} on the expected states of {s.chain} through the mean's linear design)")
    if s.scale.name is not None:
        out[s.scale.name] = (f"point estimate: Newton on log {s.scale.name} of the expected log joint plus its "
                             f"{type(peel(s.scale.prior)[0]).__name__} log prior (not conjugate)")
    out[s.chain] = (f"q({s.chain}) = markov chain: forward-backward on E_q[log transition] and the expected "
                    f"log-likelihoods of {s.child}")
    return out


def run(model, args, kwargs, plan, num_steps: int, tol: float, restarts: int, seed: int, num_samples: int,
        progress: bool, structure: LinearChainStructure | None = None):
    """Fit by ``restarts`` starts (``start``) screened for ``SCREEN_SWEEPS`` sweeps, the best continued to
    ``num_steps`` sweeps or relative change ``tol`` (``cavi.screened_fit``). Returns the Posterior: draws of each
    Dirichlet and the Normal global from q, the scale as a point mass at its estimate; ``point``: the mode of each
    q(P_g), q(w)'s mean, the scale; the chain's tables (marginals, Viterbi, exact draws of q(z)); the objective as
    ``log_evidence`` (the ELBO plus the scale's log prior), ``history`` its negative per sweep, ``elbo_terms``."""
    s = structure if structure is not None else analyse(model, args, kwargs, plan.facts, plan.graph)
    best, interrupted = screened_fit(
        lambda state, n, tol_, on_step: coordinate_ascent(s, state, n, tol_, on_step),
        lambda i, gen: start(s, i, gen), num_steps, tol, restarts, seed, progress, "vi", SCREEN_SWEEPS)
    state, q = best.state
    draws, point = {}, {}
    dirichlet = FAMILIES["Dirichlet"]
    for g, (prior, _) in s.trans.items():
        draws[g] = dirichlet.sample((q.alpha[g],), num_samples).reshape((1, num_samples) + tuple(prior.shape))
        point[g] = dirichlet.mode((q.alpha[g],)).reshape(prior.shape)
    if s.means is not None:
        gauss = FAMILIES["Gaussian"]
        draws[s.means] = gauss.sample((q.m[None], q.S[None]), num_samples).reshape((1, num_samples) + s.means_shape)
        point[s.means] = q.m.reshape(s.means_shape)
    if s.scale.name is not None:
        sigma = q.var[0].sqrt()
        shape = tuple(s.scale.prior.batch_shape + s.scale.prior.event_shape)
        point[s.scale.name] = sigma.reshape(shape)
        draws[s.scale.name] = sigma.expand((1, num_samples) + shape).clone()
    draws = {k: v.to(s.out_dtype) for k, v in draws.items()}
    point = {k: v.to(s.out_dtype) for k, v in point.items()}
    batch = s.zshape[:-1]
    table = DiscreteTable(s.log_init.expand(batch + (s.K,)), state.log_trans.expand(batch + (s.K, s.K)),
                          state.log_lik.detach(), False)
    history = training.History(-v for v in best.history)
    history.interrupted = interrupted
    what = "ELBO (lower bound)" + (f" plus log p({s.scale.name}) at its point estimate" if s.scale.name else "")
    return make_posterior(plan, model, args, kwargs, draws=draws, point=point, history=history,
                          log_evidence=LogEvidence(best.elbo, what), tables={s.chain: table}, elbo_terms=best.terms)
