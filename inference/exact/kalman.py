r"""Exact Kalman kernels for linear-Gaussian chains (LDS): public API.

Core (information form, node potentials; see :mod:`.kalman_info`): :class:`LDSPrior`,
:func:`info_filter`, :func:`info_smoother`, :func:`info_sample`. This module adds control inputs
(:func:`with_inputs`) and the observation form

.. math:: y_t \sim N(C_t x_t + d_t, R_t), \qquad t = 0..T-1,

converted to potentials by :func:`observation_potentials`:
:math:`J_t = C_t^\top R_t^{-1} C_t`, :math:`h_t = C_t^\top R_t^{-1}(y_t - d_t)` and
:math:`c_t = -\tfrac12 (y_t - d_t)^\top R_t^{-1} (y_t - d_t) - \tfrac12 \log|2\pi R_t|`, so that
:math:`\log p(y_{0:T-1}) = \log Z + \sum_t c_t`. A step with ``mask[..., t] = False`` is unobserved:
:math:`J_t = 0, h_t = 0, c_t = 0` (its ``y`` may hold NaN). :func:`log_likelihood` (and the
``log_normalizer`` of :func:`kalman_filter` / :func:`kalman_smoother`) evaluates the same quantity in
innovation form, :math:`\sum_t \log N(y_t; C_t m_{t|t-1} + d_t, C_t P_{t|t-1} C_t^\top + R_t)`,
because :math:`\log Z` and :math:`\sum_t c_t` are both of order :math:`\sum_t y_t^\top R^{-1} y_t` and
cancel: in float32 their sum loses digits on long sequences with large :math:`|y|`.

Time-varying emissions are chosen by the keyword ``time_varying`` (never guessed from ndim): when
False (default) ``emission (..., N, D)``, ``obs_bias (..., N)``, ``obs_cov (..., N, N)`` hold for
all steps; when True they carry a time dim: ``(..., time, N, D)``, ``(..., time, N)``,
``(..., time, N, N)``. Batch dims broadcast; the potentials' ``J`` keeps the (small) batch of the
emission parameters unless a mask makes it depend on the data, which keeps the filter cheap.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch

from ppl.checks import broadcast_batch, check_mask, check_positive_definite, check_tensor, check_trailing

from .kalman_scan import column_layout, from_columns, symmetrize, to_columns, to_matrices
from .kalman_info import (InfoFilterResult, LDSPrior, SmootherResult, filter_result, info_filter, info_sample,
                          info_smoother, matrices_out, prepare, run_filter, sample, smooth)
from .ops import kalman_log_normalizer64 as info_log_normalizer64

__all__ = ["LDSPrior", "InfoFilterResult", "SmootherResult", "Potentials", "with_inputs", "info_filter",
           "info_log_normalizer64", "info_smoother", "info_sample", "observation_potentials", "log_likelihood",
           "kalman_filter", "kalman_smoother", "sample_posterior"]


class Potentials(NamedTuple):
    """J: ``(..., time, D, D)``; h: ``(..., time, D)``; const: ``(...)`` = sum_t c_t."""

    J: torch.Tensor
    h: torch.Tensor
    const: torch.Tensor


def with_inputs(prior: LDSPrior, input_matrix: torch.Tensor, inputs: torch.Tensor) -> LDSPrior:
    r"""Add control inputs to a prior: :math:`b_t \mathrel{+}= B u_t` for t = 1..T-1.

    ``u_0`` is ignored: the initial state has its own distribution ``N(initial_loc, initial_cov)``
    (the same convention as ``ppl.gaussian_chain``).

    Args:
        prior: :class:`LDSPrior` over D-dimensional states.
        input_matrix: B, ``(..., D, U)``.
        inputs: u, ``(..., time, U)``.
    Returns:
        the prior with ``offsets (..., time-1, D)`` (added to existing offsets, if any).
    """
    if not isinstance(prior, LDSPrior):
        raise ValueError(f"prior must be an LDSPrior, got {type(prior).__name__}")
    D = prior.initial_loc.shape[-1]
    B = check_tensor("input_matrix", input_matrix)
    u = check_tensor("inputs", inputs, B)
    check_trailing("input_matrix", B, (D, None), f"(..., {D}, input_dim)")
    U = B.shape[-1]
    check_trailing("inputs", u, (None, U), f"(..., time, {U})")
    if u.shape[-2] < 1:
        raise ValueError(f"inputs must have at least one time step, got shape {tuple(u.shape)}")
    offsets = (B.unsqueeze(-3) @ u[..., 1:, :].unsqueeze(-1)).squeeze(-1)
    if prior.offsets is not None:
        broadcast_batch(offsets=prior.offsets.shape, input_offsets=offsets.shape)
        offsets = prior.offsets + offsets
    return prior._replace(offsets=offsets)


def _check_emission(emission, obs_bias, obs_cov, y, time_varying: bool):
    """Validate shapes; return (C, d or None, chol R), each with a time dim (size T or 1)."""
    T, N = y.shape[-2], y.shape[-1]
    C = check_tensor("emission", emission, y)
    R = check_tensor("obs_cov", obs_cov, y)
    if not isinstance(time_varying, bool):
        raise ValueError(f"time_varying must be a bool, got {time_varying!r}")
    lead, spelled = ((T,), f"time={T}, ") if time_varying else ((), "")
    check_trailing("emission", C, lead + (N, None),
                   f"(..., {spelled}{N}, state_dim) (time_varying={time_varying})")
    check_trailing("obs_cov", R, lead + (N, N), f"(..., {spelled}{N}, {N}) (time_varying={time_varying})")
    L = check_positive_definite("obs_cov", R)
    d = None
    if obs_bias is not None:
        d = check_tensor("obs_bias", obs_bias, y)
        check_trailing("obs_bias", d, lead + (N,), f"(..., {spelled}{N}) (time_varying={time_varying})")
    if not time_varying:
        C, L = C.unsqueeze(-3), L.unsqueeze(-3)
        d = None if d is None else d.unsqueeze(-2)
    return C, d, L


def _observed_y(y, mask):
    """Check ``y (..., time, N)`` and ``mask``; return (y with unobserved entries zeroed, mask or None)."""
    if not isinstance(y, torch.Tensor) or not y.is_floating_point() or y.dim() < 2:
        raise ValueError(f"y must be a floating tensor of shape (..., time, obs_dim), got "
                         f"{tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__}")
    if mask is None:
        check_tensor("y", y)
        return y, None
    mask = check_mask(mask, y.shape[:-1], y.device)
    bad = ~torch.isfinite(y) & mask.unsqueeze(-1)
    if bool(bad.any()):
        raise ValueError(f"y has NaN or inf at {int(bad.any(-1).sum())} observed steps (mask True); "
                         f"y shape {tuple(y.shape)}, mask shape {tuple(mask.shape)}")
    return torch.where(mask.unsqueeze(-1), y, torch.zeros((), dtype=y.dtype, device=y.device)), mask


def observation_potentials(emission: torch.Tensor, obs_bias: Optional[torch.Tensor], obs_cov: torch.Tensor,
                           y: torch.Tensor, mask: Optional[torch.Tensor] = None, *,
                           time_varying: bool = False) -> Potentials:
    r"""Gaussian potentials on x_t from observations :math:`y_t \sim N(C_t x_t + d_t, R_t)`.

    Args:
        emission: C, ``(..., obs_dim, state_dim)`` or ``(..., time, obs_dim, state_dim)`` if ``time_varying``.
        obs_bias: d, ``(..., obs_dim)`` / ``(..., time, obs_dim)``, or None (zero).
        obs_cov: R, ``(..., obs_dim, obs_dim)`` / ``(..., time, obs_dim, obs_dim)``, positive definite.
        y: ``(..., time, obs_dim)`` observations.
        mask: ``(..., time)`` bool, True = observed; None = all observed.
        time_varying: whether C, d, R carry a time dim (explicit; never inferred).
    Returns:
        :class:`Potentials` ``J (..., time, state_dim, state_dim)``, ``h (..., time, state_dim)``,
        ``const (...)`` with :math:`J_t = C^\top R^{-1} C`, :math:`h_t = C^\top R^{-1}(y_t - d_t)`,
        const :math:`= \sum_t -\tfrac12 \|L^{-1}(y_t - d_t)\|^2 - \tfrac12 \log|2\pi R_t|` (R = L L^T).
    """
    y, mask = _observed_y(y, mask)
    return _potentials(*_check_emission(emission, obs_bias, obs_cov, y, time_varying), y, mask)


def _potentials(C, d, L, y, mask) -> Potentials:
    """:func:`observation_potentials` on checked inputs (``C, d, L = chol R`` with a time dim)."""
    T, N, D = y.shape[-2], y.shape[-1], C.shape[-1]
    W = torch.linalg.solve_triangular(L, C, upper=False)
    resid = y if d is None else y - d
    r = _columns_apply(_lower_solve, L, resid)
    h = _columns_apply(torch.matmul, W.mT, r)
    J = (W.mT @ W).expand(W.shape[:-3] + (T, D, D))
    logdet = L.diagonal(dim1=-2, dim2=-1).log().sum(-1)
    c = -0.5 * (r * r).sum(-1) - logdet - 0.5 * N * math.log(2 * math.pi)
    if mask is not None:
        keep = mask.to(y.dtype)
        J, h, c = J * keep[..., None, None], h * keep.unsqueeze(-1), c * keep
    return Potentials(J, h, c.sum(-1))


def _lower_solve(L: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """``L^{-1} B`` for lower-triangular ``L``."""
    return torch.linalg.solve_triangular(L, B, upper=False)


def _columns_apply(fn, mats: torch.Tensor, vecs: torch.Tensor) -> torch.Tensor:
    """``fn(mats, vecs)`` for ``mats (..., time|1, M, N)`` and ``vecs (..., time, N)`` done as one
    matrix-matrix op per distinct matrix (column layout): returns ``(..., time, M)``."""
    lay = column_layout(torch.broadcast_shapes(vecs.shape[:-1], mats.shape[:-2]), mats.shape[:-2])
    return from_columns(lay, fn(to_matrices(lay, mats, 2), to_columns(lay, vecs, 1)), 1)


def _innovation_log_lik(f, C, d, L, y, mask) -> torch.Tensor:
    r"""log p(y) in innovation form, :math:`\sum_t \log N(y_t; C m_{t|t-1} + d, C P_{t|t-1} C^\top + R)`:
    equal to log Z + sum_t c_t, without the cancellation of the two large terms in float32."""
    lay = f.chain.layout
    pred_mean = from_columns(lay, f.pred_mean, 2)
    P = matrices_out(lay, f.pred_chol @ f.pred_chol.mT)
    L_S = torch.linalg.cholesky(symmetrize(C @ P @ C.mT + L @ L.mT))
    e = y - _columns_apply(torch.matmul, C, pred_mean) - (0 if d is None else d)
    z = _columns_apply(_lower_solve, L_S, e)
    ll = (-0.5 * (z * z).sum(-1) - L_S.diagonal(dim1=-2, dim2=-1).log().sum(-1)
          - 0.5 * y.shape[-1] * math.log(2 * math.pi))
    if mask is not None:
        ll = ll * mask.to(y.dtype)
    return ll.sum(-1, dtype=torch.float64).to(y.dtype)  # float64 accumulator over the T steps


def _observe(prior, emission, obs_bias, obs_cov, y, mask, time_varying, with_log_lik=True):
    """Filter on the observations' potentials; returns (the filtered chain, log p(y) or None)."""
    y, mask = _observed_y(y, mask)
    C, d, L = _check_emission(emission, obs_bias, obs_cov, y, time_varying)
    if not isinstance(prior, LDSPrior):
        raise ValueError(f"prior must be an LDSPrior, got {type(prior).__name__}")
    D = prior.initial_loc.shape[-1]
    if C.shape[-1] != D:
        raise ValueError(f"emission must have shape (..., obs_dim, state_dim={D}) (state_dim from "
                         f"prior.initial_loc), got {tuple(emission.shape)}")
    pot = _potentials(C, d, L, y, mask)
    f = run_filter(prepare(prior, pot.J, pot.h, check_j=False))
    return f, (_innovation_log_lik(f, C, d, L, y, mask) if with_log_lik else None)


