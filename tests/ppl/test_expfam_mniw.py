"""Matrix-normal-inverse-Wishart (ppl.expfam.mniw): the prior on LDS dynamics (A, Q).

Oracles: autograd of the log partition; scipy.stats (matrix_normal x invwishart log densities);
Monte Carlo with fixed seeds (tolerance 5 standard errors); scikit-learn Ridge (posterior mean of A);
the textbook Bayesian multivariate regression update; the NIW as the one-column MNIW; a 2-D quadrature
of the evidence in 1-D. Non-square A (out = 3, in = 2) catches transposes. float64 unless said otherwise.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import special, stats as sps
from sklearn.linear_model import Ridge

from ppl.expfam import mniw, niw
from ppl.expfam._common import pair
from tests.reference.random_inputs import mc_close, random_mniw, spd

DT = torch.float64


def test_gradient_of_log_partition_is_expected_stats():
    nat = random_mniw(torch.Generator().manual_seed(1), 2, 2)
    leaves = [f.detach().clone().requires_grad_(True) for f in nat]
    grad = torch.autograd.grad(mniw.log_partition(mniw.MNIWNatural(*leaves)).sum(), leaves)
    for name, gr, es in zip(mniw.MNIWStats._fields, grad, mniw.expected_stats(nat)):
        assert torch.allclose(gr, es, atol=1e-10), name                               # tol 1e-10


def test_roundtrip():
    g = torch.Generator().manual_seed(2)
    M, K, Psi = torch.randn(4, 3, 2, generator=g, dtype=DT), spd(g, 4, dim=2), spd(g, 4, dim=3)
    std = mniw.standard_from_natural(mniw.natural_from_standard(M, K, Psi, 6.0))
    assert torch.allclose(std.loc, M, atol=1e-12) and torch.allclose(std.col_precision, K, atol=1e-12)
    assert torch.allclose(std.scale, Psi, atol=1e-12)
    assert torch.allclose(std.df, torch.full((4,), 6.0, dtype=DT), atol=1e-12)


def test_log_prob_against_scipy():
    g = torch.Generator().manual_seed(3)
    nat = random_mniw(g, 2)
    std = mniw.standard_from_natural(nat)
    value = mniw.sample(nat, (3,), g)
    ours = mniw.log_prob(nat, value)
    for s in range(3):
        for b in range(2):
            A, Q = value.A[s, b].numpy(), value.Q[s, b].numpy()
            colcov = torch.linalg.inv(std.col_precision[b]).numpy()
            ref = (sps.matrix_normal.logpdf(A, mean=std.loc[b].numpy(), rowcov=Q, colcov=colcov)
                   + sps.invwishart.logpdf(Q, df=float(std.df[b]), scale=std.scale[b].numpy()))
            assert abs(float(ours[s, b]) - ref) < 1e-9                                 # peer, tol 1e-9


def test_expected_stats_and_kl_against_monte_carlo():
    g = torch.Generator().manual_seed(4)
    q, p = random_mniw(g, 2), random_mniw(g, 2)
    value = mniw.sample(q, (40000,), g)
    for name, mc, exact in zip(mniw.MNIWStats._fields, mniw.sufficient_stats(value), mniw.expected_stats(q)):
        assert mc_close(mc, exact), name                                              # 5 s.e.
    assert mc_close(mniw.log_prob(q, value) - mniw.log_prob(p, value), mniw.kl(q, p))
    assert torch.allclose(mniw.kl(q, q), torch.zeros(2, dtype=DT), atol=1e-10)
    # the expected LDS log-likelihood is linear in the transition statistics (what the SVAE uses)
    states = torch.randn(2, 6, 3, generator=g, dtype=DT)
    inputs, outputs = states[..., :-1, :2], states[..., 1:, :]                         # x = x_{t-1}[:2], y = x_t
    stats = mniw.data_stats(inputs, outputs)
    mean = (value.A @ inputs.mT).mT
    loglik = torch.distributions.MultivariateNormal(mean, value.Q[:, :, None]).log_prob(outputs).sum(-1)
    exact = pair(stats, mniw.expected_stats(q), mniw.EVENT_DIMS) - 5 * 3 / 2 * math.log(2 * math.pi)
    assert mc_close(loglik, exact)


def test_expectations_are_the_lds_quantities():
    nat = random_mniw(torch.Generator().manual_seed(5), 3)
    std, e = mniw.standard_from_natural(nat), mniw.expectations(nat)
    Psi_inv = torch.linalg.inv(std.scale)
    nu = std.df[:, None, None]
    assert torch.allclose(e.Qinv, nu * Psi_inv, atol=1e-10)
    assert torch.allclose(e.Qinv_A, nu * Psi_inv @ std.loc, atol=1e-10)
    ref = nu * std.loc.mT @ Psi_inv @ std.loc + 3 * torch.linalg.inv(std.col_precision)
    assert torch.allclose(e.At_Qinv_A, ref, atol=1e-10)
    ref_logdet = [float(np.linalg.slogdet(std.scale[b].numpy())[1]) - 3 * math.log(2)
                  - sum(special.digamma((float(std.df[b]) - i) / 2) for i in range(3)) for b in range(3)]
    ref_logdet = torch.tensor(ref_logdet, dtype=DT)
    assert torch.allclose(e.logdet_Q, ref_logdet, atol=1e-10)


def test_niw_is_the_one_column_mniw():
    g = torch.Generator().manual_seed(6)
    loc, scale = torch.randn(2, 3, generator=g, dtype=DT), spd(g, 2, dim=3)
    kappa, df = torch.tensor([0.7, 2.0], dtype=DT), torch.tensor([4.5, 6.0], dtype=DT)
    a = niw.natural_from_standard(loc, kappa, scale, df)
    b = mniw.MNIWNatural(a.sum_xxT, a.sum_x[..., None], a.count[..., None, None], a.logdet_count)
    assert torch.allclose(niw.log_partition(a), mniw.log_partition(b), atol=1e-12)
    ea, eb = niw.expected_stats(a), mniw.expected_stats(b)
    assert torch.allclose(ea.neg_half_prec, eb.neg_half_Qinv, atol=1e-12)
    assert torch.allclose(ea.prec_mean, eb.Qinv_A[..., 0], atol=1e-12)
    assert torch.allclose(ea.neg_half_quad, eb.neg_half_AtQinvA[..., 0, 0], atol=1e-12)
    assert torch.allclose(ea.neg_half_logdet, eb.neg_half_logdetQ, atol=1e-12)


def test_posterior_mean_is_ridge_and_scale_is_textbook():
    g = torch.Generator().manual_seed(7)
    N, lam = 40, 2.5
    X = torch.randn(N, 2, generator=g, dtype=DT)
    A_true = torch.tensor([[0.9, -0.3], [0.2, 0.5], [1.0, 0.0]], dtype=DT)
    Y = X @ A_true.T + 0.3 * torch.randn(N, 3, generator=g, dtype=DT)
    M0, K0, Psi0, nu0 = torch.zeros(3, 2, dtype=DT), lam * torch.eye(2, dtype=DT), spd(g, dim=3), 5.0
    post = mniw.conjugate_update(mniw.natural_from_standard(M0, K0, Psi0, nu0), mniw.data_stats(X, Y))
    std = mniw.standard_from_natural(post)
    ridge = Ridge(alpha=lam, fit_intercept=False).fit(X.numpy(), Y.numpy())
    assert np.allclose(std.loc.numpy(), ridge.coef_, atol=1e-10)                      # peer, tol 1e-10
    # textbook: K_n = K_0 + X^T X, Psi_n = Psi_0 + Y^T Y + M0 K0 M0^T - M_n K_n M_n^T, nu_n = nu_0 + N
    Kn = K0 + X.T @ X
    Mn = Y.T @ X @ torch.linalg.inv(Kn)
    assert torch.allclose(std.col_precision, Kn, atol=1e-10) and float(std.df) == pytest.approx(nu0 + N)
    assert torch.allclose(std.scale, Psi0 + Y.T @ Y - Mn @ Kn @ Mn.T, atol=1e-9)


def test_transition_stats():
    g = torch.Generator().manual_seed(8)
    x = torch.randn(2, 7, 3, generator=g, dtype=DT)
    stats = mniw.transition_stats(x)
    for b in range(2):
        ref_yy = sum(torch.outer(x[b, t], x[b, t]) for t in range(1, 7))
        ref_yx = sum(torch.outer(x[b, t], x[b, t - 1]) for t in range(1, 7))
        ref_xx = sum(torch.outer(x[b, t - 1], x[b, t - 1]) for t in range(1, 7))
        assert torch.allclose(stats.sum_yyT[b], ref_yy) and torch.allclose(stats.sum_yxT[b], ref_yx)
        assert torch.allclose(stats.sum_xxT[b], ref_xx) and float(stats.count[b]) == 6.0
    w = torch.rand(2, 6, generator=g, dtype=DT)                                       # weighted regression stats
    weighted = mniw.data_stats(x[..., :-1, :], x[..., 1:, :], w)
    for b in range(2):
        ref_yx = sum(w[b, t - 1] * torch.outer(x[b, t], x[b, t - 1]) for t in range(1, 7))
        ref_yy = sum(w[b, t - 1] * torch.outer(x[b, t], x[b, t]) for t in range(1, 7))
        ref_xx = sum(w[b, t - 1] * torch.outer(x[b, t - 1], x[b, t - 1]) for t in range(1, 7))
        assert torch.allclose(weighted.sum_yxT[b], ref_yx) and torch.allclose(weighted.sum_yyT[b], ref_yy)
        assert torch.allclose(weighted.sum_xxT[b], ref_xx) and torch.allclose(weighted.count[b], w[b].sum())
    second = x[..., :, None] * x[..., None, :]
    cross = x[..., 1:, :, None] * x[..., :-1, None, :]
    for a, b in zip(mniw.expected_transition_stats(second, cross), stats):
        assert torch.allclose(a, b, atol=1e-12)


def test_marginal_likelihood_identity_by_numerical_integration_1d():
    """x_t = a x_{t-1} + N(0, q): log p(x_1:T | x_0) = A(prior + stats) - A(prior) - (T/2) log 2pi against a
    quadrature over (u, log q), a = 0.5 + sqrt(q) u (1-D: q ~ InvGamma(nu/2, psi/2), a | q ~ N(M, q / K))."""
    M, K, psi, nu = 0.2, 0.8, 0.9, 2.5
    x = np.array([0.5, 1.1, 0.4, -0.3, 0.2])
    prior = mniw.natural_from_standard(torch.tensor([[M]], dtype=DT), torch.tensor([[K]], dtype=DT),
                                       torch.tensor([[psi]], dtype=DT), nu)
    post = mniw.conjugate_update(prior, mniw.transition_stats(torch.from_numpy(x)[:, None]))
    ours = float(mniw.log_partition(post) - mniw.log_partition(prior)) - 4 / 2 * math.log(2 * math.pi)
    u, du = np.linspace(-12, 12, 801, retstep=True)
    log_q, dlq = np.linspace(-14, 14, 801, retstep=True)
    u, log_q = u[:, None], log_q[None, :]
    q = np.exp(log_q)
    a = 0.5 + np.sqrt(q) * u

    def log_normal(v, mean, var):
        return -0.5 * (np.log(2 * np.pi * var) + (v - mean) ** 2 / var)
    log_joint = (log_normal(x[1:, None, None], a * x[:-1, None, None], q).sum(0) + log_normal(a, M, q / K)
                 + (nu / 2) * math.log(psi / 2) - special.gammaln(nu / 2) - (nu / 2 + 1) * log_q - psi / 2 / q
                 + 1.5 * log_q)                                               # Jacobian: da dq = q^1.5 du dlogq
    brute = special.logsumexp(log_joint) + math.log(du * dlq)
    assert abs(ours - brute) < 1e-10                                                  # tol 1e-10


def test_float32():
    nat = random_mniw(torch.Generator().manual_seed(9), 2, dtype=torch.float32)
    leaves = [f.detach().clone().requires_grad_(True) for f in nat]
    grad = torch.autograd.grad(mniw.log_partition(mniw.MNIWNatural(*leaves)).sum(), leaves)
    es = mniw.expected_stats(nat)
    assert all(e.dtype == torch.float32 for e in es)
    for gr, e in zip(grad, es):
        assert torch.allclose(gr, e, atol=1e-3, rtol=1e-3)                              # float32 tol
    value = mniw.sample(nat, (5,), torch.Generator().manual_seed(0))
    assert value.A.shape == (5, 2, 3, 2) and value.Q.dtype == torch.float32


def test_bad_input_names_the_argument():
    g = torch.Generator().manual_seed(10)
    M, K, Psi = torch.zeros(3, 2, dtype=DT), spd(g, dim=2), spd(g, dim=3)
    with pytest.raises(ValueError, match="df must be > out - 1 = 2"):
        mniw.natural_from_standard(M, K, Psi, 2.0)
    with pytest.raises(ValueError, match="col_precision must be positive definite"):
        mniw.natural_from_standard(M, -K, Psi, 4.0)
    with pytest.raises(ValueError, match="scale must be symmetric"):
        mniw.natural_from_standard(M, K, Psi + torch.triu(torch.ones(3, 3, dtype=DT), 1), 4.0)
    with pytest.raises(ValueError, match=r"col_precision must have shape \(\*batch, 2, 2\)"):
        mniw.natural_from_standard(M, spd(g, dim=3), Psi, 4.0)
    with pytest.raises(ValueError, match=r"loc must have shape \(\*batch, 3, in\)"):
        mniw.natural_from_standard(M.T, K, Psi, 4.0)
    nat = mniw.natural_from_standard(M, K, Psi, 4.0)
    with pytest.raises(ValueError, match="natparam.count must be > 2 out \\+ in = 8"):
        mniw.log_partition(nat._replace(count=torch.tensor(7.5, dtype=DT)))
    with pytest.raises(ValueError, match=r"sum_yyT - sum_yxT sum_xxT\^-1 sum_yxT\^T \(Psi\) must be positive"):
        mniw.expected_stats(nat._replace(sum_yxT=10 * torch.ones(3, 2, dtype=DT)))
    with pytest.raises(ValueError, match=r"stats.sum_yxT must have the shape of natparam.sum_yxT, \(3, 2\)"):
        mniw.conjugate_update(nat, mniw.data_stats(torch.zeros(5, 3, dtype=DT), torch.zeros(5, 3, dtype=DT)))
    with pytest.raises(ValueError, match=r"outputs must have shape \(\*batch, 5, out\)"):
        mniw.data_stats(torch.zeros(5, 2, dtype=DT), torch.zeros(4, 3, dtype=DT))
    with pytest.raises(ValueError, match=r"cross_moments must have shape \(\*batch, 3, 2, 2\)"):
        mniw.expected_transition_stats(torch.zeros(4, 2, 2, dtype=DT), torch.zeros(4, 2, 2, dtype=DT))


def test_unvalidated_path_equals_the_validated_one_and_still_refuses_a_non_pd_matrix():
    """``validate=False`` (inside coordinate-ascent sweeps) skips the checks but computes the same numbers from one
    factorization (``factors``); a matrix that is not positive definite still raises (torch's Cholesky)."""
    g = torch.Generator().manual_seed(11)
    prior = random_mniw(g)
    stats = mniw.data_stats(torch.randn(7, 2, generator=g, dtype=DT), torch.randn(7, 3, generator=g, dtype=DT))
    post = mniw.conjugate_update(prior, stats)
    fast = mniw.conjugate_update(prior, stats, validate=False)
    for a, b in zip(post, fast):
        assert torch.equal(a, b)
    f = mniw.factors(fast, validate=False)
    for a, b in zip(mniw.expectations(post), mniw.expectations_from_factors(f)):
        assert torch.equal(a, b)
    assert torch.equal(mniw.log_partition(post), mniw.log_partition_from_factors(f))
    assert torch.equal(mniw.log_partition(post), mniw.log_partition(post, validate=False))
    for a, b in zip(mniw.standard_from_natural(post), mniw.standard_from_natural(post, validate=False)):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match=r"stats.sum_yxT must have the shape of natparam.sum_yxT, \(3, 2\)"):
        mniw.conjugate_update(prior, mniw.data_stats(torch.zeros(5, 3, dtype=DT), torch.zeros(5, 3, dtype=DT)),
                              validate=False)
    with pytest.raises(torch.linalg.LinAlgError):
        mniw.factors(post._replace(sum_xxT=-post.sum_xxT), validate=False)
    with pytest.raises(ValueError, match=r"natparam.sum_xxT \(K\) must be positive definite"):
        mniw.factors(post._replace(sum_xxT=-post.sum_xxT))
