r"""Matrix-normal-inverse-Wishart :math:`MNIW(M, K, \Psi, \nu)`, the conjugate prior on the weights and
noise :math:`(A, Q)` of a linear-Gaussian regression :math:`y = A x + \varepsilon`,
:math:`\varepsilon \sim N(0, Q)`, :math:`y \in \mathbb{R}^n`, :math:`x \in \mathbb{R}^m` — for LDS dynamics
:math:`x_t = A x_{t-1} + \varepsilon_t` take :math:`y = x_t`, :math:`x = x_{t-1}`, :math:`n = m = D`:

.. math::
    Q \sim IW(\Psi, \nu), \qquad A \mid Q \sim MN(M, Q, K^{-1}), \text{ i.e. }
    \mathrm{vec}(A) \sim N(\mathrm{vec}(M), K^{-1} \otimes Q),

    p(A \mid Q) = (2\pi)^{-nm/2} |K|^{n/2} |Q|^{-m/2}
    \exp\big(-\tfrac12 \mathrm{tr}[K (A - M)^\top Q^{-1} (A - M)]\big),

with ``vec`` stacking columns: row covariance Q ``(n, n)``, column covariance :math:`K^{-1}` ``(m, m)``
(K is the column precision; :math:`K = \lambda I`, M = 0 gives ridge regression), :math:`\nu > n - 1`,
:math:`\Psi, K \succ 0`. Sufficient statistics and natural parameters (pseudo-data):

.. math::
    t(A, Q) = \big(-\tfrac12 Q^{-1},\; Q^{-1}A,\; -\tfrac12 A^\top Q^{-1} A,\; -\tfrac12\log|Q|\big),

    \eta = \big(\Psi + M K M^\top,\; M K,\; K,\; \nu + n + m + 1\big),

    A(\eta) = \tfrac{\nu n}{2}\log 2 + \log\Gamma_n(\tfrac{\nu}{2}) - \tfrac{\nu}{2}\log|\Psi|
              + \tfrac{nm}{2}\log 2\pi - \tfrac{n}{2}\log|K|,

    E[Q^{-1}] = \nu\Psi^{-1}, \quad E[Q^{-1}A] = \nu\Psi^{-1}M, \quad
    E[A^\top Q^{-1}A] = \nu M^\top\Psi^{-1}M + n K^{-1}, \quad E[\log|Q|] = \log|\Psi| - n\log 2 - \psi_n(\nu/2).

Conjugacy:
:math:`\log N(y \mid Ax, Q) = \langle (yy^\top, yx^\top, xx^\top, 1), t(A, Q)\rangle - \tfrac{n}{2}\log 2\pi`,
so data add :func:`data_stats` ``= (sum y y^T, sum y x^T, sum x x^T, N)`` (for a chain, :func:`transition_stats`:
``(sum x_t x_t^T, sum x_t x_{t-1}^T, sum x_{t-1} x_{t-1}^T, T - 1)``) to :math:`\eta` (:func:`conjugate_update`);
the posterior mean of A is :math:`(MK + \sum y x^\top)(K + \sum x x^\top)^{-1}`.

Shapes: ``sum_yyT: (*batch, out, out)``, ``sum_yxT: (*batch, out, in)``, ``sum_xxT: (*batch, in, in)``,
``count: (*batch)``.
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

EVENT_DIMS = (2, 2, 2, 0)


class MNIWNatural(NamedTuple):
    r"""Natural parameters (or data statistics, same layout): ``sum_yyT`` = :math:`\Psi + MKM^\top`
    ``(*batch, out, out)``, ``sum_yxT`` = :math:`MK` ``(*batch, out, in)``, ``sum_xxT`` = :math:`K`
    ``(*batch, in, in)``, ``count`` = :math:`\nu + n + m + 1` ``(*batch)``."""
    sum_yyT: Tensor
    sum_yxT: Tensor
    sum_xxT: Tensor
    count: Tensor


class MNIWStats(NamedTuple):
    r"""Sufficient statistics paired field by field with :class:`MNIWNatural`: ``neg_half_Qinv`` =
    :math:`-\tfrac12 Q^{-1}`, ``Qinv_A`` = :math:`Q^{-1}A`,
    ``neg_half_AtQinvA`` = :math:`-\tfrac12 A^\top Q^{-1}A`,
    ``neg_half_logdetQ`` = :math:`-\tfrac12\log|Q|`."""
    neg_half_Qinv: Tensor
    Qinv_A: Tensor
    neg_half_AtQinvA: Tensor
    neg_half_logdetQ: Tensor


class MNIWParams(NamedTuple):
    """Standard parameters: ``loc: (*batch, out, in)`` M, ``col_precision: (*batch, in, in)`` K,
    ``scale: (*batch, out, out)`` Psi, ``df: (*batch)`` nu."""
    loc: Tensor
    col_precision: Tensor
    scale: Tensor
    df: Tensor


class MNIWExpectations(NamedTuple):
    r"""What an LDS needs: ``Qinv`` :math:`E[Q^{-1}]` ``(*batch, out, out)``, ``Qinv_A`` :math:`E[Q^{-1}A]`
    ``(*batch, out, in)``, ``At_Qinv_A`` :math:`E[A^\top Q^{-1} A]` ``(*batch, in, in)``,
    ``logdet_Q`` :math:`E[\log|Q|]` ``(*batch)``."""
    Qinv: Tensor
    Qinv_A: Tensor
    At_Qinv_A: Tensor
    logdet_Q: Tensor


class MNIWSample(NamedTuple):
    """A value of (A, Q): ``A: (..., out, in)``, ``Q: (..., out, out)``."""
    A: Tensor
    Q: Tensor


def _check_layout(natparam: MNIWNatural, name: str) -> MNIWNatural:
    yy = as_tensor(f"{name}.sum_yyT", natparam.sum_yyT)
    batch = check_trailing(f"{name}.sum_yyT", yy, (None, None), "(*batch, out, out)")
    n = yy.shape[-1]
    yx = as_tensor(f"{name}.sum_yxT", natparam.sum_yxT, yy)
    check_trailing(f"{name}.sum_yxT", yx, (n, None), f"(*batch, {n}, in)")
    check_batch(f"{name}.sum_yxT", yx, batch, 2, "(*batch, out, in)")
    m = yx.shape[-1]
    xx = as_tensor(f"{name}.sum_xxT", natparam.sum_xxT, yy)
    check_trailing(f"{name}.sum_xxT", xx, (m, m), f"(*batch, {m}, {m})")
    check_batch(f"{name}.sum_xxT", xx, batch, 2, "(*batch, in, in)")
    count = scalar_field(f"{name}.count", natparam.count, yy, batch)
    check_symmetric(f"{name}.sum_yyT", yy)
    check_symmetric(f"{name}.sum_xxT", xx)
    for field, value in (("sum_yxT", yx), ("count", count)):
        check_finite(f"{name}.{field}", value)
    return MNIWNatural(yy, yx, xx, count)


class MNIWFactors(NamedTuple):
    r"""What every computation on :math:`\eta` starts from: ``L_psi (*batch, out, out)`` the lower Cholesky
    factor of :math:`\Psi`, ``M (*batch, out, in)``, ``L_K (*batch, in, in)`` the lower Cholesky factor of K,
    ``nu (*batch)``. A coordinate-ascent loop computes them once per update (:func:`factors`) and reads
    :func:`expectations_from_factors` and :func:`log_partition_from_factors` from them."""
    L_psi: Tensor
    M: Tensor
    L_K: Tensor
    nu: Tensor


def factors(natparam: MNIWNatural, validate: bool = True, name: str = "natparam") -> MNIWFactors:
    r""":math:`K = \eta_3`, :math:`M = \eta_2 K^{-1}`, :math:`\Psi = \eta_1 - MKM^\top`,
    :math:`\nu = \eta_4 - n - m - 1` as Cholesky factors (``MNIWFactors``).

    ``validate=True`` (user input): shapes, dtypes, symmetry, finiteness, :math:`\nu > n - 1` and positive
    definiteness are checked, a ValueError naming the field otherwise. ``validate=False`` is for natural
    parameters a caller built itself from validated ones (a prior plus expected statistics, inside a
    coordinate-ascent sweep): only the two Cholesky factorizations run (``torch.linalg.cholesky`` still raises
    if a matrix is not positive definite)."""
    if not validate:
        yy, yx, xx, count = natparam
        n, m = yx.shape[-2:]
        L_K = torch.linalg.cholesky(xx)
        M = torch.cholesky_solve(yx.mT, L_K).mT
        return MNIWFactors(torch.linalg.cholesky(symmetrize(yy - yx @ M.mT)), M, L_K, count - n - m - 1)
    yy, yx, xx, count = _check_layout(natparam, name)
    n, m = yx.shape[-2:]
    L_K = check_positive_definite(f"{name}.sum_xxT (K)", xx)
    M = torch.cholesky_solve(yx.mT, L_K).mT
    nu = count - n - m - 1
    check_greater(f"{name}.count", nu, n - 1.0,
                  f"> 2 out + in = {2 * n + m} (nu = count - out - in - 1 > out - 1)")
    L_psi = check_positive_definite(f"{name}.sum_yyT - sum_yxT sum_xxT^-1 sum_yxT^T (Psi)",
                                    symmetrize(yy - yx @ M.mT))
    return MNIWFactors(L_psi, M, L_K, nu)


def natural_from_standard(loc: Tensor, col_precision: Tensor, scale: Tensor, df) -> MNIWNatural:
    r""":math:`\eta = (\Psi + MKM^\top, MK, K, \nu + n + m + 1)` from ``loc: (*batch, out, in)`` (M),
    ``col_precision: (*batch, in, in)`` (K), ``scale: (*batch, out, out)`` (Psi),
    ``df: (*batch)`` or a number (nu)."""
    scale = as_tensor("scale", scale)
    batch = check_trailing("scale", scale, (None, None), "(*batch, out, out)")
    n = scale.shape[-1]
    loc = as_tensor("loc", loc, scale)
    check_trailing("loc", loc, (n, None), f"(*batch, {n}, in)")
    check_batch("loc", loc, batch, 2, "(*batch, out, in)")
    m = loc.shape[-1]
    K = as_tensor("col_precision", col_precision, scale)
    check_trailing("col_precision", K, (m, m), f"(*batch, {m}, {m})")
    check_batch("col_precision", K, batch, 2, "(*batch, in, in)")
    df = scalar_field("df", df, scale, batch)
    check_finite("loc", loc)
    check_greater("df", df, n - 1.0, f"> out - 1 = {n - 1}")
    check_positive_definite("scale", scale)
    check_positive_definite("col_precision", K)
    MK = loc @ K
    return MNIWNatural(symmetrize(scale + MK @ loc.mT), MK, K, df + n + m + 1)


def standard_from_natural(natparam: MNIWNatural, validate: bool = True) -> MNIWParams:
    r""":math:`K = \eta_3`, :math:`M = \eta_2 K^{-1}`, :math:`\Psi = \eta_1 - MKM^\top`,
    :math:`\nu = \eta_4 - n - m - 1` as ``MNIWParams`` (``validate``: as :func:`factors`)."""
    L_psi, M, L_K, nu = factors(natparam, validate)
    return MNIWParams(M, L_K @ L_K.mT, L_psi @ L_psi.mT, nu)


def log_partition_from_factors(f: MNIWFactors) -> Tensor:
    r""":math:`A = \log Z_{IW}(\Psi, \nu) + \tfrac{nm}{2}\log 2\pi - \tfrac{n}{2}\log|K|` from :func:`factors`;
    returns ``(*batch)``."""
    n, m = f.M.shape[-2:]
    return iw_log_normalizer(f.L_psi, f.nu) + 0.5 * n * m * math.log(2 * math.pi) - 0.5 * n * logdet_chol(f.L_K)


def log_partition(natparam: MNIWNatural, validate: bool = True) -> Tensor:
    r""":math:`A = \log Z_{IW}(\Psi, \nu) + \tfrac{nm}{2}\log 2\pi - \tfrac{n}{2}\log|K|`; returns ``(*batch)``
    (``validate``: as :func:`factors`)."""
    return log_partition_from_factors(factors(natparam, validate))


def expectations_from_factors(f: MNIWFactors) -> MNIWExpectations:
    r""":math:`E[Q^{-1}] = \nu\Psi^{-1}`, :math:`E[Q^{-1}A] = E[Q^{-1}]M`,
    :math:`E[A^\top Q^{-1}A] = M^\top E[Q^{-1}]M + nK^{-1}`, :math:`E[\log|Q|]` from :func:`factors`."""
    Qinv, logdet = iw_expectations(f.L_psi, f.nu)
    Qinv_A = Qinv @ f.M
    At_Qinv_A = symmetrize(f.M.mT @ Qinv_A) + f.M.shape[-2] * torch.cholesky_inverse(f.L_K)
    return MNIWExpectations(Qinv, Qinv_A, At_Qinv_A, logdet)


def expectations(natparam: MNIWNatural, validate: bool = True) -> MNIWExpectations:
    r""":math:`E[Q^{-1}], E[Q^{-1}A], E[A^\top Q^{-1}A], E[\log|Q|]` in closed form (see the module docstring;
    ``validate``: as :func:`factors`)."""
    return expectations_from_factors(factors(natparam, validate))


def expected_stats(natparam: MNIWNatural) -> MNIWStats:
    r""":math:`E[t] = \nabla A = (-\tfrac12 E[Q^{-1}], E[Q^{-1}A], -\tfrac12 E[A^\top Q^{-1}A],
    -\tfrac12 E[\log|Q|])`."""
    e = expectations(natparam)
    return MNIWStats(-0.5 * e.Qinv, e.Qinv_A, -0.5 * e.At_Qinv_A, -0.5 * e.logdet_Q)


def sufficient_stats(value: MNIWSample) -> MNIWStats:
    r""":math:`t(A, Q)` for ``value = (A: (..., out, in), Q: (..., out, out))``."""
    Q = as_tensor("value.Q", value.Q)
    check_trailing("value.Q", Q, (None, None), "(..., out, out)")
    A = as_tensor("value.A", value.A, Q)
    check_trailing("value.A", A, (Q.shape[-1], None), f"(..., {Q.shape[-1]}, in)")
    L = check_positive_definite("value.Q", Q)
    Qinv_A = torch.cholesky_solve(A, L)
    return MNIWStats(-0.5 * torch.cholesky_inverse(L), Qinv_A, -0.5 * A.mT @ Qinv_A, -0.5 * logdet_chol(L))


def sample(natparam: MNIWNatural, sample_shape: tuple = (),
           generator: torch.Generator | None = None) -> MNIWSample:
    r""":math:`Q \sim IW(\Psi, \nu)`, :math:`A = M + \mathrm{chol}(Q)\, Z\, L_K^{-1}` with :math:`K = L_KL_K^\top`,
    :math:`Z_{ij} \sim N(0, 1)`; returns ``A: (*sample_shape, *batch, out, in)``,
    ``Q: (*sample_shape, *batch, out, out)``."""
    L_psi, M, L_K, nu = factors(natparam)
    Q = sample_inverse_wishart(L_psi, nu, tuple(sample_shape), generator)
    Z = torch.randn(Q.shape[:-2] + M.shape[-2:], generator=generator, dtype=M.dtype, device=M.device)
    L_K = L_K.expand(Z.shape[:-2] + L_K.shape[-2:])
    noise = torch.linalg.solve_triangular(L_K, torch.linalg.cholesky(Q) @ Z, upper=False, left=False)
    return MNIWSample(M + noise, Q)


def log_prob(natparam: MNIWNatural, value: MNIWSample) -> Tensor:
    r""":math:`\log p(A, Q) = \langle\eta, t(A, Q)\rangle - A(\eta)`; ``(*sample, *batch)``."""
    stats = sufficient_stats(value)
    return pair(_check_layout(natparam, "natparam"), stats, EVENT_DIMS) - log_partition(natparam)


def kl(natparam_q: MNIWNatural, natparam_p: MNIWNatural) -> Tensor:
    r""":math:`KL(q\|p) = A(\eta_p) - A(\eta_q) - \langle\eta_p - \eta_q, E_q[t]\rangle`; ``(*batch)``."""
    q, p = _check_layout(natparam_q, "natparam_q"), _check_layout(natparam_p, "natparam_p")
    check_same_shape("natparam_q.sum_yxT", q.sum_yxT, "natparam_p.sum_yxT", p.sum_yxT)
    return kl_from_parts(log_partition(q), log_partition(p), q, p, expected_stats(q), EVENT_DIMS)


def data_stats(inputs: Tensor, outputs: Tensor, weights: Tensor | None = None) -> MNIWNatural:
    r"""Regression statistics of ``inputs: (*batch, num, in)`` (x), ``outputs: (*batch, num, out)`` (y),
    optional ``weights: (*batch, num)``, summed over ``num``:
    :math:`(\sum w yy^\top, \sum w yx^\top, \sum w xx^\top, \sum w)`."""
    x = as_tensor("inputs", inputs)
    y = as_tensor("outputs", outputs, x)
    check_trailing("inputs", x, (None, None), "(*batch, num, in)")
    check_trailing("outputs", y, (x.shape[-2], None), f"(*batch, {x.shape[-2]}, out)")
    check_batch("outputs", y, x.shape[:-2], 2, "(*batch, num, out)")
    check_finite("inputs", x)
    check_finite("outputs", y)
    if weights is None:
        count = torch.full(x.shape[:-2], float(x.shape[-2]), dtype=x.dtype, device=x.device)
        return MNIWNatural(y.mT @ y, y.mT @ x, x.mT @ x, count)
    w = check_weights(weights, x)
    wy = w[..., None] * y
    return MNIWNatural(wy.mT @ y, wy.mT @ x, (w[..., None] * x).mT @ x, w.sum(-1))


def transition_stats(states: Tensor) -> MNIWNatural:
    r"""LDS transition statistics of a chain ``states: (*batch, time, dim)``:
    :math:`(\sum_{t\ge1} x_tx_t^\top, \sum_{t\ge1} x_tx_{t-1}^\top, \sum_{t\ge1} x_{t-1}x_{t-1}^\top, T - 1)`."""
    states = as_tensor("states", states)
    check_trailing("states", states, (None, None), "(*batch, time, dim)")
    return data_stats(states[..., :-1, :], states[..., 1:, :])


def expected_transition_stats(second_moments: Tensor, cross_moments: Tensor) -> MNIWNatural:
    r"""Expected transition statistics under a smoothed chain posterior, from
    ``second_moments: (*batch, time, dim, dim)`` :math:`E[x_tx_t^\top]` and
    ``cross_moments: (*batch, time - 1, dim, dim)`` :math:`E[x_{t+1}x_t^\top]`:
    :math:`(\sum_{t\ge1} E[x_tx_t^\top], \sum_t E[x_{t+1}x_t^\top], \sum_{t\le T-2} E[x_tx_t^\top], T - 1)`."""
    xx = as_tensor("second_moments", second_moments)
    check_trailing("second_moments", xx, (None, None, None), "(*batch, time, dim, dim)")
    T, D = xx.shape[-3], xx.shape[-1]
    check_trailing("second_moments", xx, (T, D, D), f"(*batch, time, {D}, {D})")
    cross = as_tensor("cross_moments", cross_moments, xx)
    check_trailing("cross_moments", cross, (T - 1, D, D), f"(*batch, {T - 1}, {D}, {D})")
    check_batch("cross_moments", cross, xx.shape[:-3], 3, "(*batch, time - 1, dim, dim)")
    count = torch.full(xx.shape[:-3], T - 1.0, dtype=xx.dtype, device=xx.device)
    return MNIWNatural(xx[..., 1:, :, :].sum(-3), cross.sum(-3), xx[..., :-1, :, :].sum(-3), count)


def conjugate_update(natparam: MNIWNatural, stats: MNIWNatural, validate: bool = True) -> MNIWNatural:
    r"""Posterior natural parameters :math:`\eta + s` for regression / transition statistics ``stats``.
    ``validate=True`` checks both layouts (user input); ``validate=False`` (inside a sweep, a validated prior plus
    statistics the caller computed) checks only that the fields' shapes match."""
    if validate:
        natparam, stats = _check_layout(natparam, "natparam"), _check_layout(stats, "stats")
    return add_fieldwise(natparam, stats)
