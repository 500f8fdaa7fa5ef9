"""Normal-inverse-Wishart (ppl.expfam.niw).

Oracles: autograd of the log partition; scipy.stats (multivariate_normal x invwishart log densities);
Monte Carlo with fixed seeds (tolerance 5 standard errors); Murphy (2007), "Conjugate Bayesian analysis
of the Gaussian distribution", NIW posterior update and marginal likelihood; numerical integration over
(mu, sigma^2) in 1-D (scipy.integrate.dblquad). float64 unless said otherwise.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import special, stats as sps

from ppl.expfam import gaussian, niw
from tests.reference.random_inputs import mc_close, random_niw, spd

DT = torch.float64


def test_gradient_of_log_partition_is_expected_stats():
    nat = random_niw(torch.Generator().manual_seed(1), 2, 3, dim=3)
    leaves = [f.detach().clone().requires_grad_(True) for f in nat]
    grad = torch.autograd.grad(niw.log_partition(niw.NIWNatural(*leaves)).sum(), leaves)
    for name, gr, es in zip(niw.NIWStats._fields, grad, niw.expected_stats(nat)):
        assert torch.allclose(gr, es, atol=1e-10), name                               # tol 1e-10


def test_roundtrip_and_batched_shapes():
    g = torch.Generator().manual_seed(2)
    loc, kappa, scale, df = torch.randn(4, 2, generator=g, dtype=DT), 2.0, spd(g, 4, dim=2), 5.0
    nat = niw.natural_from_standard(loc, kappa, scale, df)
    assert nat.count.shape == (4,) and nat.logdet_count.shape == (4,)
    std = niw.standard_from_natural(nat)
    assert torch.allclose(std.loc, loc, atol=1e-12) and torch.allclose(std.scale, scale, atol=1e-12)
    assert torch.allclose(std.kappa, torch.full((4,), 2.0, dtype=DT), atol=1e-12)
    assert torch.allclose(std.df, torch.full((4,), 5.0, dtype=DT), atol=1e-12)


def test_log_prob_against_scipy():
    g = torch.Generator().manual_seed(3)
    nat = random_niw(g, 2, dim=3)
    std = niw.standard_from_natural(nat)
    value = niw.sample(nat, (3,), g)
    ours = niw.log_prob(nat, value)
    for s in range(3):
        for b in range(2):
            mu, cov = value.loc[s, b].numpy(), value.covariance_matrix[s, b].numpy()
            ref = (sps.multivariate_normal.logpdf(mu, std.loc[b].numpy(), cov / float(std.kappa[b]))
                   + sps.invwishart.logpdf(cov, df=float(std.df[b]), scale=std.scale[b].numpy()))
            assert abs(float(ours[s, b]) - ref) < 1e-9                                 # peer, tol 1e-9
    # torch peer: IW(Sigma | Psi, nu) = Wishart(Sigma^-1 | nu, Psi^-1) |Sigma|^-(D+1) (Jacobian of inversion)
    cov = value.covariance_matrix
    wishart = torch.distributions.Wishart(std.df, precision_matrix=std.scale)
    log_iw = wishart.log_prob(torch.linalg.inv(cov)) - 4 * torch.logdet(cov)
    normal = torch.distributions.MultivariateNormal(std.loc, cov / std.kappa[:, None, None])
    assert torch.allclose(ours, normal.log_prob(value.loc) + log_iw, atol=1e-9)        # peer, tol 1e-9


def test_expected_stats_and_kl_against_monte_carlo():
    g = torch.Generator().manual_seed(4)
    q, p = random_niw(g, 2, dim=2), random_niw(g, 2, dim=2)
    value = niw.sample(q, (40000,), g)
    t, es = niw.sufficient_stats(value), niw.expected_stats(q)
    for name, mc, exact in zip(niw.NIWStats._fields, t, es):
        assert mc_close(mc, exact), name                                              # 5 s.e.
    assert mc_close(niw.log_prob(q, value) - niw.log_prob(p, value), niw.kl(q, p))
    assert torch.allclose(niw.kl(q, q), torch.zeros(2, dtype=DT), atol=1e-10)
    # the sampler's covariance mean is the inverse-Wishart mean Psi / (nu - D - 1)
    std = niw.standard_from_natural(q)
    mean_cov = std.scale / (std.df - 3)[:, None, None]
    assert mc_close(value.covariance_matrix, mean_cov)


def murphy_posterior(x, mu0, kappa0, psi0, nu0):
    """Murphy (2007), NIW posterior: the update from n observations ``x: (n, D)``."""
    n, xbar = x.shape[0], x.mean(0)
    centered = x - xbar
    kappa_n = kappa0 + n
    mu_n = (kappa0 * mu0 + n * xbar) / kappa_n
    diff = (xbar - mu0)[:, None]
    psi_n = psi0 + centered.T @ centered + kappa0 * n / kappa_n * diff @ diff.T
    return mu_n, kappa_n, psi_n, nu0 + n


def test_conjugate_update_matches_murphy_and_evidence():
    g = torch.Generator().manual_seed(5)
    D, n = 2, 7
    mu0, kappa0, psi0, nu0 = torch.randn(D, generator=g, dtype=DT), 1.3, spd(g, dim=D), 4.2
    x = torch.randn(n, D, generator=g, dtype=DT) + 1.0
    prior = niw.natural_from_standard(mu0, kappa0, psi0, nu0)
    post = niw.conjugate_update(prior, niw.data_stats(x))
    ours = niw.standard_from_natural(post)
    mu_n, kappa_n, psi_n, nu_n = murphy_posterior(x, mu0, kappa0, psi0, nu0)
    assert torch.allclose(ours.loc, mu_n, atol=1e-12) and torch.allclose(ours.scale, psi_n, atol=1e-12)
    assert float(ours.kappa) == pytest.approx(kappa_n, abs=1e-12)
    assert float(ours.df) == pytest.approx(nu_n, abs=1e-12)
    # Murphy's NIW marginal likelihood:
    # p(D) = pi^{-nD/2} Gamma_D(nu_n/2) / Gamma_D(nu_0/2) |Psi0|^{nu0/2} / |Psi_n|^{nu_n/2} (k0/kn)^{D/2}
    ref = (-n * D / 2 * math.log(math.pi) + special.multigammaln(nu_n / 2, D) - special.multigammaln(nu0 / 2, D)
           + nu0 / 2 * float(torch.logdet(psi0)) - nu_n / 2 * float(torch.logdet(psi_n))
           + D / 2 * math.log(kappa0 / kappa_n))
    evidence = niw.log_partition(post) - niw.log_partition(prior) - n * D / 2 * math.log(2 * math.pi)
    assert abs(float(evidence) - ref) < 1e-10                                          # tol 1e-10


def log_normal(x, mean, var):
    return -0.5 * (np.log(2 * np.pi * var) + (x - mean) ** 2 / var)


def log_inv_gamma(v, shape, scale):
    return shape * np.log(scale) - special.gammaln(shape) - (shape + 1) * np.log(v) - scale / v


def test_marginal_likelihood_identity_by_numerical_integration_1d():
    """log p(x_1:n) = A(prior + stats) - A(prior) - n/2 log 2pi against a 2-D quadrature of
    p(x | mu, sigma^2) p(mu | sigma^2) p(sigma^2) (1-D IW = inverse gamma) over (u, log sigma^2),
    mu = 0.5 + sigma u; the trapezoid rule on this smooth, fast-decaying integrand is exact to ~1e-15."""
    mu0, kappa, psi, nu = 0.3, 1.5, 1.2, 3.0
    x = np.array([0.9, -0.4, 1.7])
    prior = niw.natural_from_standard(torch.tensor([mu0], dtype=DT), kappa, torch.tensor([[psi]], dtype=DT), nu)
    post = niw.conjugate_update(prior, niw.data_stats(torch.from_numpy(x)[:, None]))
    ours = float(niw.log_partition(post) - niw.log_partition(prior)) - 3 / 2 * math.log(2 * math.pi)
    u, du = np.linspace(-12, 12, 801, retstep=True)
    log_var, dlv = np.linspace(-14, 14, 801, retstep=True)
    u, log_var = u[:, None], log_var[None, :]
    var = np.exp(log_var)
    mu = 0.5 + np.sqrt(var) * u
    log_joint = (log_normal(x[:, None, None], mu, var).sum(0) + log_normal(mu, mu0, var / kappa)
                 + log_inv_gamma(var, nu / 2, psi / 2) + 1.5 * log_var)   # d mu d var = var^1.5 du dlogvar
    brute = special.logsumexp(log_joint) + math.log(du * dlv)
    assert abs(ours - brute) < 1e-10                                                  # tol 1e-10


def test_expected_data_stats_from_gaussian_expected_stats():
    """E_q[log N(x | mu, Sigma)] summed with weights is linear in (sum w E[xx^T], sum w E[x], sum w, sum w)."""
    g = torch.Generator().manual_seed(6)
    loc, cov = torch.randn(3, 5, 2, generator=g, dtype=DT), spd(g, 3, 5, dim=2)
    w = torch.rand(3, 5, generator=g, dtype=DT)
    stats = niw.expected_data_stats(gaussian.expected_stats(gaussian.natural_from_standard(loc, cov)), w)
    second = cov + loc[..., :, None] * loc[..., None, :]
    assert torch.allclose(stats.sum_xxT, (w[..., None, None] * second).sum(1), atol=1e-12)
    assert torch.allclose(stats.sum_x, (w[..., None] * loc).sum(1), atol=1e-12)
    assert torch.allclose(stats.count, w.sum(1)) and torch.allclose(stats.logdet_count, w.sum(1))
    unweighted = niw.expected_data_stats(gaussian.expected_stats(gaussian.natural_from_standard(loc, cov)))
    for a, b in zip(unweighted, niw.expected_data_stats(gaussian.expected_stats(
            gaussian.natural_from_standard(loc, cov)), torch.ones(3, 5, dtype=DT))):
        assert torch.allclose(a, b, atol=1e-12)
    # with point masses (cov -> 0) it agrees with data_stats on the points
    pts = niw.data_stats(loc, w)
    outer = loc[..., :, None] * loc[..., None, :]
    assert torch.allclose(pts.sum_xxT, (w[..., None, None] * outer).sum(1), atol=1e-12)


def test_float32():
    nat = random_niw(torch.Generator().manual_seed(7), 3, dim=2, dtype=torch.float32)
    leaves = [f.detach().clone().requires_grad_(True) for f in nat]
    grad = torch.autograd.grad(niw.log_partition(niw.NIWNatural(*leaves)).sum(), leaves)
    es = niw.expected_stats(nat)
    assert all(e.dtype == torch.float32 for e in es)
    for gr, e in zip(grad, es):
        assert torch.allclose(gr, e, atol=1e-3, rtol=1e-3)                              # float32 tol
    value = niw.sample(nat, (2,), torch.Generator().manual_seed(0))
    assert value.covariance_matrix.dtype == torch.float32 and value.loc.shape == (2, 3, 2)
    again = niw.sample(nat, (2,), torch.Generator().manual_seed(0))                   # same seed, same draw
    assert torch.equal(value.loc, again.loc) and torch.equal(value.covariance_matrix, again.covariance_matrix)


def test_bad_input_names_the_argument():
    g = torch.Generator().manual_seed(8)
    loc, scale = torch.zeros(2, dtype=DT), spd(g, dim=2)
    with pytest.raises(ValueError, match="df must be > dim - 1 = 1"):
        niw.natural_from_standard(loc, 1.0, scale, 1.0)
    with pytest.raises(ValueError, match="kappa must be positive"):
        niw.natural_from_standard(loc, 0.0, scale, 4.0)
    with pytest.raises(ValueError, match="scale must be positive definite"):
        niw.natural_from_standard(loc, 1.0, -scale, 4.0)
    with pytest.raises(ValueError, match=r"loc must have shape \(\*batch, dim\) with batch shape \(3,\)"):
        niw.natural_from_standard(loc, 1.0, scale.expand(3, 2, 2), 4.0)
    with pytest.raises(ValueError, match=r"kappa must have shape \(\*batch\)"):
        niw.natural_from_standard(loc, torch.ones(2, dtype=DT), scale, 4.0)
    nat = niw.natural_from_standard(loc, 1.0, scale, 4.0)
    with pytest.raises(ValueError, match="natparam.logdet_count must be > 2D \\+ 1"):
        niw.log_partition(nat._replace(logdet_count=torch.tensor(4.5, dtype=DT)))
    with pytest.raises(ValueError, match=r"natparam.sum_xxT - sum_x sum_x\^T / count \(Psi\) must be positive"):
        niw.expected_stats(nat._replace(sum_x=torch.tensor([5.0, 0.0], dtype=DT)))
    with pytest.raises(ValueError, match="stats.sum_x must have shape"):
        niw.conjugate_update(nat, niw.NIWNatural(nat.sum_xxT, torch.zeros(3, dtype=DT), nat.count, nat.count))
    with pytest.raises(ValueError, match="weights must have shape"):
        niw.data_stats(torch.zeros(4, 2, dtype=DT), torch.ones(3, dtype=DT))