def log_likelihood(prior: LDSPrior, emission: torch.Tensor, obs_bias: Optional[torch.Tensor],
                   obs_cov: torch.Tensor, y: torch.Tensor, mask: Optional[torch.Tensor] = None, *,
                   time_varying: bool = False) -> torch.Tensor:
    r"""Marginal log-likelihood :math:`\log p(y_{0:T-1}) = \log \int p(x) \prod_t p(y_t \mid x_t) dx`
    (masked steps left out). Args as :func:`observation_potentials` plus the :class:`LDSPrior`.
    Returns ``(...)``; differentiable w.r.t. every input."""
    return _observe(prior, emission, obs_bias, obs_cov, y, mask, time_varying)[1]


def kalman_filter(prior: LDSPrior, emission: torch.Tensor, obs_bias: Optional[torch.Tensor],
                  obs_cov: torch.Tensor, y: torch.Tensor, mask: Optional[torch.Tensor] = None, *,
                  time_varying: bool = False) -> InfoFilterResult:
    r"""Kalman filter: ``filtered_mean (..., time, D)``, ``filtered_cov (..., time, D, D)`` of
    :math:`p(x_t \mid y_{0:t})` and ``log_normalizer (...)`` :math:`= \log p(y_{0:T-1})`.
    Args as :func:`log_likelihood`."""
    f, log_lik = _observe(prior, emission, obs_bias, obs_cov, y, mask, time_varying)
    return filter_result(f)._replace(log_normalizer=log_lik)


