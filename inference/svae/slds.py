r"""Structured mean field q(z) q(x) for a switching LDS under recognition potentials.

Model: z a Markov chain over K states, x_0 ~ N(m_0, P_0), x_t | x_{t-1}, z_t ~ N(A_{z_t} x_{t-1}, Q_{z_t}),
and Gaussian potentials psi_t(x_t) from a recognition network. Coordinate updates:

* q(x): with r_{tk} = q(z_t = k), the expected transition factor
  :math:`\mathbb{E}_{q(z)}\log N(x_t|A x_{t-1},Q)` has precision blocks
  :math:`P_t=\sum_k r_{tk}Q_k^{-1}`, :math:`B_t=\sum_k r_{tk}Q_k^{-1}A_k`, :math:`C_t=\sum_k r_{tk}A_k^\top Q_k^{-1}A_k`.
  It equals an LDS factor with :math:`\tilde Q_t = P_t^{-1}`, :math:`\tilde A_t = \tilde Q_t B_t`, times the extra
  node potential :math:`E_t = C_t - B_t^\top P_t^{-1} B_t \succeq 0` on :math:`x_{t-1}` and a constant
  :math:`c_t = -\tfrac12\sum_k r_{tk}\log|2\pi Q_k| + \tfrac12\log|2\pi\tilde Q_t|`. Kalman smoothing gives q(x).
* q(z): an HMM with :math:`L_{tk} = \mathbb{E}_{q(x)}\log N(x_t | A_k x_{t-1}, Q_k)` (t >= 1, L_{0k} = 0);
  forward-backward gives q(z).

With r^{old} the q(z) used to build q(x) and :math:`Z_x`, :math:`Z_z` the two log normalizers,
:math:`\mathrm{KL}(q(z)q(x)\,\|\,p(z,x)) = -\log Z_z + \sum_{t,k} r^{old}_{tk} L_{tk} - \sum_t c_t
+ \mathbb{E}_q[\log\psi(x)] - \log Z_x`.
"""
from __future__ import annotations

import math

import torch

from ppl.expfam.mniw import MNIWExpectations
from ppl.handlers import DiscreteTable

from ..exact import tables as kernels
from ..exact.kalman_info import LDSPrior, filter_result, prepare, run_filter, sample, smooth
from ..vi.gaussian_chain import ChainLocal
from ..vi.slds import transition_table
from .local import Local, expected_log_potential


def _expected_dynamics(r: torch.Tensor, A: torch.Tensor, Q_inv: torch.Tensor, log_det_2piQ: torch.Tensor):
    """For r ``(..., T-1, K)``: LDS dynamics/noise ``(..., T-1, D, D)``, extra potential E, constants c ``(..., T-1)``."""
    P = torch.einsum("...k,kij->...ij", r, Q_inv)
    B = torch.einsum("...k,kij->...ij", r, Q_inv @ A)
    C = torch.einsum("...k,kij->...ij", r, A.mT @ Q_inv @ A)
    L = torch.linalg.cholesky(P)
    Q_tilde = torch.cholesky_inverse(L)
    Q_tilde = 0.5 * (Q_tilde + Q_tilde.mT)
    A_tilde = Q_tilde @ B
    E = C - B.mT @ A_tilde
    E = 0.5 * (E + E.mT)
    D = A.shape[-1]
    log_det_2piQt = D * math.log(2 * math.pi) - 2 * L.diagonal(dim1=-2, dim2=-1).log().sum(-1)
    c = -0.5 * (r * log_det_2piQ).sum(-1) + 0.5 * log_det_2piQt
    return A_tilde, Q_tilde, E, c


def _expected_log_lik(A, Q_inv, log_det_2piQ, mean, cov, cross):
    """L ``(..., T-1, K)``: E_q log N(x_t | A_k x_{t-1}, Q_k) from smoothed moments (cross = Cov(x_{t-1}, x_t)): the vi
    backend's ``slds.transition_table`` at the point values (E[Q^-1] = Q^-1, E[Q^-1 A] = Q^-1 A, ...)."""
    D = A.shape[-1]
    QiA = Q_inv @ A
    point = MNIWExpectations(Q_inv, QiA, A.mT @ QiA, log_det_2piQ - D * math.log(2 * math.pi))
    return transition_table(point, ChainLocal(mean, cov, cross.mT, None))


def slds_local(log_init: torch.Tensor, log_trans: torch.Tensor, A: torch.Tensor, Q: torch.Tensor,
               initial_loc: torch.Tensor, initial_cov: torch.Tensor, J: torch.Tensor, h: torch.Tensor,
               num_iters: int = 4, generator=None) -> Local:
    """Structured mean field for a switching LDS.

    Shapes: log_init ``(..., K)``; log_trans ``(..., K, K)``; A, Q ``(K, D, D)``; initial_loc ``(..., D)``,
    initial_cov ``(..., D, D)``; J ``(..., T, D, D)``; h ``(..., T, D)``. Returns Local with q(z) marginals
    ``probs (..., T, K)``.
    """
    K = A.shape[0]
    T = h.shape[-2]
    Q_inv = torch.cholesky_inverse(torch.linalg.cholesky(Q))
    log_det_2piQ = torch.linalg.slogdet(2 * math.pi * Q)[1]
    r = h.new_full(h.shape[:-2] + (T - 1, K), 1.0 / K)
    for _ in range(max(1, num_iters)):
        A_t, Q_t, E, c = _expected_dynamics(r, A, Q_inv, log_det_2piQ)
        J_total = J + torch.cat([E, torch.zeros_like(J[..., :1, :, :])], -3)
        prior = LDSPrior(initial_loc, initial_cov, A_t, Q_t, None, time_varying=True)
        f = run_filter(prepare(prior, J_total, h, check_j=False))
        sm = smooth(f)
        L = _expected_log_lik(A, Q_inv, log_det_2piQ, sm.mean, sm.cov, sm.cross_cov)
        table = DiscreteTable(log_init, log_trans, torch.cat([torch.zeros_like(L[..., :1, :]), L], -2), False)
        hmm_post = kernels.discrete_posterior(table)
        r_old, r = r, hmm_post.marginals[..., 1:, :]
    log_zx = filter_result(f).log_normalizer
    kl = (-hmm_post.log_normalizer.sum() + (r_old * L).sum() - c.sum()
          + expected_log_potential(J, h, sm.mean, sm.cov).sum() - log_zx.sum())
    x = sample(f, (), generator)
    return Local(x, kl, sm.mean, hmm_post.marginals)


def slds_table(log_init, log_trans, A, Q, mean, cov, cross) -> DiscreteTable:
    """The q(z) HMM table at given q(x) moments (for Viterbi decoding after fitting)."""
    Q_inv = torch.cholesky_inverse(torch.linalg.cholesky(Q))
    log_det_2piQ = torch.linalg.slogdet(2 * math.pi * Q)[1]
    L = _expected_log_lik(A, Q_inv, log_det_2piQ, mean, cov, cross)
    return DiscreteTable(log_init, log_trans, torch.cat([torch.zeros_like(L[..., :1, :]), L], -2), False)
