r"""Linear-Gaussian latent factor models in the vi backend (variational Bayesian factor analysis / probabilistic CCA,
Ghahramani & Beal 2000): the conjugate part in closed form, non-conjugate noise globals point-estimated in the loop.

Recognized structure (by probing the model, as ``nmf`` / ``lda`` do): one continuous latent :math:`z_n \in R^k` in a
plate of N rows with a known Gaussian prior :math:`N(m_{0n}, \Sigma_0)` (Normal(...).to_event(1) or
MultivariateNormal; the covariance the same for every row), and one or more observed Gaussian "views"
(MultivariateNormal, or Normal(...).to_event(1)) :math:`x^{(v)}_n \in R^{D_v}` whose mean is affine in z,

.. math::
    x^{(v)}_n \mid z_n \sim N(W_v z_n + \mu_v, \Psi_v), \qquad \Psi_v = T_v T_v^\top,

with the loading :math:`W_v` (D_v, k) (a site's value or its transpose) and the offset :math:`\mu_v` (D_v,) each
either a latent site with an elementwise Normal prior of known parameters, a conditioned site, or a constant, and
:math:`T_v` (the view's ``scale_tril``, the same for every row) a function of the remaining latent globals only, the
*noise* sites (any priors: HalfNormal scales, an LKJ Cholesky factor, ...). Affinity is checked by evaluating the
model at chosen z (0, the unit vectors, random rows) and two prior draws of the globals; anything else raises
``NotConjugate`` naming the site.

Approximation :math:`q(z) \prod_v q(B_v)` with :math:`B_v = [W_v, \mu_v]` (D_v, k + 1) and a point estimate
:math:`\hat\theta` of the noise sites. With :math:`\tilde z = [z; 1]`, :math:`P_v = \Psi_v^{-1}`,
:math:`G_v = E_q[B_v^\top P_v B_v]` and :math:`S = \sum_n E[\tilde z_n \tilde z_n^\top]`:

- :math:`q(z_n) = N(m_n, \Sigma)`: :math:`\Sigma^{-1} = \Sigma_0^{-1} + \sum_v G_v[{:}k, {:}k]`,
  :math:`m_n = \Sigma(\Sigma_0^{-1} m_{0n} + \sum_v E[W_v]^\top P_v x_n - G_v[{:}k, k])`;
- :math:`q(\mathrm{vec}\,B_v)` Gaussian: precision :math:`\Lambda_0 + P_v \otimes S`, linear term
  :math:`\Lambda_0 m_0 + \mathrm{vec}(P_v X_v^\top E[\tilde Z])` (fixed entries moved to the right-hand side); jointly
  over the view when :math:`\Psi_v` is full, row by row (D_v blocks of k + 1) when it is diagonal;
- :math:`\hat\theta`: maximizes :math:`\sum_v -\frac N2 \log|\Psi_v| - \frac12 \mathrm{tr}(\Psi_v^{-1} R_v) + \log
  p(\theta)` with :math:`R_v = E_q \sum_n (x_n - B_v\tilde z_n)(x_n - B_v\tilde z_n)^\top` (L-BFGS in the noise sites'
  unconstrained coordinates, ``NOISE_ITERS`` iterations, the step kept only where the objective rises).

The objective is the ELBO at :math:`\hat\theta` plus :math:`\log p(\hat\theta)`, in closed form term by term:
:math:`E\log p(x^{(v)})` per view, :math:`-KL(q(z) \| p(z))`, :math:`-KL(q(B_v) \| p(B_v))` per latent loading /
offset site, :math:`\log p(\hat\theta)` and the log density of conditioned sites. Each of the three updates maximizes
it over its block with the others fixed, so it never decreases. Starts: principal components of the stacked views
(probabilistic PCA's closed-form fit, Tipping & Bishop 1999), then random loadings for further restarts.

The posterior: draws of each latent loading / offset site from q (its mean as ``point``), of z from q(z) (when
``num_samples x N x k <= Z_DRAWS_MAX``; its means as ``point``), and the noise sites as point masses at
:math:`\hat\theta` (every draw the same value: no posterior uncertainty is reported for them).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch.distributions import biject_to

from ppl.plan import SiteTreatment
from ppl.posterior import LogEvidence

from .. import training
from ..results import make_posterior
from .cavi import SweepRecord, screened_fit, sweep_until
from .conjugacy import NotConjugate
from .point_step import lbfgs_ascent
from .probe import PROBE_SEEDS, Held, close, peel, run_held

NOISE_ITERS = 5         # L-BFGS iterations of the noise step in each sweep (each runs the model once or twice)
START_NOISE_ITERS = 15  # ... and before the first sweep, from the prior draw to the start's residuals
SCREEN_SWEEPS = 10      # with several starts, each runs this many sweeps; the best one's fit then goes on alone
Z_DRAWS_MAX = 10 ** 7   # z is drawn from q(z) when num_samples x N x k is at most this (else only its means)
OVERRELAX_GROWTH = 2.0  # adaptive overrelaxation: the stretch of a sweep's step grows by this factor while it pays
MEAN_FAMILIES = ("MultivariateNormal", "Normal")


# ------------------------------------------------------------------------------------------ the structure


def latent_factor_sites(graph, facts) -> tuple[str, tuple[str, ...]] | None:
    """``(z, views)`` when the model has the layout of a linear-Gaussian latent factor model: nothing discrete, no
    chain, network or unnormalized site, exactly one continuous latent in a plate (z) with a one-dim event, every
    child of z observed with a one-dim event; None otherwise. What the probe checks (affinity of the children's
    means in z, the priors) is ``analyse``'s."""
    if (facts.enumerable or facts.unenumerable or facts.markov_chains or facts.gaussian_chains or facts.neural
            or facts.combinatorial or facts.unnormalized):
        return None
    plated = [s for s in facts.continuous if graph.site(s).plates]
    if len(plated) != 1 or len(graph.site(plated[0]).event_shape) != 1:
        return None
    z = plated[0]
    children = tuple(graph.children_of(z))
    if not children or not all(graph.site(c).observed and len(graph.site(c).event_shape) == 1 for c in children):
        return None
    return z, children


