r"""Multivariate Gaussian :math:`N(\mu, \Sigma)` on :math:`\mathbb{R}^D` in information form.

.. math::
    p(x) = \exp\big(\langle J, -\tfrac12 x x^\top\rangle + \langle h, x\rangle - A(J, h)\big), \qquad
    t(x) = \big(-\tfrac12 x x^\top,\; x\big),

    J = \Sigma^{-1}, \qquad h = \Sigma^{-1}\mu, \qquad
    A(J, h) = \tfrac12 h^\top J^{-1} h - \tfrac12 \log|J| + \tfrac{D}{2}\log 2\pi,

    E[t(x)] = \nabla A = \big(-\tfrac12 (\Sigma + \mu\mu^\top),\; \mu\big),

where :math:`\langle U, V\rangle = \mathrm{tr}(U^\top V)`; the :math:`-\tfrac12` lives in the statistic, so
natural parameters are the precision and the precision-weighted mean (the "-1/2 J convention" of
information-form Kalman filtering) and Gaussian potentials multiply by adding ``(J, h)``.
All solves go through the Cholesky factor of J.

Shapes: ``J: (*batch, dim, dim)``, ``h: (*batch, dim)``; values ``x: (*sample, *batch, dim)``.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from ..checks import (as_tensor, check_batch, check_finite, check_positive_definite, check_same_shape,
                      check_trailing)
from ._common import kl_from_parts, logdet_chol, pair, symmetrize

EVENT_DIMS = (2, 1)


class GaussianNatural(NamedTuple):
    """Natural parameters: ``J: (*batch, dim, dim)`` precision, ``h: (*batch, dim)`` precision times mean."""
    J: Tensor
    h: Tensor


class GaussianStats(NamedTuple):
    """Sufficient statistics (or their expectations), paired field by field with :class:`GaussianNatural`:
    ``neg_half_xxT: (*batch, dim, dim)`` = -1/2 x x^T, ``x: (*batch, dim)``."""
    neg_half_xxT: Tensor
    x: Tensor


class GaussianParams(NamedTuple):
    """Standard parameters: ``loc: (*batch, dim)``, ``covariance_matrix: (*batch, dim, dim)``."""
    loc: Tensor
    covariance_matrix: Tensor


def _chol_precision(natparam: GaussianNatural, name: str = "natparam") -> Tensor:
    """Validate ``natparam`` and return the lower Cholesky factor of J ``(*batch, dim, dim)``."""
    J = as_tensor(f"{name}.J", natparam.J)
    h = as_tensor(f"{name}.h", natparam.h, J)
    batch = check_trailing(f"{name}.J", J, (None, None), "(*batch, dim, dim)")
    check_trailing(f"{name}.h", h, (J.shape[-1],), f"(*batch, {J.shape[-1]})")
    check_batch(f"{name}.h", h, batch, 1, "(*batch, dim)")
    check_finite(f"{name}.h", h)
    return check_positive_definite(f"{name}.J", J)


def _mean(L: Tensor, h: Tensor) -> Tensor:
    return torch.cholesky_solve(h[..., None], L)[..., 0]


def natural_from_standard(loc: Tensor, covariance_matrix: Tensor) -> GaussianNatural:
    r""":math:`J = \Sigma^{-1}, h = \Sigma^{-1}\mu` from ``loc: (*batch, dim)``,
    ``covariance_matrix: (*batch, dim, dim)``."""
    cov = as_tensor("covariance_matrix", covariance_matrix)
    loc = as_tensor("loc", loc, cov)
    batch = check_trailing("covariance_matrix", cov, (None, None), "(*batch, dim, dim)")
    check_trailing("loc", loc, (cov.shape[-1],), f"(*batch, {cov.shape[-1]})")
    check_batch("loc", loc, batch, 1, "(*batch, dim)")
    check_finite("loc", loc)
    L = check_positive_definite("covariance_matrix", cov)
    return GaussianNatural(symmetrize(torch.cholesky_inverse(L)), _mean(L, loc))


def standard_from_natural(natparam: GaussianNatural) -> GaussianParams:
    r""":math:`\mu = J^{-1} h, \Sigma = J^{-1}` as ``GaussianParams(loc, covariance_matrix)``."""
    L = _chol_precision(natparam)
    return GaussianParams(_mean(L, natparam.h), torch.cholesky_inverse(L))


def log_partition(natparam: GaussianNatural) -> Tensor:
    r""":math:`A = \tfrac12 \|L^{-1}h\|^2 - \sum_i \log L_{ii} + \tfrac{D}{2}\log 2\pi` with
    :math:`J = LL^\top`; returns ``(*batch)``."""
    L = _chol_precision(natparam)
    v = torch.linalg.solve_triangular(L, natparam.h[..., None], upper=False)[..., 0]
    return 0.5 * v.square().sum(-1) - 0.5 * logdet_chol(L) + 0.5 * L.shape[-1] * math.log(2 * math.pi)


def expected_stats(natparam: GaussianNatural) -> GaussianStats:
    r""":math:`E[t(x)] = (-\tfrac12 E[xx^\top], E[x]) = (-\tfrac12(\Sigma + \mu\mu^\top), \mu)`."""
    L = _chol_precision(natparam)
    mu = _mean(L, natparam.h)
    second = torch.cholesky_inverse(L) + mu[..., :, None] * mu[..., None, :]
    return GaussianStats(-0.5 * second, mu)


def sufficient_stats(x: Tensor) -> GaussianStats:
    r""":math:`t(x) = (-\tfrac12 x x^\top, x)` for ``x: (..., dim)``."""
    x = as_tensor("x", x)
    check_trailing("x", x, (None,), "(..., dim)")
    return GaussianStats(-0.5 * x[..., :, None] * x[..., None, :], x)


def sample(natparam: GaussianNatural, sample_shape: tuple = (),
           generator: torch.Generator | None = None) -> Tensor:
    r""":math:`x = J^{-1}h + L^{-\top}\varepsilon`, :math:`\varepsilon \sim N(0, I)`;
    returns ``(*sample_shape, *batch, dim)``."""
    L = _chol_precision(natparam)
    shape = tuple(sample_shape) + tuple(natparam.h.shape)
    eps = torch.randn(shape, generator=generator, dtype=L.dtype, device=L.device)
    noise = torch.linalg.solve_triangular(L.mT, eps[..., None], upper=True)[..., 0]
    return _mean(L, natparam.h) + noise


def log_prob(natparam: GaussianNatural, x: Tensor) -> Tensor:
    r""":math:`\log p(x) = \langle (J, h), t(x)\rangle - A`;
    ``x: (*sample, *batch, dim)`` -> ``(*sample, *batch)``."""
    stats = sufficient_stats(x)
    if x.shape[-1] != natparam.h.shape[-1]:
        raise ValueError(f"x must have shape (*sample, *batch, {natparam.h.shape[-1]}), got {tuple(x.shape)}")
    return pair(natparam, stats, EVENT_DIMS) - log_partition(natparam)


def kl(natparam_q: GaussianNatural, natparam_p: GaussianNatural) -> Tensor:
    r""":math:`KL(q\|p) = A(\eta_p) - A(\eta_q) - \langle \eta_p - \eta_q, E_q[t]\rangle`; ``(*batch)``."""
    _chol_precision(natparam_p, "natparam_p")
    _chol_precision(natparam_q, "natparam_q")
    check_same_shape("natparam_q.h", natparam_q.h, "natparam_p.h", natparam_p.h)
    return kl_from_parts(log_partition(natparam_q), log_partition(natparam_p), natparam_q, natparam_p,
                         expected_stats(natparam_q), EVENT_DIMS)
