r"""Normal-inverse-Wishart :math:`NIW(\mu_0, \kappa, \Psi, \nu)`, the conjugate prior on the mean and
covariance :math:`(\mu, \Sigma)` of a Gaussian on :math:`\mathbb{R}^D`:

.. math::
    \Sigma \sim IW(\Psi, \nu), \qquad \mu \mid \Sigma \sim N(\mu_0, \Sigma / \kappa), \qquad
    \kappa > 0,\ \nu > D - 1,\ \Psi \succ 0.

Sufficient statistics (the Gaussian log-likelihood is linear in them) and natural parameters
(read as pseudo-data: a scatter, a sum, and two counts):

.. math::
    t(\mu, \Sigma) = \big(-\tfrac12\Sigma^{-1},\; \Sigma^{-1}\mu,\; -\tfrac12\mu^\top\Sigma^{-1}\mu,\;
    -\tfrac12\log|\Sigma|\big),

    \eta = \big(\Psi + \kappa\mu_0\mu_0^\top,\; \kappa\mu_0,\; \kappa,\; \nu + D + 2\big),

    A(\eta) = \tfrac{\nu D}{2}\log 2 + \log\Gamma_D(\tfrac{\nu}{2}) - \tfrac{\nu}{2}\log|\Psi|
              + \tfrac{D}{2}\log 2\pi - \tfrac{D}{2}\log\kappa,

with the density w.r.t. Lebesgue measure on :math:`(\mu, \Sigma_{ij}, i \ge j)`. Expected statistics
in closed form (:math:`\psi_D` the multivariate digamma):

.. math::
    E[\Sigma^{-1}] = \nu\Psi^{-1}, \quad E[\Sigma^{-1}\mu] = \nu\Psi^{-1}\mu_0, \quad
    E[\mu^\top\Sigma^{-1}\mu] = D/\kappa + \nu\mu_0^\top\Psi^{-1}\mu_0, \quad
    E[\log|\Sigma|] = \log|\Psi| - D\log 2 - \psi_D(\nu/2).

Conjugacy:
:math:`\log N(x \mid \mu, \Sigma) = \langle (xx^\top, x, 1, 1), t(\mu, \Sigma)\rangle - \tfrac{D}{2}\log 2\pi`,
so data add :func:`data_stats` ``= (sum x x^T, sum x, n, n)`` to :math:`\eta` (:func:`conjugate_update`) and
:math:`\log p(x_{1:n}) = A(\eta + s) - A(\eta) - \tfrac{nD}{2}\log 2\pi`.

Shapes: ``sum_xxT: (*batch, dim, dim)``, ``sum_x: (*batch, dim)``, ``count, logdet_count: (*batch)``.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from ..checks import (as_tensor, check_batch, check_finite, check_greater, check_positive_definite,
                      check_same_shape, check_symmetric, check_trailing, check_weights, scalar_field)
from ._common import (add_fieldwise, iw_expectations, iw_log_normalizer, kl_from_parts, logdet_chol, pair,
                      sample_inverse_wishart, symmetrize)
from .gaussian import GaussianStats

EVENT_DIMS = (2, 1, 0, 0)


class NIWNatural(NamedTuple):
    r"""Natural parameters (or data statistics, same layout): ``sum_xxT: (*batch, dim, dim)`` =
    :math:`\Psi + \kappa\mu_0\mu_0^\top`, ``sum_x: (*batch, dim)`` = :math:`\kappa\mu_0`,
    ``count: (*batch)`` = :math:`\kappa`, ``logdet_count: (*batch)`` = :math:`\nu + D + 2`."""
    sum_xxT: Tensor
    sum_x: Tensor
    count: Tensor
    logdet_count: Tensor


class NIWStats(NamedTuple):
    r"""Sufficient statistics paired field by field with :class:`NIWNatural`:
    ``neg_half_prec`` = :math:`-\tfrac12\Sigma^{-1}` ``(*batch, dim, dim)``,
    ``prec_mean`` = :math:`\Sigma^{-1}\mu` ``(*batch, dim)``,
    ``neg_half_quad`` = :math:`-\tfrac12\mu^\top\Sigma^{-1}\mu` ``(*batch)``,
    ``neg_half_logdet`` = :math:`-\tfrac12\log|\Sigma|` ``(*batch)``."""
    neg_half_prec: Tensor
    prec_mean: Tensor
    neg_half_quad: Tensor
    neg_half_logdet: Tensor


class NIWParams(NamedTuple):
    """Standard parameters: ``loc: (*batch, dim)`` mu_0, ``kappa: (*batch)``, ``scale: (*batch, dim, dim)`` Psi,
    ``df: (*batch)`` nu."""
    loc: Tensor
    kappa: Tensor
    scale: Tensor
    df: Tensor


class NIWExpectations(NamedTuple):
    r"""Plain expectations: ``prec`` :math:`E[\Sigma^{-1}]`, ``prec_mean`` :math:`E[\Sigma^{-1}\mu]`,
    ``quad`` :math:`E[\mu^\top\Sigma^{-1}\mu]`, ``logdet_cov`` :math:`E[\log|\Sigma|]`."""
    prec: Tensor
    prec_mean: Tensor
    quad: Tensor
    logdet_cov: Tensor


class NIWSample(NamedTuple):
    """A value of (mu, Sigma): ``loc: (..., dim)``, ``covariance_matrix: (..., dim, dim)``."""
    loc: Tensor
    covariance_matrix: Tensor


def _check_layout(natparam: NIWNatural, name: str) -> NIWNatural:
    S = as_tensor(f"{name}.sum_xxT", natparam.sum_xxT)
    batch = check_trailing(f"{name}.sum_xxT", S, (None, None), "(*batch, dim, dim)")
    D = S.shape[-1]
    m = as_tensor(f"{name}.sum_x", natparam.sum_x, S)
    check_trailing(f"{name}.sum_x", m, (D,), f"(*batch, {D})")
    check_batch(f"{name}.sum_x", m, batch, 1, "(*batch, dim)")
    count = scalar_field(f"{name}.count", natparam.count, S, batch)
    logdet_count = scalar_field(f"{name}.logdet_count", natparam.logdet_count, S, batch)
    check_symmetric(f"{name}.sum_xxT", S)
    for field, value in (("sum_x", m), ("count", count), ("logdet_count", logdet_count)):
        check_finite(f"{name}.{field}", value)
    return NIWNatural(S, m, count, logdet_count)


def _unpack(natparam: NIWNatural, name: str = "natparam"):
    """Validate; return ``(L_psi, mu0, kappa, nu)`` with ``L_psi`` the Cholesky factor of Psi."""
    S, m, kappa, logdet_count = _check_layout(natparam, name)
    D = S.shape[-1]
    check_greater(f"{name}.count", kappa, 0.0, "positive (kappa)")
    nu = logdet_count - D - 2
    check_greater(f"{name}.logdet_count", nu, D - 1.0,
                  f"> 2D + 1 = {2 * D + 1} (nu = logdet_count - D - 2 > D - 1)")
    mu0 = m / kappa[..., None]
    L = check_positive_definite(f"{name}.sum_xxT - sum_x sum_x^T / count (Psi)",
                                S - m[..., :, None] * mu0[..., None, :])
    return L, mu0, kappa, nu


def natural_from_standard(loc: Tensor, kappa, scale: Tensor, df) -> NIWNatural:
    r""":math:`\eta = (\Psi + \kappa\mu_0\mu_0^\top, \kappa\mu_0, \kappa, \nu + D + 2)` from
    ``loc: (*batch, dim)`` (mu_0), ``kappa: (*batch)`` or a number, ``scale: (*batch, dim, dim)`` (Psi),
    ``df: (*batch)`` or a number (nu)."""
    scale = as_tensor("scale", scale)
    batch = check_trailing("scale", scale, (None, None), "(*batch, dim, dim)")
    D = scale.shape[-1]
    loc = as_tensor("loc", loc, scale)
    check_trailing("loc", loc, (D,), f"(*batch, {D})")
    check_batch("loc", loc, batch, 1, "(*batch, dim)")
    kappa, df = scalar_field("kappa", kappa, scale, batch), scalar_field("df", df, scale, batch)
    check_finite("loc", loc)
    check_greater("kappa", kappa, 0.0, "positive")
    check_greater("df", df, D - 1.0, f"> dim - 1 = {D - 1}")
    check_positive_definite("scale", scale)
    outer = kappa[..., None, None] * loc[..., :, None] * loc[..., None, :]
    return NIWNatural(symmetrize(scale + outer), kappa[..., None] * loc, kappa, df + D + 2)


def standard_from_natural(natparam: NIWNatural) -> NIWParams:
    r""":math:`\mu_0 = m/\kappa`, :math:`\Psi = S - m m^\top/\kappa`, :math:`\nu = n - D - 2`
    (``S, m, kappa, n`` the four fields) as ``NIWParams``."""
    L, mu0, kappa, nu = _unpack(natparam)
    return NIWParams(mu0, kappa, L @ L.mT, nu)


def log_partition(natparam: NIWNatural) -> Tensor:
    r""":math:`A = \log Z_{IW}(\Psi, \nu) + \tfrac{D}{2}\log(2\pi/\kappa)`; returns ``(*batch)``."""
    L, _, kappa, nu = _unpack(natparam)
    return iw_log_normalizer(L, nu) + 0.5 * L.shape[-1] * (math.log(2 * math.pi) - kappa.log())


def expectations(natparam: NIWNatural) -> NIWExpectations:
    r""":math:`E[\Sigma^{-1}], E[\Sigma^{-1}\mu], E[\mu^\top\Sigma^{-1}\mu], E[\log|\Sigma|]` in closed form."""
    L, mu0, kappa, nu = _unpack(natparam)
    prec, logdet = iw_expectations(L, nu)
    prec_mean = (prec @ mu0[..., None])[..., 0]
    quad = L.shape[-1] / kappa + (mu0 * prec_mean).sum(-1)
    return NIWExpectations(prec, prec_mean, quad, logdet)


def expected_stats(natparam: NIWNatural) -> NIWStats:
    r""":math:`E[t] = \nabla A = (-\tfrac12 E[\Sigma^{-1}], E[\Sigma^{-1}\mu],
    -\tfrac12 E[\mu^\top\Sigma^{-1}\mu], -\tfrac12 E[\log|\Sigma|])`."""
    e = expectations(natparam)
    return NIWStats(-0.5 * e.prec, e.prec_mean, -0.5 * e.quad, -0.5 * e.logdet_cov)


def sufficient_stats(value: NIWSample) -> NIWStats:
    r""":math:`t(\mu, \Sigma)` for ``value = (loc: (..., dim), covariance_matrix: (..., dim, dim))``."""
    cov = as_tensor("value.covariance_matrix", value.covariance_matrix)
    check_trailing("value.covariance_matrix", cov, (None, None), "(..., dim, dim)")
    mu = as_tensor("value.loc", value.loc, cov)
    check_trailing("value.loc", mu, (cov.shape[-1],), f"(..., {cov.shape[-1]})")
    L = check_positive_definite("value.covariance_matrix", cov)
    prec_mu = torch.cholesky_solve(mu[..., None], L)[..., 0]
    return NIWStats(-0.5 * torch.cholesky_inverse(L), prec_mu, -0.5 * (mu * prec_mu).sum(-1),
                    -0.5 * logdet_chol(L))


def sample(natparam: NIWNatural, sample_shape: tuple = (),
           generator: torch.Generator | None = None) -> NIWSample:
    r""":math:`\Sigma \sim IW(\Psi, \nu)`, then
    :math:`\mu = \mu_0 + \mathrm{chol}(\Sigma)\varepsilon/\sqrt{\kappa}`;
    ``loc: (*sample_shape, *batch, dim)``, ``covariance_matrix: (*sample_shape, *batch, dim, dim)``."""
    L, mu0, kappa, nu = _unpack(natparam)
    cov = sample_inverse_wishart(L, nu, tuple(sample_shape), generator)
    eps = torch.randn(cov.shape[:-1], generator=generator, dtype=L.dtype, device=L.device)
    mu = mu0 + (torch.linalg.cholesky(cov) @ eps[..., None])[..., 0] / kappa.sqrt()[..., None]
    return NIWSample(mu, cov)


def log_prob(natparam: NIWNatural, value: NIWSample) -> Tensor:
    r""":math:`\log p(\mu, \Sigma) = \langle\eta, t(\mu, \Sigma)\rangle - A(\eta)`; ``(*sample, *batch)``."""
    stats = sufficient_stats(value)
    return pair(_check_layout(natparam, "natparam"), stats, EVENT_DIMS) - log_partition(natparam)


def kl(natparam_q: NIWNatural, natparam_p: NIWNatural) -> Tensor:
    r""":math:`KL(q\|p) = A(\eta_p) - A(\eta_q) - \langle\eta_p - \eta_q, E_q[t]\rangle`; ``(*batch)``."""
    q, p = _check_layout(natparam_q, "natparam_q"), _check_layout(natparam_p, "natparam_p")
    check_same_shape("natparam_q.sum_xxT", q.sum_xxT, "natparam_p.sum_xxT", p.sum_xxT)
    return kl_from_parts(log_partition(q), log_partition(p), q, p, expected_stats(q), EVENT_DIMS)


def data_stats(x: Tensor, weights: Tensor | None = None) -> NIWNatural:
    r"""Statistics of data ``x: (*batch, num, dim)`` with optional ``weights: (*batch, num)`` (e.g.
    responsibilities): :math:`(\sum_n w_n x_n x_n^\top, \sum_n w_n x_n, \sum_n w_n, \sum_n w_n)`."""
    x = as_tensor("x", x)
    check_trailing("x", x, (None, None), "(*batch, num, dim)")
    check_finite("x", x)
    if weights is None:
        n = torch.full(x.shape[:-2], float(x.shape[-2]), dtype=x.dtype, device=x.device)
        return NIWNatural(x.mT @ x, x.sum(-2), n, n)
    w = check_weights(weights, x)
    wx = w[..., None] * x
    n = w.sum(-1)
    return NIWNatural(wx.mT @ x, wx.sum(-2), n, n)


def expected_data_stats(stats: GaussianStats, weights: Tensor | None = None) -> NIWNatural:
    r"""NIW statistics of Gaussian expected statistics (:func:`ppl.expfam.gaussian.expected_stats`)
    ``stats = (neg_half_xxT: (*batch, num, dim, dim), x: (*batch, num, dim))`` with optional
    ``weights: (*batch, num)``: :math:`(\sum_n w_n E[x_nx_n^\top], \sum_n w_n E[x_n], \sum_n w_n, \sum_n w_n)`,
    so that :math:`\sum_n w_n E_q[\log N(x_n|\mu,\Sigma)] = \langle s, t(\mu,\Sigma)\rangle
    - \sum_n w_n \tfrac{D}{2}\log 2\pi`."""
    x = as_tensor("stats.x", stats.x)
    check_trailing("stats.x", x, (None, None), "(*batch, num, dim)")
    xxT = -2.0 * as_tensor("stats.neg_half_xxT", stats.neg_half_xxT, x)
    check_trailing("stats.neg_half_xxT", xxT, (x.shape[-1], x.shape[-1]), "(*batch, num, dim, dim)")
    check_batch("stats.neg_half_xxT", xxT, x.shape[:-1], 2, "(*batch, num, dim, dim)")
    if weights is None:
        n = torch.full(x.shape[:-2], float(x.shape[-2]), dtype=x.dtype, device=x.device)
        return NIWNatural(xxT.sum(-3), x.sum(-2), n, n)
    w = check_weights(weights, x)
    n = w.sum(-1)
    return NIWNatural((w[..., None, None] * xxT).sum(-3), (w[..., None] * x).sum(-2), n, n)


def conjugate_update(natparam: NIWNatural, stats: NIWNatural) -> NIWNatural:
    r"""Posterior natural parameters :math:`\eta + s` for data statistics ``stats`` (:func:`data_stats`)."""
    return add_fieldwise(_check_layout(natparam, "natparam"), _check_layout(stats, "stats"))