@dataclass(frozen=True)
class Coefficient:
    """A view's loading (``(D, k)``) or offset (``(D,)``): ``site`` its latent site (None: fixed), ``prior`` its
    Normal (loc, scale) in that layout, ``value`` the fixed value (a conditioned site's or a constant),
    ``transposed``: the site's value is the loading's transpose."""

    site: str | None
    prior: tuple | None
    value: torch.Tensor | None
    transposed: bool = False

    @property
    def latent(self) -> bool:
        return self.site is not None

    def site_value(self, matrix: torch.Tensor) -> torch.Tensor:
        """``matrix (..., D, k)`` laid out as the site's value."""
        return matrix.transpose(-1, -2) if self.transposed else matrix



@dataclass(frozen=True)
class View:
    r"""An observed Gaussian child ``x (N, D)`` (``xx`` :math:`= x^\top x`) with its ``loading`` and ``offset``;
    ``diagonal``: its ``scale_tril`` was diagonal in every probe (q(B) row by row). B = [W, mu] ``(D, k + 1)``:
    ``latent`` the latent columns, ``prior_loc`` / ``prior_prec`` the Normal prior's mean and precision (0 in fixed
    columns), ``fixed`` the fixed columns' values (0 in latent ones)."""

    name: str
    x: torch.Tensor
    xx: torch.Tensor
    loading: Coefficient
    offset: Coefficient
    diagonal: bool
    latent: tuple
    prior_loc: torch.Tensor
    prior_prec: torch.Tensor
    fixed: torch.Tensor

    @property
    def sites(self) -> tuple[str, ...]:
        """The latent sites of q(B): the loading's and the offset's, those that are latent."""
        return tuple(c.site for c in (self.loading, self.offset) if c.latent)


def make_view(name: str, x: torch.Tensor, loading: Coefficient, offset: Coefficient, diagonal: bool, k: int) -> View:
    """A ``View`` with the prior and fixed parts of B = [W, mu] laid out ``(D, k + 1)``."""
    D = x.shape[1]
    loc, prec, fixed = (x.new_zeros(D, k + 1) for _ in range(3))
    latent = []
    for cols, coef in ((slice(0, k), loading), (slice(k, k + 1), offset)):
        if coef.latent:
            m, s = (t.to(x.dtype).reshape(D, -1) for t in coef.prior)
            loc[:, cols], prec[:, cols] = m, s.pow(-2)
            latent += list(range(k + 1))[cols]
        else:
            fixed[:, cols] = coef.value.to(x.dtype).reshape(D, -1)
    return View(name, x, x.T @ x, loading, offset, diagonal, tuple(latent), loc, prec, fixed)


@dataclass(frozen=True)
class FactorStructure:
    """A linear-Gaussian latent factor model found in a model: the local ``z`` with prior mean ``z_loc (N, k)`` and
    precision ``z_prec (k, k)``, the ``views``, the ``noise`` sites (name -> their value in the first probe, where
    the point estimate starts; ``supports``: their constraints), ``trils``: each view's ``scale_tril (D, D)`` in that
    probe (the fit's when there is no noise site), ``constant`` the log density of observed sites that are not views
    (conditioned globals, data with no latent parent), and ``model, args, kwargs`` to run the model again at other
    noise values, with the local, loadings and offsets ``held`` at values of the first probe. The fit computes in
    ``dtype`` (float64: the sweeps' ELBO changes are far below float32's resolution of a sum over the data);
    ``out_dtype`` is the model's, that of the posterior's draws."""

    z: str
    z_loc: torch.Tensor
    z_prec: torch.Tensor
    views: tuple
    noise: dict
    supports: dict
    priors: dict
    trils: tuple
    constant: float
    model: object
    args: tuple
    kwargs: dict
    held: dict
    dtype: torch.dtype
    out_dtype: torch.dtype

    @property
    def shape(self) -> tuple[int, int]:
        """(N, k)."""
        return tuple(self.z_loc.shape)


def run_fixed(model, args, kwargs, values: dict, seed: int, grad: bool = False) -> Held:
    """The model run once with the latent sites in ``values`` held there, the others drawn from their priors under
    ``seed``; gradients flow to ``values`` when ``grad`` (``probe.run_held``)."""
    return run_held(model, args, kwargs, values, seed, grad)


