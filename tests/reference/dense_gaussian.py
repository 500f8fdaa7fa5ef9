r"""Dense-Gaussian oracle for linear-Gaussian chains (one unbatched sequence, small T, float64).

The chain :math:`x_0 \sim N(m_0, P_0)`, :math:`x_t = A_t x_{t-1} + b_t + w_t`, :math:`w_t \sim N(0, Q_t)`
is written as one linear system :math:`M x = \tilde b + \tilde w` with :math:`M` block lower
bidiagonal (identity blocks on the diagonal, :math:`-A_t` below it), :math:`\tilde b = (m_0, b_1, \dots)`
and :math:`\tilde w \sim N(0, \mathrm{blockdiag}(P_0, Q_1, \dots))`. Hence
:math:`x \sim N(M^{-1}\tilde b,\ M^{-1} W M^{-\top})`, and with :math:`y_t = C_t x_t + d_t + v_t`
the pair :math:`(x, y)` is one joint Gaussian. Everything else is textbook conditioning.

Shapes: ``m0 (D,)``, ``P0 (D, D)``, ``A, Q (T-1, D, D)``, ``b (T-1, D)``, ``C (T, N, D)``,
``d (T, N)``, ``R (T, N, N)``, ``y (T, N)``, ``observed (T,) bool``, ``J (T, D, D)``, ``h (T, D)``.
"""
from __future__ import annotations

import torch
from torch.distributions import MultivariateNormal


def prior_moments(m0, P0, A, Q, b):
    """Mean ``(T*D,)`` and covariance ``(T*D, T*D)`` of the stacked chain x_{0:T-1}."""
    T, D = A.shape[0] + 1, m0.shape[0]
    M = torch.eye(T * D, dtype=m0.dtype)
    for t in range(1, T):
        M[t * D:(t + 1) * D, (t - 1) * D:t * D] = -A[t - 1]
    W = torch.block_diag(P0, *Q)
    b_tilde = torch.cat([m0, b.reshape(-1)])
    mean = torch.linalg.solve(M, b_tilde)
    Minv = torch.linalg.solve(M, torch.eye(T * D, dtype=m0.dtype))
    return mean, Minv @ W @ Minv.T


def joint_moments(m0, P0, A, Q, b, C, d, R):
    """Mean and covariance of the stacked ``(x_{0:T-1}, y_{0:T-1})``: ``(T*(D+N),)``, ``(T*(D+N),)*2``."""
    mx, Sx = prior_moments(m0, P0, A, Q, b)
    Cb = torch.block_diag(*C)
    my = Cb @ mx + d.reshape(-1)
    Sxy = Sx @ Cb.T
    Syy = Cb @ Sx @ Cb.T + torch.block_diag(*R)
    mean = torch.cat([mx, my])
    cov = torch.cat([torch.cat([Sx, Sxy], 1), torch.cat([Sxy.T, Syy], 1)], 0)
    return mean, cov


def _observed_index(T, N, observed):
    return torch.tensor([t * N + n for t in range(T) if observed[t] for n in range(N)], dtype=torch.long)


def log_marginal(m0, P0, A, Q, b, C, d, R, y, observed):
    """log p(y_t for observed t), marginalizing x: a scalar (0 if nothing is observed)."""
    T, N, D = y.shape[0], y.shape[1], m0.shape[0]
    mean, cov = joint_moments(m0, P0, A, Q, b, C, d, R)
    idx = T * D + _observed_index(T, N, observed)
    if idx.numel() == 0:
        return torch.zeros((), dtype=y.dtype)
    obs = y.reshape(-1)[idx - T * D]
    return MultivariateNormal(mean[idx], cov[idx][:, idx]).log_prob(obs)


def _blocks(mean, cov, T, D):
    """Per-step means ``(T, D)``, covariances ``(T, D, D)`` and lag-one cross covariances ``(T-1, D, D)``."""
    cov_t = torch.stack([cov[t * D:(t + 1) * D, t * D:(t + 1) * D] for t in range(T)])
    cross = [cov[t * D:(t + 1) * D, (t + 1) * D:(t + 2) * D] for t in range(T - 1)]
    cross = torch.stack(cross) if cross else torch.zeros(0, D, D, dtype=cov.dtype)
    return mean.reshape(T, D), cov_t, cross