def kalman_smoother(prior: LDSPrior, emission: torch.Tensor, obs_bias: Optional[torch.Tensor],
                    obs_cov: torch.Tensor, y: torch.Tensor, mask: Optional[torch.Tensor] = None, *,
                    time_varying: bool = False) -> SmootherResult:
    r"""RTS smoother: ``mean (..., time, D)``, ``cov (..., time, D, D)`` of :math:`p(x_t \mid y_{0:T-1})`,
    ``cross_cov (..., time-1, D, D)`` = Cov(x_t, x_{t+1} | y), ``log_normalizer (...)`` = log p(y).
    Args as :func:`log_likelihood`."""
    f, log_lik = _observe(prior, emission, obs_bias, obs_cov, y, mask, time_varying)
    return smooth(f)._replace(log_normalizer=log_lik)


def sample_posterior(prior: LDSPrior, emission: torch.Tensor, obs_bias: Optional[torch.Tensor],
                     obs_cov: torch.Tensor, y: torch.Tensor, mask: Optional[torch.Tensor] = None,
                     sample_shape=(), generator: Optional[torch.Generator] = None, *,
                     time_varying: bool = False) -> torch.Tensor:
    r"""Exact, reparameterized samples of :math:`p(x_{0:T-1} \mid y_{0:T-1})`:
    ``(*sample_shape, ..., time, D)``. Args as :func:`log_likelihood` plus those of :func:`info_sample`."""
    f, _ = _observe(prior, emission, obs_bias, obs_cov, y, mask, time_varying, with_log_lik=False)
    return sample(f, sample_shape, generator)