def gaussian_params(name: str, site: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """``(loc (N, D), scale_tril (N, D, D))`` of an observed view (MultivariateNormal, or Normal over one event
    dim); NotConjugate names the site otherwise."""
    base, _, inner_mask = peel(site["fn"])
    if site["mask"] is not None or inner_mask is not None or not (isinstance(site["scale"], float)
                                                                  and site["scale"] == 1):
        raise NotConjugate(f"site '{name}': a masked or scaled view is not supported by backend 'vi' (latent factor "
                           "model)")
    family = type(base).__name__
    value = site["value"]
    if family not in MEAN_FAMILIES:
        raise NotConjugate(f"site '{name}': a child of the Gaussian local must be MultivariateNormal or Normal to be "
                           f"conjugate, got {family}")
    if value.dim() != 2:
        raise NotConjugate(f"site '{name}': a view must be one (N, D) matrix of rows, got shape {tuple(value.shape)}")
    if family == "Normal":
        return base.loc.expand(value.shape), torch.diag_embed(base.scale.expand(value.shape))
    return base.loc.expand(value.shape), base.scale_tril.expand(value.shape + value.shape[-1:])


def _z_prior(z: str, a: dict, b: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(loc ``(N, k)``, precision ``(k, k)``) of the local's prior, checked known (equal in two probe runs with
    different draws of the globals) and with the same covariance on every row."""
    out = []
    for site in (a, b):
        base = peel(site["fn"])[0]
        family = type(base).__name__
        shape = site["value"].shape
        if family == "Normal":
            cov = torch.diag_embed(base.scale.expand(shape) ** 2)
        elif family == "MultivariateNormal":
            cov = base.covariance_matrix.expand(shape + shape[-1:])
        else:
            raise NotConjugate(f"site '{z}': the Gaussian local needs a Normal or MultivariateNormal prior to be "
                               f"conjugate, got {family}")
        out.append((base.loc.expand(shape), cov))
    (loc, cov), (loc_b, cov_b) = out
    if not (close(loc, loc_b) and close(cov, cov_b)):
        raise NotConjugate(f"site '{z}': its prior depends on a latent variable (backend 'vi' needs known prior "
                           "parameters for the Gaussian local)")
    if not close(cov, cov[:1]):
        raise NotConjugate(f"site '{z}': its prior covariance must be the same for every row")
    return loc, torch.linalg.inv(cov[0])


def _coefficient(view: str, what: str, targets: tuple, runs: tuple, candidates: list, taken: dict) -> Coefficient:
    """The loading (``what`` = "loading", targets ``(D, k)``) or offset (``(D,)``) of ``view`` in two probe runs with
    different prior draws: the latent or conditioned site whose value (or its transpose) it is in both, else a
    constant (the same in both)."""
    (target_a, target_b), (a, b) = targets, runs
    for name in candidates:
        va, vb = a.sites[name]["value"], b.sites[name]["value"]
        for transposed in ((False, True) if what == "loading" and va.dim() == 2 else (False,)):
            ta, tb = (va.transpose(-1, -2), vb.transpose(-1, -2)) if transposed else (va, vb)
            if ta.shape != target_a.shape or not (close(ta, target_a) and close(tb, target_b)):
                continue
            if a.sites[name]["observed"]:
                return Coefficient(None, None, target_a)
            if name in taken:
                raise NotConjugate(f"site '{name}': it is the {what} of view '{view}' and also used by "
                                   f"'{taken[name]}' (backend 'vi' takes each loading and offset in one view only)")
            taken[name] = view
            base, other = peel(a.sites[name]["fn"])[0], peel(b.sites[name]["fn"])[0]
            if type(base).__name__ != "Normal":
                raise NotConjugate(f"site '{name}': the {what} of view '{view}' needs a Normal prior to be conjugate "
                                   f"(a point estimate of it is not implemented), got {type(base).__name__}")
            if not (close(base.loc, other.loc) and close(base.scale, other.scale)):
                raise NotConjugate(f"site '{name}': its Normal prior depends on a latent variable")
            loc, scale = (t.expand(va.shape) for t in (base.loc, base.scale))
            if transposed:
                loc, scale = loc.transpose(-1, -2), scale.transpose(-1, -2)
            return Coefficient(name, (loc, scale), None, transposed)
    if close(target_a, target_b):
        return Coefficient(None, None, target_a)
    raise NotConjugate(f"site '{view}': its mean is affine in the local, but its {what} is neither the value of one "
                       "latent or conditioned site (a Normal loading / offset) nor a constant")


def probe_z(N: int, k: int, dtype: torch.dtype, device, seed: int) -> torch.Tensor:
    """Probe values of the local ``(N, k)``: row 0 zero, rows 1..k the unit vectors, the rest standard normal."""
    gen = torch.Generator().manual_seed(seed)
    rest = torch.randn((N - k - 1, k), generator=gen, dtype=torch.float64)
    return torch.cat([torch.zeros(1, k, dtype=torch.float64), torch.eye(k, dtype=torch.float64), rest]).to(
        dtype=dtype, device=device)


def _affine_parts(view: str, z: str, site: dict, Z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(W (D, k), offset (D,), scale_tril (D, D))`` of a view run at the probe values ``Z`` (``probe_z``), checked:
    its mean is ``offset + Z W^T`` at every row and its scale_tril the same at every row."""
    loc, tril = gaussian_params(view, site)
    k = Z.shape[1]
    offset = loc[0]
    W = (loc[1:k + 1] - offset).T
    if not close(loc, offset + Z.to(loc) @ W.T):
        raise NotConjugate(f"site '{view}': its mean is not affine in the local '{z}' (checked at z = 0, the unit "
                           "vectors and random rows)")
    if not close(tril, tril[:1]):
        raise NotConjugate(f"site '{view}': its covariance must be the same for every row and not depend on the "
                           f"local '{z}'")
    return W, offset, tril[0]


def _log_density(site: dict) -> torch.Tensor:
    return site["fn"].log_prob(site["value"]).sum()


def _probe_runs(model, args, kwargs, z: str) -> tuple:
    """The probe runs: the plain first one (shapes), ``a`` and ``b`` with z at ``probe_z`` and different prior draws
    of the globals, and their ``Z``."""
    try:
        first = run_fixed(model, args, kwargs, {}, PROBE_SEEDS[0])
        if first.params:
            raise NotConjugate(f"'{first.params[0]}' is a learnable parameter: backend 'vi' fits no parameters")
        zval = first.sites[z]["value"]
        if zval.dim() != 2:
            raise NotConjugate(f"site '{z}': the Gaussian local must be one (N, k) matrix, got {tuple(zval.shape)}")
        N, k = zval.shape
        if N < k + 2:
            raise NotConjugate(f"site '{z}': probing its children's means needs at least k + 2 = {k + 2} rows, "
                               f"got {N}")
        Z = probe_z(N, k, zval.dtype, zval.device, PROBE_SEEDS[0])
        a = run_fixed(model, args, kwargs, {z: Z}, PROBE_SEEDS[0])
        b = run_fixed(model, args, kwargs, {z: Z}, PROBE_SEEDS[1])
    except NotConjugate:
        raise
    except (RuntimeError, IndexError, TypeError, ValueError, KeyError) as exc:
        raise NotConjugate(f"the model fails when run with its local held at probe values: {type(exc).__name__}: "
                           f"{exc}") from exc
    return a, b, Z


def analyse(model, args, kwargs, facts, graph) -> FactorStructure:
    """Probe ``model`` for a linear-Gaussian latent factor model (module docstring) and return its
    ``FactorStructure``; ``NotConjugate`` names the site that does not fit.

    Runs: ``a`` and ``b`` hold z at ``probe_z`` with two prior draws of the globals (which sites are the loadings
    and offsets: those whose values the means' slopes and intercepts are in both); ``c`` holds z at other random
    rows and the noise sites at ``a``'s values, the loadings and offsets drawn afresh (the covariance and the noise
    priors must then be ``a``'s: they depend on the noise sites only)."""
    names = latent_factor_sites(graph, facts)
    if names is None:
        raise NotConjugate("the model does not have the layout of a latent factor model (one continuous latent in a "
                           "plate whose children are observed Gaussian vectors)")
    z, views = names
    latent = [s for s in facts.continuous if s != z]
    a, b, Z = _probe_runs(model, args, kwargs, z)
    z_loc, z_prec = _z_prior(z, a.sites[z], b.sites[z])
    out_dtype = z_loc.dtype if z_loc.is_floating_point() else torch.get_default_dtype()
    dtype = torch.float64
    N, k = z_loc.shape
    candidates = [s for s in (i.name for i in graph.sites()) if s not in views and s != z and not graph.site(s).plates]
    taken: dict = {}
    parts = []
    for v in views:
        W_a, off_a, tril = _affine_parts(v, z, a.sites[v], Z)
        W_b, off_b, tril_b = _affine_parts(v, z, b.sites[v], Z)
        loading = _coefficient(v, "loading", (W_a, W_b), (a, b), candidates, taken)
        offset = _coefficient(v, "offset", (off_a, off_b), (a, b), candidates, taken)
        # diagonal at two draws of the noise (a and b): then at every value the noise step may try
        diagonal = all(bool((t - torch.diag_embed(t.diagonal())).abs().max() == 0) for t in (tril, tril_b))
        parts.append((v, loading, offset, tril, diagonal))
    noise = [s for s in latent if s not in taken]
    Zc = probe_z(N, k, Z.dtype, Z.device, PROBE_SEEDS[1])
    try:
        c = run_fixed(model, args, kwargs, {z: Zc, **{s: a.sites[s]["value"] for s in noise}}, PROBE_SEEDS[1])
    except (RuntimeError, IndexError, TypeError, ValueError, KeyError) as exc:
        raise NotConjugate(f"the model fails when run with its local held at probe values: {type(exc).__name__}: "
                           f"{exc}") from exc
    out = []
    for v, loading, offset, tril, diagonal in parts:
        W_c, off_c, tril_c = _affine_parts(v, z, c.sites[v], Zc)
        for coef, got in ((loading, W_c), (offset, off_c)):
            if coef.latent and not close(coef.site_value(got) if coef is loading else got, c.sites[coef.site]["value"]):
                raise NotConjugate(f"site '{v}': its mean is not affine in the local '{z}' with slope and intercept "
                                   f"the values of '{loading.site or 'a constant'}' and '{offset.site or 'a constant'}'")
        if not close(tril_c, tril):
            raise NotConjugate(f"site '{v}': its covariance depends on a latent variable other than the noise sites "
                               f"({', '.join(noise) or 'none'}): on a loading, an offset or the local")
        out.append(make_view(v, a.sites[v]["value"].to(dtype), loading, offset, diagonal, k))
    for s in noise:
        if not close(_log_density(a.sites[s]), _log_density(c.sites[s])):
            raise NotConjugate(f"site '{s}': the prior of a point-estimated noise site must not depend on the local, "
                               "the loadings or the offsets")
    constant = 0.0
    for s in (i.name for i in graph.sites()):
        if s in views or not a.sites[s]["observed"]:
            continue
        if not close(_log_density(a.sites[s]), _log_density(c.sites[s])):
            raise NotConjugate(f"site '{s}': an observed site that is not a view of the local must not depend on a "
                               "latent variable (backend 'vi', latent factor model)")
        constant += float(_log_density(a.sites[s]))
    return FactorStructure(z, z_loc.to(dtype), z_prec.to(dtype), tuple(out),
                           {s: a.sites[s]["value"].detach() for s in noise},
                           {s: a.sites[s]["fn"].support for s in noise},
                           {s: type(peel(a.sites[s]["fn"])[0]).__name__ for s in noise},
                           tuple(p[3].to(dtype) for p in parts), constant, model, tuple(args), dict(kwargs),
                           {s: a.sites[s]["value"] for s in [z, *taken]}, dtype, out_dtype)


# ---------------------------------------------------------------------------------------------- the fit


@dataclass(frozen=True)
class QZ:
    """q(z_n) = N(``mean[n]``, ``cov``): ``mean (N, k)``, ``cov (k, k)`` (the same for every row)."""

    mean: torch.Tensor
    cov: torch.Tensor


@dataclass(frozen=True)
class QB:
    r"""q(B) of one view, B = [W, mu] ``(D, c)``, c = k + 1: ``mean (D, c)`` (the fixed values in fixed columns),
    ``cov`` of the row-major vec(B): ``(D c, D c)`` (a full-noise view) or per row ``(D, c, c)`` (diagonal noise),
    zero at fixed entries; ``chol`` the Cholesky factor of the latent entries' covariance (``(n, n)`` or
    ``(D, L, L)``), None for a start (a point mass)."""

    mean: torch.Tensor
    cov: torch.Tensor
    chol: torch.Tensor | None = None


@dataclass(frozen=True)
class State:
    """Where a fit stands: q(z), q(B) per view, the noise point estimate ``theta`` (site -> value), each view's
    ``trils`` at it and ``log_prior`` = log p(theta)."""

    qz: QZ
    qb: tuple
    theta: dict
    trils: tuple
    log_prior: float


def precision(view: View, tril: torch.Tensor) -> torch.Tensor:
    r""":math:`P = \Psi^{-1}` ``(D, D)`` from :math:`\Psi = T T^\top`, ``tril = T``; its diagonal ``(D,)`` for a
    diagonal view."""
    if view.diagonal:
        return tril.diagonal().pow(-2)
    return torch.cholesky_inverse(tril)


def expected_gram(view: View, qb: QB, P: torch.Tensor) -> torch.Tensor:
    r""":math:`G = E_q[B^\top P B]` ``(c, c)`` :math:`= M^\top P M + \sum_{d,e} P_{de} \mathrm{Cov}(B_{d\cdot},
    B_{e\cdot})`."""
    M = qb.mean
    D, c = M.shape
    if view.diagonal:
        return M.T @ (P[:, None] * M) + torch.einsum("d,dij->ij", P, qb.cov)
    return M.T @ P @ M + torch.einsum("de,diej->ij", P, qb.cov.reshape(D, c, D, c))


def z_statistics(qz: QZ) -> tuple[torch.Tensor, torch.Tensor]:
    r""":math:`E[\tilde Z]` ``(N, c)`` with :math:`\tilde z = [z; 1]`, and :math:`S = \sum_n E[\tilde z_n \tilde
    z_n^\top]` ``(c, c)``."""
    N, k = qz.mean.shape
    Ez = torch.cat([qz.mean, qz.mean.new_ones(N, 1)], 1)
    S = Ez.T @ Ez
    S[:k, :k] += N * qz.cov
    return Ez, S


def update_z(structure: FactorStructure, qbs: tuple, precs: tuple) -> QZ:
    r"""The optimal q(z) given q(B) and the noise (module docstring): :math:`\Sigma^{-1} = \Sigma_0^{-1} + \sum_v
    G_v[{:}k, {:}k]`, :math:`m_n = \Sigma(\Sigma_0^{-1} m_{0n} + \sum_v E[W_v]^\top P_v x_n - G_v[{:}k, k])`."""
    N, k = structure.shape
    lam = structure.z_prec.clone()
    h = structure.z_loc @ structure.z_prec
    for view, qb, P in zip(structure.views, qbs, precs):
        G = expected_gram(view, qb, P)
        lam = lam + G[:k, :k]
        PW = P[:, None] * qb.mean[:, :k] if view.diagonal else P @ qb.mean[:, :k]
        h = h + view.x @ PW - G[:k, k]
    chol = torch.linalg.cholesky(0.5 * (lam + lam.T))
    cov = torch.cholesky_inverse(chol)
    return QZ(h @ cov, cov)


def update_b(view: View, Ez: torch.Tensor, S: torch.Tensor, P: torch.Tensor) -> QB:
    r"""The optimal q(B) of ``view`` given q(z) (``Ez, S``: ``z_statistics``) and the noise precision ``P``:
    precision :math:`\Lambda_0 + P \otimes S` over the latent entries of the row-major vec(B), linear term
    :math:`\Lambda_0 m_0 + \mathrm{vec}(P X^\top E\tilde Z) - (P \otimes S)_{LF} b_F` (F: the fixed entries);
    row by row when ``P`` is diagonal."""
    D, c = view.fixed.shape
    lat = list(view.latent)
    fix = [j for j in range(c) if j not in view.latent]
    XtZ = view.x.T @ Ez
    mean, cov = view.fixed.clone(), view.fixed.new_zeros((D, c, c) if view.diagonal else (D * c, D * c))
    if not lat:
        return QB(mean, cov)
    lam0, m0 = view.prior_prec[:, lat], view.prior_loc[:, lat]
    if view.diagonal:
        lin = P[:, None] * (XtZ[:, lat] - view.fixed[:, fix] @ S[fix][:, lat]) + lam0 * m0
        lam = P[:, None, None] * S[lat][:, lat] + torch.diag_embed(lam0)
        chol = torch.linalg.cholesky(lam)
        cov_l = torch.cholesky_inverse(chol)
        mean[:, lat] = (cov_l @ lin.unsqueeze(-1)).squeeze(-1)
        idx = torch.tensor(lat, device=cov.device)
        cov[:, idx[:, None], idx[None, :]] = cov_l
        return QB(mean, cov, torch.linalg.cholesky(cov_l))
    rows = torch.arange(D, device=cov.device)[:, None] * c
    idx = (rows + torch.tensor(lat, device=cov.device)).reshape(-1)
    fidx = (rows + torch.tensor(fix, device=cov.device, dtype=torch.long)).reshape(-1)
    big = torch.kron(P.contiguous(), S.contiguous())
    lin = (P @ XtZ).reshape(-1)[idx] - big[idx][:, fidx] @ view.fixed[:, fix].reshape(-1) \
        + (lam0 * m0).reshape(-1)
    lam = big[idx][:, idx] + torch.diag(lam0.reshape(-1))
    chol = torch.linalg.cholesky(0.5 * (lam + lam.T))
    cov_l = torch.cholesky_inverse(chol)
    mean.view(-1)[idx] = cov_l @ lin
    cov[idx[:, None], idx[None, :]] = cov_l
    return QB(mean, cov, torch.linalg.cholesky(cov_l))


def expected_scatter(view: View, Ez: torch.Tensor, S: torch.Tensor, qb: QB) -> torch.Tensor:
    r""":math:`R = E_q \sum_n (x_n - B \tilde z_n)(x_n - B \tilde z_n)^\top` ``(D, D)`` :math:`= X^\top X -
    X^\top E\tilde Z M^\top - M E\tilde Z^\top X + M S M^\top + \big(\sum_{ij} S_{ij}\mathrm{Cov}(B_{di},
    B_{ej})\big)_{de}`."""
    M = qb.mean
    D, c = M.shape
    cross = view.x.T @ Ez @ M.T
    if view.diagonal:
        extra = torch.diag(torch.einsum("ij,dij->d", S, qb.cov))
    else:
        extra = torch.einsum("ij,diej->de", S, qb.cov.reshape(D, c, D, c))
    R = view.xx - cross - cross.T + M @ S @ M.T + extra
    return 0.5 * (R + R.T)


def expected_log_lik(N: int, tril: torch.Tensor, R: torch.Tensor) -> torch.Tensor:
    r""":math:`E_q \log p(x) = -\frac{ND}2 \log 2\pi - N \sum_d \log |T_{dd}| - \frac12 \mathrm{tr}(T^{-1} R
    T^{-\top})` for :math:`\Psi = T T^\top` (``tril (D, D)``) and ``R = expected_scatter``."""
    D = tril.shape[-1]
    A = torch.linalg.solve_triangular(tril, R, upper=False)
    trace = torch.linalg.solve_triangular(tril, A.T, upper=False).diagonal().sum()
    return -0.5 * N * D * math.log(2 * math.pi) - N * tril.diagonal().abs().log().sum() - 0.5 * trace


def noise_at(structure: FactorStructure, theta: dict, grad: bool = False) -> tuple[tuple, torch.Tensor]:
    """Each view's ``scale_tril (D, D)`` and the log prior density of the noise sites, with the noise sites at
    ``theta`` (the model run once, every other latent held at its prior mean or the probe's values)."""
    run = run_fixed(structure.model, structure.args, structure.kwargs, {**structure.held, **theta}, PROBE_SEEDS[0],
                    grad)
    trils = tuple(gaussian_params(v.name, run.sites[v.name])[1].reshape((-1,) + v.xx.shape)[0].to(structure.dtype)
                  for v in structure.views)
    log_prior = sum((_log_density(run.sites[s]).to(structure.dtype) for s in theta),
                    torch.zeros((), dtype=structure.dtype))
    return trils, log_prior


def noise_objective(structure: FactorStructure, trils: tuple, log_prior: torch.Tensor, Rs: tuple) -> torch.Tensor:
    r"""What the noise step maximizes: :math:`\sum_v E_q \log p(x^{(v)}) + \log p(\theta)` (``expected_log_lik``)."""
    N = structure.shape[0]
    return sum((expected_log_lik(N, T, R) for T, R in zip(trils, Rs)), log_prior)


def update_noise(structure: FactorStructure, state: State, Rs: tuple, iters: int) -> State:
    """The noise point estimate after at most ``iters * 5 // 4`` evaluations of L-BFGS (``point_step.lbfgs_ascent``:
    ``training.lbfgs_block``, torch.optim.LBFGS's iterations and strong-Wolfe line search, without constructing its
    optimizer, whose first use imports torch._dynamo, ~1 s) on ``noise_objective`` in the noise sites' unconstrained
    coordinates, from ``state.theta``; the old one if that does not raise the objective (so the ELBO + log prior never decreases)."""
    if not structure.noise:
        return state
    old = float(noise_objective(structure, state.trils, torch.tensor(state.log_prior, dtype=structure.dtype), Rs))
    found = lbfgs_ascent(state.theta, structure.supports,
                         lambda theta, grad: noise_objective(structure, *noise_at(structure, theta, grad), Rs), old,
                         iters)
    if found is None:
        return state
    theta = found[0]
    trils, log_prior = noise_at(structure, theta)
    return State(state.qz, state.qb, theta, trils, float(log_prior))


def kl_z(structure: FactorStructure, qz: QZ) -> torch.Tensor:
    r""":math:`\sum_n KL(N(m_n, \Sigma) \| N(m_{0n}, \Sigma_0))`."""
    N, k = structure.shape
    lam0 = structure.z_prec
    diff = qz.mean - structure.z_loc
    quad = ((diff @ lam0) * diff).sum()
    return 0.5 * (N * (lam0 * qz.cov).sum() + quad - N * k - N * torch.logdet(lam0) - N * torch.logdet(qz.cov))


def kl_b(view: View, qb: QB) -> torch.Tensor:
    r""":math:`KL(q(B) \| p(B))` over the latent entries: :math:`\frac12 \sum (\lambda_0 (\mathrm{var} + (m -
    m_0)^2) - 1 - \log\lambda_0) - \frac12 \log|\mathrm{Cov}|`."""
    lat = list(view.latent)
    if not lat:
        return view.x.new_zeros(())
    D, c = view.fixed.shape
    var = (qb.cov.diagonal(dim1=-2, dim2=-1) if view.diagonal else qb.cov.diagonal().reshape(D, c))[:, lat]
    lam0, diff = view.prior_prec[:, lat], (qb.mean - view.prior_loc)[:, lat]
    logdet = 2 * qb.chol.diagonal(dim1=-2, dim2=-1).log().sum()
    return 0.5 * ((lam0 * (var + diff * diff) - 1 - lam0.log()).sum() - logdet)


def elbo_terms(structure: FactorStructure, state: State) -> dict[str, float]:
    """The objective term by term at ``state``: ``E log p(view)`` per view, ``-KL(z)``, ``-KL(loading, offset)``
    per view with latent ones, the point estimates' log prior and the observed sites' constant."""
    N = structure.shape[0]
    Ez, S = z_statistics(state.qz)
    terms = {}
    for view, qb, T in zip(structure.views, state.qb, state.trils):
        terms[f"E log p({view.name})"] = float(expected_log_lik(N, T, expected_scatter(view, Ez, S, qb)))
    terms[f"-KL({structure.z})"] = -float(kl_z(structure, state.qz))
    for view, qb in zip(structure.views, state.qb):
        if view.sites:
            terms[f"-KL({', '.join(view.sites)})"] = -float(kl_b(view, qb))
    if structure.noise:
        terms[f"{PRIOR_TERM} {', '.join(structure.noise)}"] = state.log_prior
    if structure.constant:
        terms["log p(observed sites with no latent parent)"] = structure.constant
    return terms


PRIOR_TERM = "log p(point estimates)"


def sweep(structure: FactorStructure, state: State) -> State:
    """One coordinate-ascent sweep: q(z), then q(B) of each view, then the noise point estimate."""
    precs = tuple(precision(v, T) for v, T in zip(structure.views, state.trils))
    qz = update_z(structure, state.qb, precs)
    Ez, S = z_statistics(qz)
    qb = tuple(update_b(v, Ez, S, P) for v, P in zip(structure.views, precs))
    new = State(qz, qb, state.theta, state.trils, state.log_prior)
    Rs = tuple(expected_scatter(v, Ez, S, q) for v, q in zip(structure.views, qb))
    return update_noise(structure, new, Rs, NOISE_ITERS)


@dataclass(kw_only=True)
class FactorFit(SweepRecord):
    """A fit: the final ``State``; ``history`` the objective (ELBO + log prior of the point estimates) per sweep,
    ``terms`` name -> value per sweep, ``converged``, ``interrupted``."""

    state: State


def overrelaxed(structure: FactorStructure, old: State, new: State, eta: float) -> State:
    """The globals' step from ``old`` to ``new`` stretched by ``eta``: the means of q(B) and the noise sites'
    unconstrained values moved ``eta`` times as far (``eta = 1`` gives ``new``'s), the covariances of q(B) ``new``'s,
    and q(z) the optimal one given them (``update_z``)."""
    qb = tuple(QB(o.mean + eta * (n.mean - o.mean), n.cov, n.chol) for o, n in zip(old.qb, new.qb))
    theta, trils, log_prior = new.theta, new.trils, new.log_prior
    if new.theta:
        theta = {}
        for name, value in new.theta.items():
            t = biject_to(structure.supports[name])
            before, after = t.inv(old.theta[name]), t.inv(value)
            theta[name] = t(before + eta * (after - before))
        trils, log_prior = noise_at(structure, theta)
        log_prior = float(log_prior)
    qz = update_z(structure, qb, tuple(precision(v, T) for v, T in zip(structure.views, trils)))
    return State(qz, qb, theta, trils, log_prior)


def objective(terms: dict) -> float:
    """The ELBO + log prior of the point estimates: the sum of ``elbo_terms`` (-inf when one is not finite)."""
    value = sum(terms.values())
    return value if math.isfinite(value) else -math.inf


def coordinate_ascent(structure: FactorStructure, start: State, num_steps: int, tol: float, on_step=None,
                      overrelax: bool = True) -> FactorFit:
    """Sweeps from ``start`` until the relative change of the objective is below ``tol`` or ``num_steps`` sweeps
    ran; warns ``cavi.ELBODecreased`` if a sweep lowers it by more than round-off. Ctrl-C stops at the last whole
    sweep (``FactorFit.interrupted``).

    ``overrelax``: adaptive overrelaxation (Salakhutdinov & Roweis 2003, as ``nmf.coordinate_ascent``): after each
    sweep its step is also tried stretched by eta (``overrelaxed``) and kept only where the objective is higher
    than the sweep's; eta doubles after each kept step and is quartered (at least 2) after a rejected one (the
    ridge along which a factor model's fit creeps takes steps of 8-16 sweeps). Each sweep still ends at least at
    the plain sweep's objective, so it never decreases."""
    def step(current, history):
        s, eta = current
        new = sweep(structure, s)
        terms = elbo_terms(structure, new)
        if overrelax and history:
            trial = overrelaxed(structure, s, new, eta)
            trial_terms = elbo_terms(structure, trial)
            if objective(trial_terms) > objective(terms):
                return (trial, eta * OVERRELAX_GROWTH), trial_terms, None
            eta = max(OVERRELAX_GROWTH, eta / OVERRELAX_GROWTH ** 2)
        return (new, eta), terms, None

    (s, _), *fields = sweep_until(step, (start, OVERRELAX_GROWTH), num_steps, tol, structure.dtype, on_step)
    return FactorFit(*fields, state=s)


# --------------------------------------------------------------------------------------------- the starts


def pca_loadings(structure: FactorStructure, restart: int, gen: torch.Generator) -> tuple:
    r"""Start values ``(W (sum D, k), mu (sum D,), psi (sum D,))`` of the stacked views: restart 0 probabilistic
    PCA's maximum-likelihood fit (Tipping & Bishop 1999), :math:`W = U_k (\Lambda_k - \bar\sigma^2)^{1/2}` from the
    top-k eigenpairs of the sample covariance, :math:`\bar\sigma^2` the mean of the other eigenvalues; later
    restarts random N(0, 1) loadings scaled to the same total variance. psi: the variance W leaves unexplained,
    floored at 5% of each dim's variance."""
    X = torch.cat([v.x for v in structure.views], 1)
    N, k = structure.shape
    mu = X.mean(0)
    cov = (X - mu).T @ (X - mu) / N
    evals, evecs = torch.linalg.eigh(cov)
    rest = evals[:-k] if evals.shape[0] > k else evals.new_zeros(1)
    sigma2 = rest.mean().clamp_min(0)
    W = evecs[:, -k:] * (evals[-k:] - sigma2).clamp_min(1e-3 * evals[-1].clamp_min(1e-12)).sqrt()
    if restart > 0:
        R = torch.randn(W.shape, generator=gen, dtype=torch.float64).to(W)
        W = R * (W.square().sum() / R.square().sum()).sqrt()
    psi = (cov.diagonal() - W.square().sum(1)).clamp_min(0.05 * cov.diagonal()).clamp_min(1e-12)
    return W, mu, psi


def initial_state(structure: FactorStructure, restart: int, gen: torch.Generator) -> State:
    """Start ``restart``: q(B) a point mass at the start loadings (``pca_loadings``; fixed columns keep their
    values), q(z) from it with the start's diagonal noise, then the noise point estimate after
    ``START_NOISE_ITERS`` L-BFGS iterations from the first probe's values (the structure's ``trils`` when there is
    no noise site)."""
    W, mu, psi = pca_loadings(structure, restart, gen)
    k = structure.shape[1]
    qbs, precs, at = [], [], 0
    for view in structure.views:
        D = view.x.shape[1]
        mean = view.fixed.clone()
        start = torch.cat([W[at:at + D], mu[at:at + D, None]], 1)
        lat = list(view.latent)
        mean[:, lat] = start[:, lat]
        cov = view.fixed.new_zeros((D, k + 1, k + 1) if view.diagonal else (D * (k + 1), D * (k + 1)))
        qbs.append(QB(mean, cov))
        p = psi[at:at + D].reciprocal()
        precs.append(p if view.diagonal else torch.diag(p))
        at += D
    qz = update_z(structure, tuple(qbs), tuple(precs))
    if not structure.noise:
        return State(qz, tuple(qbs), {}, structure.trils, 0.0)
    trils, log_prior = noise_at(structure, structure.noise)
    state = State(qz, tuple(qbs), dict(structure.noise), trils, float(log_prior))
    Ez, S = z_statistics(qz)
    Rs = tuple(expected_scatter(v, Ez, S, q) for v, q in zip(structure.views, qbs))
    return update_noise(structure, state, Rs, START_NOISE_ITERS)


def fit(structure: FactorStructure, num_steps: int, tol: float, restarts: int, seed: int, progress: bool
        ) -> tuple[FactorFit, bool]:
    """``restarts`` starts (``initial_state`` 0, 1, ... seeded by ``seed``) screened by ``SCREEN_SWEEPS`` sweeps
    each; the one with the best objective then runs on to ``num_steps`` sweeps in all (or the relative change
    ``tol``). ``(that fit, interrupted by Ctrl-C)`` (``cavi.screened_fit``; with one start no screening)."""
    return screened_fit(lambda state, n, tol, on_step: coordinate_ascent(structure, state, n, tol, on_step),
                        lambda i, gen: initial_state(structure, i, gen), num_steps, tol, restarts, seed, progress,
                        "vi (factor model)", SCREEN_SWEEPS)


# ------------------------------------------------------------------------------------- backend plumbing


def describe(structure: FactorStructure) -> dict[str, str]:
    """site -> the update ``plan.explain()`` prints: q(loading, offset) in closed form, the noise sites' point
    estimates, q(z)."""
    out = {structure.z: ("q({z}) = MultivariateNormal per row: closed form from E[W^T Psi^-1 W] and "
                         "E[W]^T Psi^-1 (x - E[mu]) of {views}").format(
        z=structure.z, views=", ".join(v.name for v in structure.views))}
    for view in structure.views:
        if not view.sites:
            continue
        how = "row by row (diagonal noise)" if view.diagonal else "jointly over the view (full noise covariance)"
        text = (f"q({', '.join(view.sites)}) = MultivariateNormal: closed form from expected statistics of "
                f"{structure.z} and {view.name}, {how}")
        for s in view.sites:
            out[s] = text
    for s in structure.noise:
        out[s] = (f"{s}: point estimate ({structure.priors[s]} prior not conjugate), L-BFGS on the expected "
                  "log joint inside each sweep; posterior draws are a point mass")
    return out


def treatment_rows(graph, z: str, updates: dict) -> list:
    """The plan's rows for a latent factor model (``updates``: ``describe``'s, when the model was probed)."""
    rows = []
    for s in graph.sites():
        detail = updates.get(s.name)
        if s.observed:
            rows.append(SiteTreatment(s.name, "observed", f"{s.family}, shape {s.value_shape}"))
        elif s.name == z:
            rows.append(SiteTreatment(s.name, "natural gradient", detail or f"q({z}) = MultivariateNormal per row: "
                                      "closed form (checked by probing when the fit starts)"))
        elif detail is not None and "point estimate" in detail:
            rows.append(SiteTreatment(s.name, "point estimate", detail))
        else:
            rows.append(SiteTreatment(s.name, "natural gradient", detail or "q = MultivariateNormal in closed form if "
                                      "it is a Normal loading / offset, else a point estimate (checked by probing "
                                      "when the fit starts)"))
    return rows


def posterior(model, args, kwargs, plan, structure: FactorStructure, best: FactorFit, num_samples: int,
              interrupted: bool, gen: torch.Generator):
    """The typed Posterior: draws of each latent loading / offset site from q(B) (its mean as the point), of z from
    q(z) when ``num_samples x N x k <= Z_DRAWS_MAX`` (its means as the point), the noise sites as point masses."""
    s = best.state
    draws, point = {}, {}
    N, k = structure.shape
    for view, qb in zip(structure.views, s.qb):
        if not view.sites:
            continue
        lat = list(view.latent)
        D = qb.mean.shape[0]
        eps = torch.randn((num_samples,) + (qb.mean[:, lat].shape if view.diagonal else (D * len(lat),)),
                          generator=gen, dtype=torch.float64).to(qb.mean)
        B = qb.mean.expand((num_samples,) + qb.mean.shape).clone()
        if view.diagonal:
            B[..., lat] += (qb.chol @ eps.unsqueeze(-1)).squeeze(-1)
        else:
            B[..., lat] += (eps @ qb.chol.T).reshape(num_samples, D, len(lat))
        for coef, part, mean in ((view.loading, B[..., :k], qb.mean[:, :k]), (view.offset, B[..., k], qb.mean[:, k])):
            if coef.latent:
                value = coef.site_value(part) if coef is view.loading else part
                draws[coef.site] = value.unsqueeze(0).to(structure.out_dtype)
                point[coef.site] = (coef.site_value(mean) if coef is view.loading else mean).to(structure.out_dtype)
    for name, value in s.theta.items():
        draws[name] = value.expand((1, num_samples) + value.shape).contiguous()
        point[name] = value
    point[structure.z] = s.qz.mean.to(structure.out_dtype)
    if num_samples * N * k <= Z_DRAWS_MAX:
        eps = torch.randn((num_samples, N, k), generator=gen, dtype=torch.float64).to(s.qz.mean)
        draws[structure.z] = (s.qz.mean + eps @ torch.linalg.cholesky(s.qz.cov).T).unsqueeze(0).to(structure.out_dtype)
    history = training.History(-v for v in best.history)
    history.interrupted = interrupted
    elbo = best.elbo - s.log_prior
    kind = "ELBO (lower bound)" if not s.theta else \
        f"ELBO (lower bound on log p(data | {', '.join(s.theta)}) at their point estimates)"
    return make_posterior(plan, model, args, kwargs, draws=draws, point=point, history=history,
                          log_evidence=LogEvidence(elbo, kind), elbo_terms=best.terms)


def run(model, args, kwargs, plan, num_steps: int, tol: float, restarts: int, seed: int, num_samples: int,
        progress: bool, structure: FactorStructure | None = None):
    """The vi backend's run for a latent factor model (``backend.run`` dispatches here): the best of ``restarts``
    fits' Posterior. ``structure``: what ``analyse`` found on these very ``(model, args, kwargs)`` at compile time
    (None: probe the model again)."""
    structure = analyse(model, args, kwargs, plan.facts, plan.graph) if structure is None else structure
    best, interrupted = fit(structure, num_steps, tol, restarts, seed, progress)
    return posterior(model, args, kwargs, plan, structure, best, num_samples, interrupted,
                     torch.Generator().manual_seed(seed))