def posterior(m0, P0, A, Q, b, C, d, R, y, observed):
    """p(x | observed y) by conditioning the joint: (means (T, D), covs (T, D, D),
    cross covs Cov(x_t, x_{t+1}) (T-1, D, D), full covariance (T*D, T*D))."""
    T, N, D = y.shape[0], y.shape[1], m0.shape[0]
    mean, cov = joint_moments(m0, P0, A, Q, b, C, d, R)
    ix = torch.arange(T * D)
    iy = T * D + _observed_index(T, N, observed)
    obs = y.reshape(-1)[iy - T * D]
    Sxy, Syy = cov[ix][:, iy], cov[iy][:, iy]
    gain = torch.linalg.solve(Syy, Sxy.T).T
    post_mean = mean[ix] + gain @ (obs - mean[iy])
    post_cov = cov[ix][:, ix] - gain @ Sxy.T
    return (*_blocks(post_mean, post_cov, T, D), post_cov)


def potentials_posterior(m0, P0, A, Q, b, J, h):
    r"""Dense information form: prior precision :math:`\Lambda_0 = \Sigma_0^{-1}`, posterior precision
    :math:`\Lambda = \Lambda_0 + \mathrm{blockdiag}(J)`, :math:`\eta = \Lambda_0 \mu_0 + h`;

    .. math:: \log Z = -\tfrac12 \log|\Sigma_0| - \tfrac12 \mu_0^\top \Lambda_0 \mu_0
              + \tfrac12 \eta^\top \Lambda^{-1} \eta - \tfrac12 \log|\Lambda|.

    Returns (log Z, means (T, D), covs (T, D, D), cross covs (T-1, D, D), full covariance).
    """
    T, D = J.shape[0], m0.shape[0]
    mu0, S0 = prior_moments(m0, P0, A, Q, b)
    L0 = torch.linalg.inv(S0)
    Lam = L0 + torch.block_diag(*J)
    eta = L0 @ mu0 + h.reshape(-1)
    cov = torch.linalg.inv(Lam)
    mean = cov @ eta
    log_z = 0.5 * (-torch.logdet(S0) - mu0 @ L0 @ mu0 + eta @ mean - torch.logdet(Lam))
    return (log_z, *_blocks(mean, cov, T, D), cov)


def potentials_posterior_cov_form(m0, P0, A, Q, b, J, h):
    r"""Same as :func:`potentials_posterior`, but without inverting the prior covariance (accurate when
    it is near-singular): with :math:`\Sigma_0 = L L^\top` and :math:`M = I + L^\top J L`,

    .. math:: \log Z = -\tfrac12 \mu_0^\top J \mu_0 + h^\top \mu_0 + \tfrac12 g^\top M^{-1} g
              - \tfrac12 \log|M|, \quad g = L^\top (h - J \mu_0),

    posterior covariance :math:`L M^{-1} L^\top`, mean :math:`\mu_0 + L M^{-1} g`
    (:math:`E_{N(\mu_0, \Sigma_0)}[\exp(-\tfrac12 x^\top J x + h^\top x)]` with :math:`x = \mu_0 + L z`).
    """
    T, D = J.shape[0], m0.shape[0]
    mu0, S0 = prior_moments(m0, P0, A, Q, b)
    L = torch.linalg.cholesky(S0)
    Jb, hv = torch.block_diag(*J), h.reshape(-1)
    M = torch.eye(T * D, dtype=m0.dtype) + L.T @ Jb @ L
    g = L.T @ (hv - Jb @ mu0)
    Minv_g = torch.linalg.solve(M, g)
    log_z = -0.5 * mu0 @ Jb @ mu0 + hv @ mu0 + 0.5 * g @ Minv_g - 0.5 * torch.logdet(M)
    cov = L @ torch.linalg.solve(M, L.T)
    return (log_z, *_blocks(mu0 + L @ Minv_g, cov, T, D), cov)
