"""Exponential families (ppl.expfam): categorical, Dirichlet, Gaussian.

Oracles: autograd of the log partition (gradient = expected statistics), torch.distributions
(log_prob, entropy, KL), Monte Carlo with fixed seeds (tolerance 5 standard errors of the estimate),
counting, and numerical integration (scipy.integrate.quad) for the Dirichlet-categorical evidence.
NIW and MNIW live in test_expfam_niw.py and test_expfam_mniw.py. float64 unless said otherwise.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import integrate, stats as sps

from ppl.expfam import categorical, dirichlet, gaussian
from tests.reference.random_inputs import mc_close, spd

DT = torch.float64


def grads(fn, fields):
    """Gradient of ``fn(*fields).sum()`` with respect to each field (float64 leaf copies)."""
    leaves = [f.detach().clone().requires_grad_(True) for f in fields]
    return torch.autograd.grad(fn(*leaves).sum(), leaves), leaves


# ----------------------------------------------------------------------------- categorical
def test_categorical_gradient_roundtrip_and_logprob():
    g = torch.Generator().manual_seed(1)
    eta = torch.randn(2, 3, 5, generator=g, dtype=DT)
    (grad,), _ = grads(categorical.log_partition, [eta])
    assert torch.allclose(grad, categorical.expected_stats(eta), atol=1e-12)     # tol 1e-12
    probs = categorical.standard_from_natural(eta).probs
    back = categorical.natural_from_standard(probs)
    normalized = eta - eta.logsumexp(-1, keepdim=True)
    assert torch.allclose(back - back.logsumexp(-1, keepdim=True), normalized, atol=1e-12)
    z = torch.randint(0, 5, (4, 2, 3), generator=g)
    ref = torch.distributions.Categorical(logits=eta).log_prob(z)
    assert torch.allclose(categorical.log_prob(eta, z), ref, atol=1e-12)          # peer, tol 1e-12


def test_categorical_sample_kl_and_counts():
    g = torch.Generator().manual_seed(2)
    eta_q, eta_p = torch.randn(2, 4, generator=g, dtype=DT), torch.randn(2, 4, generator=g, dtype=DT)
    z = categorical.sample(eta_q, (40000,), g)
    assert z.shape == (40000, 2)
    onehot = categorical.sufficient_stats(z, 4, DT)
    assert mc_close(onehot, categorical.expected_stats(eta_q))                   # 5 s.e.
    ref = torch.distributions.kl_divergence(torch.distributions.Categorical(logits=eta_q),
                                            torch.distributions.Categorical(logits=eta_p))
    assert torch.allclose(categorical.kl(eta_q, eta_p), ref, atol=1e-12)          # peer, tol 1e-12
    mc = categorical.log_prob(eta_q, z) - categorical.log_prob(eta_p, z)
    assert mc_close(mc, categorical.kl(eta_q, eta_p))
    # an impossible state under q contributes nothing; gradients stay finite
    eta = torch.tensor([0.0, -math.inf, 1.0], dtype=DT, requires_grad=True)
    value = categorical.kl(eta, torch.zeros(3, dtype=DT))
    value.backward()
    assert torch.isfinite(value) and torch.isfinite(eta.grad).all()
    counts = categorical.counts(z.mT, 4)
    for b in range(2):
        assert torch.equal(counts[b].long(), torch.from_numpy(np.bincount(z[:, b].numpy(), minlength=4)))


# ----------------------------------------------------------------------------- Dirichlet
def test_dirichlet_gradient_roundtrip_and_peers():
    g = torch.Generator().manual_seed(3)
    alpha = 0.3 + 3 * torch.rand(2, 3, 4, generator=g, dtype=DT)
    eta = dirichlet.natural_from_standard(alpha)
    assert torch.allclose(dirichlet.standard_from_natural(eta).concentration, alpha, atol=1e-14)
    (grad,), _ = grads(dirichlet.log_partition, [eta])
    assert torch.allclose(grad, dirichlet.expected_stats(eta), atol=1e-10)       # tol 1e-10
    ref = torch.distributions.Dirichlet(alpha)
    pi = ref.sample((5,))
    assert torch.allclose(dirichlet.log_prob(eta, pi), ref.log_prob(pi), atol=1e-10)
    # entropy identity H = A - <eta, E[t]> (base measure 1) against torch
    entropy = dirichlet.log_partition(eta) - (eta * dirichlet.expected_stats(eta)).sum(-1)
    assert torch.allclose(entropy, ref.entropy(), atol=1e-10)
    eta_p = dirichlet.natural_from_standard(0.5 + torch.rand(2, 3, 4, generator=g, dtype=DT))
    ref_kl = torch.distributions.kl_divergence(ref, torch.distributions.Dirichlet(eta_p + 1))
    assert torch.allclose(dirichlet.kl(eta, eta_p), ref_kl, atol=1e-10)


def test_dirichlet_sample_moments_and_mc_kl():
    g = torch.Generator().manual_seed(4)
    eta_q = dirichlet.natural_from_standard(torch.tensor([[0.7, 2.0, 3.5], [4.0, 1.0, 1.5]], dtype=DT))
    eta_p = dirichlet.natural_from_standard(torch.tensor([[1.0, 1.0, 1.0], [2.0, 2.0, 0.5]], dtype=DT))
    pi = dirichlet.sample(eta_q, (50000,), g)
    assert pi.shape == (50000, 2, 3) and torch.allclose(pi.sum(-1), torch.ones((), dtype=DT))
    assert mc_close(dirichlet.sufficient_stats(pi), dirichlet.expected_stats(eta_q))    # 5 s.e.
    mc = dirichlet.log_prob(eta_q, pi) - dirichlet.log_prob(eta_p, pi)
    assert mc_close(mc, dirichlet.kl(eta_q, eta_p))


def test_dirichlet_categorical_posterior_by_counting():
    g = torch.Generator().manual_seed(5)
    alpha = torch.tensor([0.5, 1.0, 2.0, 0.8], dtype=DT)
    z = torch.randint(0, 4, (3, 30), generator=g)
    weights = torch.rand(3, 30, generator=g, dtype=DT)
    post = dirichlet.conjugate_update(dirichlet.natural_from_standard(alpha).expand(3, 4),
                                      categorical.counts(z, 4, torch.ones(3, 30, dtype=DT)))
    for b in range(3):
        counted = torch.from_numpy(np.bincount(z[b].numpy(), minlength=4)).to(DT)
        assert torch.allclose(dirichlet.standard_from_natural(post).concentration[b], alpha + counted, atol=0)
        fractional = torch.zeros(4, dtype=DT).index_add_(0, z[b], weights[b])
        assert torch.allclose(categorical.counts(z, 4, weights)[b], fractional, atol=1e-12)


def test_dirichlet_categorical_evidence_by_integration():
    """log p(z_1:N) = A(eta + c) - A(eta), against quad of the Beta-Bernoulli integral (K = 2)."""
    a, b = 1.7, 0.6
    z = torch.tensor([0, 1, 1, 0, 1, 1, 1])
    c = categorical.counts(z, 2, torch.ones(7, dtype=DT))
    eta = dirichlet.natural_from_standard(torch.tensor([a, b], dtype=DT))
    ours = dirichlet.log_partition(dirichlet.conjugate_update(eta, c)) - dirichlet.log_partition(eta)
    integrand = lambda p: p ** float(c[0]) * (1 - p) ** float(c[1]) * sps.beta.pdf(p, a, b)   # noqa: E731
    value, _ = integrate.quad(integrand, 0, 1, epsabs=0, epsrel=1e-12, limit=200)
    assert abs(float(ours) - math.log(value)) < 1e-8                                  # tol 1e-8


# ----------------------------------------------------------------------------- Gaussian
def random_gaussian(g, *batch, dim, dtype=DT):
    loc = torch.randn(*batch, dim, generator=g, dtype=dtype)
    return loc, spd(g, *batch, dim=dim, dtype=dtype)


def test_gaussian_gradient_and_roundtrip():
    g = torch.Generator().manual_seed(6)
    loc, cov = random_gaussian(g, 2, 3, dim=3)
    nat = gaussian.natural_from_standard(loc, cov)
    back = gaussian.standard_from_natural(nat)
    assert torch.allclose(back.loc, loc, atol=1e-10) and torch.allclose(back.covariance_matrix, cov, atol=1e-10)
    (gJ, gh), _ = grads(lambda J, h: gaussian.log_partition(gaussian.GaussianNatural(J, h)), nat)
    es = gaussian.expected_stats(nat)
    assert torch.allclose(gJ, es.neg_half_xxT, atol=1e-10) and torch.allclose(gh, es.x, atol=1e-10)
    assert torch.allclose(-2 * es.neg_half_xxT, cov + loc[..., :, None] * loc[..., None, :], atol=1e-10)


def test_gaussian_peers_logprob_entropy_kl():
    g = torch.Generator().manual_seed(7)
    (lq, cq), (lp, cp) = random_gaussian(g, 4, dim=3), random_gaussian(g, 4, dim=3)
    q, p = gaussian.natural_from_standard(lq, cq), gaussian.natural_from_standard(lp, cp)
    ref_q, ref_p = torch.distributions.MultivariateNormal(lq, cq), torch.distributions.MultivariateNormal(lp, cp)
    x = torch.randn(6, 4, 3, generator=g, dtype=DT)
    assert torch.allclose(gaussian.log_prob(q, x), ref_q.log_prob(x), atol=1e-10)      # peer, tol 1e-10
    stats = gaussian.expected_stats(q)
    entropy = gaussian.log_partition(q) - ((q.J * stats.neg_half_xxT).sum((-2, -1)) + (q.h * stats.x).sum(-1))
    assert torch.allclose(entropy, ref_q.entropy(), atol=1e-10)
    assert torch.allclose(gaussian.kl(q, p), torch.distributions.kl_divergence(ref_q, ref_p), atol=1e-10)


def test_gaussian_sample_moments_and_mc_kl():
    g = torch.Generator().manual_seed(8)
    q = gaussian.natural_from_standard(*random_gaussian(g, 2, dim=2))
    p = gaussian.natural_from_standard(*random_gaussian(g, 2, dim=2))
    x = gaussian.sample(q, (40000,), g)
    assert x.shape == (40000, 2, 2)
    t, es = gaussian.sufficient_stats(x), gaussian.expected_stats(q)
    assert mc_close(t.x, es.x) and mc_close(t.neg_half_xxT, es.neg_half_xxT)           # 5 s.e.
    assert mc_close(gaussian.log_prob(q, x) - gaussian.log_prob(p, x), gaussian.kl(q, p))


def test_gaussian_float32_and_dtype_device_preserved():
    g = torch.Generator().manual_seed(9)
    loc, cov = random_gaussian(g, 3, dim=2, dtype=torch.float32)
    nat = gaussian.natural_from_standard(loc, cov)
    assert nat.J.dtype == torch.float32 and nat.h.device == loc.device
    (gJ, gh), _ = grads(lambda J, h: gaussian.log_partition(gaussian.GaussianNatural(J, h)), nat)
    es = gaussian.expected_stats(nat)
    assert es.x.dtype == torch.float32 and gaussian.log_partition(nat).dtype == torch.float32
    assert torch.allclose(gJ, es.neg_half_xxT, atol=1e-4)                             # float32 tol 1e-4
    assert torch.allclose(gh, es.x, atol=1e-4)
    ref = torch.distributions.MultivariateNormal(loc.double(), cov.double()).log_prob(loc.double())
    assert torch.allclose(gaussian.log_prob(nat, loc).double(), ref, atol=1e-4)
    eta = torch.randn(3, 4, generator=g)
    assert dirichlet.expected_stats(eta.abs()).dtype == torch.float32
    assert categorical.log_partition(eta).dtype == torch.float32


def test_batched_equals_loop():
    g = torch.Generator().manual_seed(10)
    nat = gaussian.natural_from_standard(*random_gaussian(g, 2, 3, dim=2))
    batched = gaussian.log_partition(nat)
    for i in range(2):
        for j in range(3):
            one = gaussian.log_partition(gaussian.GaussianNatural(nat.J[i, j], nat.h[i, j]))
            assert torch.allclose(batched[i, j], one, atol=1e-12)


# ----------------------------------------------------------------------------- bad input
def test_bad_input_names_the_argument():
    g = torch.Generator().manual_seed(11)
    loc, cov = random_gaussian(g, dim=2)
    not_psd = torch.tensor([[1.0, 2.0], [2.0, 1.0]], dtype=DT)
    with pytest.raises(ValueError, match="covariance_matrix must be positive definite"):
        gaussian.natural_from_standard(loc, not_psd)
    with pytest.raises(ValueError, match="covariance_matrix must be symmetric"):
        gaussian.natural_from_standard(loc, cov + torch.tensor([[0.0, 0.5], [0.0, 0.0]], dtype=DT))
    with pytest.raises(ValueError, match=r"loc must have shape \(\*batch, 2\)"):
        gaussian.natural_from_standard(torch.zeros(3, dtype=DT), cov)
    with pytest.raises(ValueError, match=r"natparam.h must have shape \(\*batch, dim\) with batch shape \(4,"):
        gaussian.log_partition(gaussian.GaussianNatural(cov.expand(4, 2, 2), torch.zeros(3, 2, dtype=DT)))
    with pytest.raises(ValueError, match="natparam.J must be positive definite"):
        gaussian.expected_stats(gaussian.GaussianNatural(not_psd, loc))
    with pytest.raises(ValueError, match="loc must have dtype torch.float64"):
        gaussian.natural_from_standard(loc.float(), cov)
    with pytest.raises(ValueError, match="loc must be finite"):
        gaussian.natural_from_standard(torch.tensor([0.0, math.nan], dtype=DT), cov)
    with pytest.raises(ValueError, match="natparam must be finite or -inf"):
        categorical.log_partition(torch.tensor([0.0, math.inf]))
    with pytest.raises(ValueError, match="concentration must be positive"):
        dirichlet.natural_from_standard(torch.tensor([1.0, 0.0]))
    with pytest.raises(ValueError, match=r"natparam must be > -1"):
        dirichlet.log_partition(torch.tensor([-1.5, 0.0]))
    with pytest.raises(ValueError, match="counts must have the shape of natparam"):
        dirichlet.conjugate_update(torch.zeros(3), torch.ones(4))
    with pytest.raises(ValueError, match="counts must be nonnegative"):
        dirichlet.conjugate_update(torch.zeros(3), -torch.ones(3))
    with pytest.raises(ValueError, match="probs must sum to 1"):
        categorical.natural_from_standard(torch.tensor([0.5, 0.6]))
    with pytest.raises(ValueError, match=r"z must lie in \[0, 3\)"):
        categorical.counts(torch.tensor([0, 3]), 3)
    with pytest.raises(ValueError, match="natparam_p must have the shape of natparam_q"):
        categorical.kl(torch.zeros(2, 3), torch.zeros(3))
