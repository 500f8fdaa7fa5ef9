"""Kalman kernels (ppl.inference.exact.kalman) against the dense-Gaussian oracle, Pyro, pykalman.

Oracle: tests/reference/dense_gaussian.py builds the joint Gaussian of the whole chain (small T) and
conditions it directly. Tolerances are stated in each assert (float64 unless said otherwise).
"""
from __future__ import annotations

import warnings
from functools import partial

import pytest
import torch

from ppl.inference.exact.kalman import (LDSPrior, info_filter, info_sample, info_smoother, kalman_filter,
                                        kalman_smoother, log_likelihood, observation_potentials,
                                        sample_posterior, with_inputs)
from ppl.inference.exact.kalman_scan import affine_combine, associative_scan, reverse_scan
from tests.reference import dense_gaussian as dense
from tests.reference.random_inputs import spd as random_spd

DT = torch.float64


# ----------------------------------------------------------------------------- helpers
spd = partial(random_spd, floor=0.2)  # the Kalman tests' covariances: eigenvalues at least 0.2


def random_prior(g, batch, D, T, time_varying=False, offsets=True):
    lead = (T - 1,) if time_varying else ()
    return LDSPrior(torch.randn(*batch, D, generator=g, dtype=DT), spd(g, *batch, dim=D),
                    0.7 * torch.randn(*batch, *lead, D, D, generator=g, dtype=DT) / D ** 0.5,
                    spd(g, *batch, *lead, dim=D, scale=0.3),
                    0.5 * torch.randn(*batch, T - 1, D, generator=g, dtype=DT) if offsets else None,
                    time_varying)


def pick(x, batch, idx, event_ndim):
    """Batch element ``idx`` of ``x`` broadcast to ``batch``."""
    return x.expand(torch.Size(batch) + x.shape[x.dim() - event_ndim:])[idx]


def dense_prior(prior, batch, idx, T):
    """(m0, P0, A (T-1, D, D), Q (T-1, D, D), b (T-1, D)) of one batch element, for the oracle."""
    D = prior.initial_loc.shape[-1]
    ev = 3 if prior.time_varying else 2
    A = pick(prior.dynamics, batch, idx, ev).expand(T - 1, D, D)
    Q = pick(prior.noise_cov, batch, idx, ev).expand(T - 1, D, D)
    b = torch.zeros(T - 1, D, dtype=DT) if prior.offsets is None else pick(prior.offsets, batch, idx, 2)
    return pick(prior.initial_loc, batch, idx, 1), pick(prior.initial_cov, batch, idx, 2), A, Q, b


def dense_emission(C, d, R, batch, idx, T, N, time_varying):
    ev = 1 if time_varying else 0
    C = pick(C, batch, idx, 2 + ev).expand(T, N, C.shape[-1])
    d = torch.zeros(T, N, dtype=DT) if d is None else pick(d, batch, idx, 1 + ev).expand(T, N)
    return C, d, pick(R, batch, idx, 2 + ev).expand(T, N, N)


def psd_potentials(g, batch, T, D, rank):
    W = torch.randn(*batch, T, rank, D, generator=g, dtype=DT)
    return W.mT @ W, torch.randn(*batch, T, D, generator=g, dtype=DT)


def all_indices(batch):
    return list(torch.cartesian_prod(*[torch.arange(n) for n in batch]).reshape(-1, len(batch)).tolist()) \
        if len(batch) > 1 else [[i] for i in range(batch[0])]


# ----------------------------------------------------------------------------- scan
@pytest.mark.parametrize("T", [1, 2, 3, 5, 8, 13])
def test_associative_scan_equals_sequential_fold(T):
    g = torch.Generator().manual_seed(T)
    G = torch.randn(2, T, 3, 3, generator=g, dtype=DT)
    c = torch.randn(2, T, 3, 4, generator=g, dtype=DT)
    _, out = associative_scan(affine_combine, (G, c), (2, 2))
    acc = c[:, 0]
    for t in range(T):
        acc = c[:, 0] if t == 0 else G[:, t] @ acc + c[:, t]
        assert torch.allclose(out[:, t], acc, atol=1e-12), f"prefix {t} differs by more than 1e-12"
    _, back = reverse_scan(affine_combine, (G, c), (2, 2))
    acc = c[:, T - 1]
    for t in reversed(range(T)):
        acc = c[:, t] if t == T - 1 else G[:, t] @ acc + c[:, t]
        assert torch.allclose(back[:, t], acc, atol=1e-12), f"suffix {t} differs by more than 1e-12"


# ----------------------------------------------------------------------------- information form
@pytest.mark.parametrize("time_varying,offsets", [(False, False), (False, True), (True, True)])
def test_info_kernels_match_dense(time_varying, offsets):
    g = torch.Generator().manual_seed(1)
    D, T = 3, 5
    prior = random_prior(g, (3,), D, T, time_varying, offsets)      # prior batch (3,)
    J, _ = psd_potentials(g, (2, 1), T, D, rank=2)                  # rank-deficient J, batch (2, 1)
    h = torch.randn(2, 3, T, D, generator=g, dtype=DT)              # full batch (2, 3)
    sm, fi = info_smoother(prior, J, h), info_filter(prior, J, h)
    assert sm.mean.shape == (2, 3, T, D) and sm.cov.shape == (2, 3, T, D, D)
    assert sm.cross_cov.shape == (2, 3, T - 1, D, D) and sm.log_normalizer.shape == (2, 3)
    for i, j in all_indices((2, 3)):
        args = dense_prior(prior, (2, 3), (i, j), T)
        Jij = J[i, 0]
        log_z, mean, cov, cross, _ = dense.potentials_posterior(*args, Jij, h[i, j])
        assert torch.allclose(sm.log_normalizer[i, j], log_z, atol=1e-9), "log Z off by > 1e-9"
        assert torch.allclose(fi.log_normalizer[i, j], log_z, atol=1e-9), "filter log Z off by > 1e-9"
        assert torch.allclose(sm.mean[i, j], mean, atol=1e-9), "smoothed mean off by > 1e-9"
        assert torch.allclose(sm.cov[i, j], cov, atol=1e-9), "smoothed cov off by > 1e-9"
        assert torch.allclose(sm.cross_cov[i, j], cross, atol=1e-9), "cross cov off by > 1e-9"
        for t in range(T):   # filtered at t = posterior of the chain truncated after step t
            _, m_t, c_t, _, _ = dense.potentials_posterior(args[0], args[1], args[2][:t], args[3][:t],
                                                           args[4][:t], Jij[:t + 1], h[i, j, :t + 1])
            assert torch.allclose(fi.filtered_mean[i, j, t], m_t[-1], atol=1e-9), f"filtered mean t={t}"
            assert torch.allclose(fi.filtered_cov[i, j, t], c_t[-1], atol=1e-9), f"filtered cov t={t}"


def test_single_step_chain():
    g = torch.Generator().manual_seed(2)
    prior = random_prior(g, (), 2, 1, offsets=False)
    J, h = psd_potentials(g, (), 1, 2, rank=1)
    sm = info_smoother(prior, J, h)
    log_z, mean, cov, _, _ = dense.potentials_posterior(*dense_prior(prior, (), (), 1), J, h)
    assert torch.allclose(sm.log_normalizer, log_z, atol=1e-12) and torch.allclose(sm.mean, mean, atol=1e-12)
    assert torch.allclose(sm.cov, cov, atol=1e-12) and sm.cross_cov.shape == (0, 2, 2)
    assert info_sample(prior, J, h, (5,)).shape == (5, 1, 2)


def test_homogeneous_equals_expanded_time_varying():
    g = torch.Generator().manual_seed(3)
    D, T = 2, 6
    prior = random_prior(g, (2,), D, T)
    tv = prior._replace(dynamics=prior.dynamics.unsqueeze(-3).expand(2, T - 1, D, D),
                        noise_cov=prior.noise_cov.unsqueeze(-3).expand(2, T - 1, D, D), time_varying=True)
    J, h = psd_potentials(g, (2,), T, D, rank=2)
    a, b = info_smoother(prior, J, h), info_smoother(tv, J, h)
    for x, y in zip(a, b):
        assert torch.allclose(x, y, atol=1e-12), "homogeneous and expanded time-varying differ by > 1e-12"


def test_log_normalizer_gradients_are_posterior_moments():
    """d log Z / d h_t = E[x_t];  sym(d log Z / d J_t) = -1/2 E[x_t x_t^T] (closed form)."""
    g = torch.Generator().manual_seed(4)
    D, T = 3, 5
    prior = random_prior(g, (), D, T)
    J, h = psd_potentials(g, (), T, D, rank=2)
    J.requires_grad_(True)
    h.requires_grad_(True)
    sm = info_smoother(prior, J, h)
    dJ, dh = torch.autograd.grad(sm.log_normalizer, (J, h))
    second = sm.cov + sm.mean.unsqueeze(-1) * sm.mean.unsqueeze(-2)
    assert torch.allclose(dh, sm.mean, atol=1e-9), "grad wrt h differs from E[x] by > 1e-9"
    assert torch.allclose(0.5 * (dJ + dJ.mT), -0.5 * second, atol=1e-9), "grad wrt J != -E[xx^T]/2"


def gradcheck_inputs(seed, D=2, T=4):
    """``(prior, W (T, 2, D), h (T, D), A (D, D))``: W, h and a copy A of the prior's dynamics are leaves
    that require grad (a test passes ``J = W^T W``, positive semidefinite for any W)."""
    g = torch.Generator().manual_seed(seed)
    prior = random_prior(g, (), D, T)
    W = torch.randn(T, 2, D, generator=g, dtype=DT).requires_grad_(True)
    h = torch.randn(T, D, generator=g, dtype=DT).requires_grad_(True)
    return prior, W, h, prior.dynamics.clone().requires_grad_(True)


def test_info_kernels_gradcheck():
    prior, W, h, A = gradcheck_inputs(5)

    def fn(W, h, A):
        p = prior._replace(dynamics=A)
        sm = info_smoother(p, W.mT @ W, h)
        return sm.log_normalizer, sm.mean, sm.cov, sm.cross_cov
    assert torch.autograd.gradcheck(fn, (W, h, A), eps=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------- observation form
CASES = [  # (dynamics time-varying, emission time-varying, masked, control inputs)
    (False, False, False, False),
    (True, True, True, True),
    (False, True, True, False),
    (True, False, False, True),
]


@pytest.mark.parametrize("tv_dyn,tv_emis,masked,inputs", CASES)
def test_observation_api_matches_dense(tv_dyn, tv_emis, masked, inputs):
    g = torch.Generator().manual_seed(6)
    D, N, T, B = 3, 2, 5, 2
    prior = random_prior(g, (B,), D, T, tv_dyn, offsets=not inputs)
    if inputs:
        prior = with_inputs(prior, torch.randn(D, 2, generator=g, dtype=DT),
                            torch.randn(B, T, 2, generator=g, dtype=DT))
    lead = (T,) if tv_emis else ()
    C = torch.randn(*lead, N, D, generator=g, dtype=DT)
    d = torch.randn(*lead, N, generator=g, dtype=DT)
    R = spd(g, *lead, dim=N, scale=0.5)
    y = torch.randn(B, T, N, generator=g, dtype=DT)
    mask = torch.tensor([[False, True, True, False, True], [True, True, False, True, True]]) if masked else None
    if masked:
        y = torch.where(mask.unsqueeze(-1), y, torch.nan)        # unobserved y may be NaN
    kw = dict(time_varying=tv_emis)
    ll = log_likelihood(prior, C, d, R, y, mask, **kw)
    fi = kalman_filter(prior, C, d, R, y, mask, **kw)
    sm = kalman_smoother(prior, C, d, R, y, mask, **kw)
    pot = observation_potentials(C, d, R, y, mask, **kw)
    log_z = info_filter(prior, pot.J, pot.h).log_normalizer
    for i in range(B):
        args = dense_prior(prior, (B,), (i,), T) + dense_emission(C, d, R, (B,), (i,), T, N, tv_emis)
        obs = mask[i] if masked else torch.ones(T, dtype=torch.bool)
        y_i = torch.nan_to_num(y[i])
        want = dense.log_marginal(*args, y_i, obs)
        assert torch.allclose(ll[i], want, atol=1e-9), "log_likelihood off by > 1e-9"
        assert torch.allclose(fi.log_normalizer[i], want, atol=1e-9), "filter log p(y) off by > 1e-9"
        assert torch.allclose(sm.log_normalizer[i], want, atol=1e-9), "smoother log p(y) off by > 1e-9"
        assert torch.allclose(log_z[i] + pot.const[i], want, atol=1e-9), "log Z + const != log p(y)"
        mean, cov, cross, _ = dense.posterior(*args, y_i, obs)
        assert torch.allclose(sm.mean[i], mean, atol=1e-9), "smoothed mean off by > 1e-9"
        assert torch.allclose(sm.cov[i], cov, atol=1e-9), "smoothed cov off by > 1e-9"
        assert torch.allclose(sm.cross_cov[i], cross, atol=1e-9), "cross cov off by > 1e-9"
        for t in range(T):    # filtered at t = posterior given the observations up to t
            m_t, c_t, _, _ = dense.posterior(*args, y_i, obs & (torch.arange(T) <= t))
            assert torch.allclose(fi.filtered_mean[i, t], m_t[t], atol=1e-9), f"filtered mean t={t}"
            assert torch.allclose(fi.filtered_cov[i, t], c_t[t], atol=1e-9), f"filtered cov t={t}"


def test_observation_potentials_formula():
    g = torch.Generator().manual_seed(7)
    D, N, T = 3, 2, 4
    C, d, R = torch.randn(N, D, generator=g, dtype=DT), torch.randn(N, generator=g, dtype=DT), spd(g, dim=N)
    y = torch.randn(2, T, N, generator=g, dtype=DT)
    mask = torch.tensor([[True, False, True, True], [True, True, True, False]])
    pot = observation_potentials(C, d, R, y, mask)
    Rinv = torch.linalg.inv(R)
    resid = y - d
    keep = mask.to(DT)
    assert torch.allclose(pot.J, keep[..., None, None] * (C.T @ Rinv @ C), atol=1e-12), "J != C^T R^-1 C"
    assert torch.allclose(pot.h, keep[..., None] * (resid @ Rinv @ C), atol=1e-12), "h != C^T R^-1 (y-d)"
    c = -0.5 * torch.einsum("...i,ij,...j->...", resid, Rinv, resid) - 0.5 * torch.logdet(2 * torch.pi * R)
    assert torch.allclose(pot.const, (keep * c).sum(-1), atol=1e-12), "const != sum of masked c_t"


def test_with_inputs_offsets():
    g = torch.Generator().manual_seed(8)
    D, U, T = 3, 2, 5
    prior = random_prior(g, (), D, T)
    B, u = torch.randn(D, U, generator=g, dtype=DT), torch.randn(4, T, U, generator=g, dtype=DT)
    got = with_inputs(prior, B, u).offsets
    assert got.shape == (4, T - 1, D)
    assert torch.allclose(got, prior.offsets + u[:, 1:] @ B.T, atol=1e-12), "offsets != b_t + B u_t (t>=1)"
    u2 = u.clone()
    u2[:, 0] += 10.0                                               # u_0 is ignored
    assert torch.equal(with_inputs(prior, B, u2).offsets, got)


# ----------------------------------------------------------------------------- sampling
def test_info_sample_moments_match_dense():
    g = torch.Generator().manual_seed(9)
    D, T, S = 2, 4, 40_000
    prior = random_prior(g, (2,), D, T)
    J, h = psd_potentials(g, (2,), T, D, rank=1)
    x = info_sample(prior, J, h, (S,), generator=torch.Generator().manual_seed(0))
    assert x.shape == (S, 2, T, D)
    for i in range(2):
        _, mean, _, _, full = dense.potentials_posterior(*dense_prior(prior, (2,), (i,), T), J[i], h[i])
        sd = full.diagonal().sqrt().reshape(T, D)
        assert ((x[:, i].mean(0) - mean).abs() < 5 * sd / S ** 0.5).all(), "sample mean off by > 5 s.e."
        emp = torch.cov(x[:, i].reshape(S, T * D).T)
        tol = 0.04 * full.diagonal().max()                          # ~6 s.e. of a covariance entry
        assert (emp - full).abs().max() < tol, f"sample joint covariance off by more than {tol:.3g}"


def test_sample_posterior_shapes_and_mean():
    g = torch.Generator().manual_seed(10)
    D, N, T, S = 2, 1, 6, 20_000
    prior = random_prior(g, (), D, T)
    C, R = torch.randn(N, D, generator=g, dtype=DT), spd(g, dim=N)
    y = torch.randn(3, T, N, generator=g, dtype=DT)
    x = sample_posterior(prior, C, None, R, y, sample_shape=(S,), generator=torch.Generator().manual_seed(1))
    sm = kalman_smoother(prior, C, None, R, y)
    assert x.shape == (S, 3, T, D)
    se = sm.cov.diagonal(dim1=-2, dim2=-1).sqrt() / S ** 0.5
    assert ((x.mean(0) - sm.mean).abs() < 5 * se).all(), "sample mean off by > 5 s.e."


def test_info_sample_is_reparameterized():
    """With the noise fixed (same generator seed) samples are smooth in h, J and the dynamics."""
    prior, W, h, A = gradcheck_inputs(11)

    def fn(W, h, A):
        noise = torch.Generator().manual_seed(0)
        return info_sample(prior._replace(dynamics=A), W.mT @ W, h, (3,), generator=noise)
    assert torch.autograd.gradcheck(fn, (W, h, A), eps=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------- gradients
def test_log_likelihood_gradcheck():
    g = torch.Generator().manual_seed(12)
    D, N, T = 2, 2, 4
    params = [torch.randn(D, generator=g, dtype=DT), torch.randn(D, D, generator=g, dtype=DT),
              0.5 * torch.randn(D, D, generator=g, dtype=DT), torch.randn(D, D, generator=g, dtype=DT),
              torch.randn(N, D, generator=g, dtype=DT), torch.randn(N, generator=g, dtype=DT),
              torch.randn(N, N, generator=g, dtype=DT), torch.randn(T, N, generator=g, dtype=DT)]
    params = [p.requires_grad_(True) for p in params]
    eye_d, eye_n = torch.eye(D, dtype=DT), torch.eye(N, dtype=DT)
    mask = torch.tensor([True, False, True, True])

    def fn(m0, P0f, A, Qf, C, d, Rf, y):
        prior = LDSPrior(m0, P0f @ P0f.T + eye_d, A, Qf @ Qf.T + 0.5 * eye_d)
        return log_likelihood(prior, C, d, Rf @ Rf.T + eye_n, y, mask)
    assert torch.autograd.gradcheck(fn, params, eps=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------- peers
def test_pyro_gaussian_hmm_log_prob():
    """Pyro's GaussianHMM draws z_{-1} ~ initial_dist and applies a transition before the first
    observation, with row-vector matrices (z_t = z_{t-1} @ M + noise, y_t = z_t @ H + noise). Mapping:
    (a) our (m0, P0) = the push-forward of Pyro's initial_dist through one transition;
    (b) a time-varying Pyro chain whose first transition matrix is 0 with noise N(m0, P0)."""
    dist = pytest.importorskip("pyro.distributions")
    g = torch.Generator().manual_seed(13)
    D, N, T, B = 3, 2, 6, 2
    A = 0.6 * torch.randn(D, D, generator=g, dtype=DT)
    Q, P_init, R = spd(g, dim=D, scale=0.3), spd(g, dim=D), spd(g, dim=N)
    mu, b = torch.randn(D, generator=g, dtype=DT), torch.randn(D, generator=g, dtype=DT)
    C, d = torch.randn(N, D, generator=g, dtype=DT), torch.randn(N, generator=g, dtype=DT)
    y = torch.randn(B, T, N, generator=g, dtype=DT)
    hmm = dist.GaussianHMM(dist.MultivariateNormal(mu, P_init), A.T, dist.MultivariateNormal(b, Q),
                           C.T, dist.MultivariateNormal(d, R), duration=T)
    prior = LDSPrior(A @ mu + b, A @ P_init @ A.T + Q, A, Q, b.expand(T - 1, D))
    ours = log_likelihood(prior, C, d, R, y)
    assert torch.allclose(ours, hmm.log_prob(y), atol=1e-9), "mapping (a) differs from Pyro by > 1e-9"
    m0, P0 = torch.randn(D, generator=g, dtype=DT), spd(g, dim=D)
    mats = torch.cat([torch.zeros(1, D, D, dtype=DT), A.T.expand(T - 1, D, D)])
    noise = dist.MultivariateNormal(torch.cat([m0[None], b.expand(T - 1, D)]),
                                    torch.cat([P0[None], Q.expand(T - 1, D, D)]))
    hmm_b = dist.GaussianHMM(dist.MultivariateNormal(torch.zeros(D, dtype=DT), torch.eye(D, dtype=DT)),
                             mats, noise, C.T, dist.MultivariateNormal(d, R), duration=T)
    ours_b = log_likelihood(LDSPrior(m0, P0, A, Q, b.expand(T - 1, D)), C, d, R, y)
    assert torch.allclose(ours_b, hmm_b.log_prob(y), atol=1e-9), "mapping (b) differs from Pyro by > 1e-9"


def test_pykalman_smooth_and_loglikelihood():
    pykalman = pytest.importorskip("pykalman")
    np = pytest.importorskip("numpy")
    g = torch.Generator().manual_seed(14)
    D, N, T = 3, 2, 30
    A = 0.6 * torch.randn(D, D, generator=g, dtype=DT)
    Q, P0, R = spd(g, dim=D, scale=0.3), spd(g, dim=D), spd(g, dim=N)
    m0, b = torch.randn(D, generator=g, dtype=DT), torch.randn(D, generator=g, dtype=DT)
    C, d = torch.randn(N, D, generator=g, dtype=DT), torch.randn(N, generator=g, dtype=DT)
    y = torch.randn(T, N, generator=g, dtype=DT)
    kf = pykalman.KalmanFilter(transition_matrices=A.numpy(), observation_matrices=C.numpy(),
                               transition_covariance=Q.numpy(), observation_covariance=R.numpy(),
                               transition_offsets=b.numpy(), observation_offsets=d.numpy(),
                               initial_state_mean=m0.numpy(), initial_state_covariance=P0.numpy())
    prior = LDSPrior(m0, P0, A, Q, b.expand(T - 1, D))
    mask = torch.ones(T, dtype=torch.bool)
    mask[[0, 7, 8, 20]] = False
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        means, covs = kf.smooth(y.numpy())
        ll = kf.loglikelihood(y.numpy())
        y_masked = np.ma.masked_array(y.numpy(), mask=~mask[:, None].expand(T, N).numpy())
        masked_means, masked_covs = kf.smooth(y_masked)
    sm = kalman_smoother(prior, C, d, R, y)
    assert np.allclose(sm.mean.numpy(), means, atol=1e-9) and np.allclose(sm.cov.numpy(), covs, atol=1e-9)
    assert abs(sm.log_normalizer.item() - ll) < 1e-8, "log p(y) differs from pykalman by > 1e-8"
    sm = kalman_smoother(prior, C, d, R, y, mask)
    assert np.allclose(sm.mean.numpy(), masked_means, atol=1e-9), "masked means differ by > 1e-9"
    assert np.allclose(sm.cov.numpy(), masked_covs, atol=1e-9), "masked covs differ by > 1e-9"


# ----------------------------------------------------------------------------- numerics
def stable_model(g, D, N, dtype=DT):
    A = 0.95 * torch.linalg.qr(torch.randn(D, D, generator=g, dtype=DT))[0]
    prior = LDSPrior(torch.zeros(D, dtype=DT), torch.eye(D, dtype=DT), A, 0.1 * torch.eye(D, dtype=DT))
    return prior, torch.randn(N, D, generator=g, dtype=DT), 0.5 * torch.eye(N, dtype=DT)


def test_long_sequence_float32_matches_float64_and_pyro():
    """T = 100,000: float64 log p(y) equals Pyro's GaussianHMM (rel. 1e-9); float32 stays finite and
    matches float64 (log p(y) rel. 1e-5, smoothed means 1e-4, covariances 1e-5 absolute)."""
    dist = pytest.importorskip("pyro.distributions")
    g = torch.Generator().manual_seed(15)
    D, N, T = 3, 2, 100_000
    prior, C, R = stable_model(g, D, N)
    y = torch.randn(T, N, generator=g, dtype=DT)
    s64 = kalman_smoother(prior, C, None, R, y)
    f32 = [x.float() for x in prior[:4]]
    s32 = kalman_smoother(LDSPrior(*f32), C.float(), None, R.float(), y.float())
    A, Q = prior.dynamics, prior.noise_cov      # Pyro: initial_dist = N(0, I) one step before x_0
    zero = torch.zeros(D, dtype=DT)
    hmm = dist.GaussianHMM(dist.MultivariateNormal(zero, torch.eye(D, dtype=DT)), A.T,
                           dist.MultivariateNormal(zero, Q), C.T,
                           dist.MultivariateNormal(torch.zeros(N, dtype=DT), R), duration=T)
    ours64 = log_likelihood(prior._replace(initial_cov=A @ A.T + Q), C, None, R, y)
    pyro_lp = hmm.log_prob(y)
    assert abs((ours64 - pyro_lp) / pyro_lp) < 1e-9, "float64 log p(y) differs from Pyro by rel. > 1e-9"
    assert all(torch.isfinite(x).all() for x in s32)
    rel = abs((s32.log_normalizer.double() - s64.log_normalizer) / s64.log_normalizer)
    assert rel < 1e-5, f"float32 log p(y) relative error {rel:.2e} > 1e-5"
    assert (s32.mean.double() - s64.mean).abs().max() < 1e-4, "float32 smoothed means off by > 1e-4"
    assert (s32.cov.double() - s64.cov).abs().max() < 1e-5, "float32 smoothed covs off by > 1e-5"
    assert (s32.cross_cov.double() - s64.cross_cov).abs().max() < 1e-5, "float32 cross covs off by > 1e-5"


def test_float32_short_sequence_matches_float64():
    g = torch.Generator().manual_seed(16)
    D, T = 3, 50
    prior = random_prior(g, (2,), D, T)
    J, h = psd_potentials(g, (2,), T, D, rank=2)
    s64 = info_smoother(prior, J, h)
    s32 = info_smoother(LDSPrior(*[x.float() for x in prior[:5]]), J.float(), h.float())
    assert s32.mean.dtype == torch.float32
    for a, b in zip(s32, s64):
        assert torch.allclose(a.double(), b, rtol=1e-4, atol=1e-4), "float32 differs from float64 by > 1e-4"


def test_near_singular_noise_cov():
    """Q and P0 with eigenvalues 1e-8 (float64): observation form vs the dense joint Gaussian, and
    information form vs the dense covariance-form oracle (the dense information form would need the
    inverse of the near-singular prior covariance and is itself inaccurate here)."""
    g = torch.Generator().manual_seed(17)
    D, N, T = 3, 2, 8
    U = torch.linalg.qr(torch.randn(D, D, generator=g, dtype=DT))[0]
    thin = U @ torch.diag(torch.tensor([1.0, 1e-8, 1e-8], dtype=DT)) @ U.T
    A = 0.8 * torch.linalg.qr(torch.randn(D, D, generator=g, dtype=DT))[0]
    prior = LDSPrior(torch.randn(D, generator=g, dtype=DT), thin, A, thin)
    C, R = torch.randn(N, D, generator=g, dtype=DT), spd(g, dim=N, scale=0.1, floor=0.05)
    y = torch.randn(T, N, generator=g, dtype=DT)
    sm = kalman_smoother(prior, C, None, R, y)
    args = dense_prior(prior, (), (), T) + dense_emission(C, None, R, (), (), T, N, False)
    obs = torch.ones(T, dtype=torch.bool)
    mean, cov, cross, _ = dense.posterior(*args, y, obs)
    assert abs(sm.log_normalizer - dense.log_marginal(*args, y, obs)) < 1e-9, "log p(y) off by > 1e-9"
    assert torch.allclose(sm.mean, mean, atol=1e-10) and torch.allclose(sm.cov, cov, atol=1e-12)
    assert torch.allclose(sm.cross_cov, cross, atol=1e-12), "cross cov off by > 1e-12"
    J, h = psd_potentials(g, (), T, D, rank=2)
    si = info_smoother(prior, J, h)
    log_z, mean, cov, cross, _ = dense.potentials_posterior_cov_form(*dense_prior(prior, (), (), T), J, h)
    assert abs(si.log_normalizer - log_z) < 1e-10 and torch.allclose(si.mean, mean, atol=1e-10)
    assert torch.allclose(si.cov, cov, atol=1e-12) and torch.allclose(si.cross_cov, cross, atol=1e-12)
    x = info_sample(prior, J, h, (4000,), generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(x).all()
    assert ((x.mean(0) - mean).abs() < 5 * cov.diagonal(dim1=-2, dim2=-1).sqrt() / 4000 ** 0.5 + 1e-9).all()


def test_info_form_oracles_agree():
    """The dense information-form and covariance-form oracles agree on a well-conditioned chain."""
    g = torch.Generator().manual_seed(18)
    prior = random_prior(g, (), 2, 5)
    J, h = psd_potentials(g, (), 5, 2, rank=1)
    a = dense.potentials_posterior(*dense_prior(prior, (), (), 5), J, h)
    b = dense.potentials_posterior_cov_form(*dense_prior(prior, (), (), 5), J, h)
    for x, y in zip(a, b):
        assert torch.allclose(x, y, atol=1e-10), "dense oracles disagree by > 1e-10"


# ----------------------------------------------------------------------------- bad input
def _bad_cases():
    g = torch.Generator().manual_seed(19)
    D, N, T = 2, 1, 4
    p = random_prior(g, (), D, T)
    J, h = psd_potentials(g, (), T, D, rank=1)
    C, R, y = torch.randn(N, D, dtype=DT), torch.eye(N, dtype=DT), torch.randn(T, N, dtype=DT)
    nan_y = y.clone()
    nan_y[1, 0] = torch.nan
    mask = torch.tensor([True, True, False, True])
    asym = torch.tensor([[1.0, 0.5], [0.0, 1.0]], dtype=DT)
    return [
        ("prior.dynamics", lambda: info_filter(p._replace(dynamics=torch.eye(D + 1, dtype=DT)), J, h)),
        ("prior.dynamics", lambda: info_filter(p._replace(time_varying=True), J, h)),
        ("prior.noise_cov", lambda: info_filter(p._replace(noise_cov=-torch.eye(D, dtype=DT)), J, h)),
        ("prior.initial_cov", lambda: info_filter(p._replace(initial_cov=asym), J, h)),
        ("prior.offsets", lambda: info_filter(p._replace(offsets=torch.zeros(T, D, dtype=DT)), J, h)),
        ("prior.time_varying", lambda: info_filter(p._replace(time_varying=1), J, h)),
        ("J_node", lambda: info_filter(p, J[:-1], h)),
        ("J_node", lambda: info_filter(p, -J - torch.eye(D, dtype=DT), h)),
        ("J_node", lambda: info_filter(p, J.float(), h)),
        ("h_node", lambda: info_filter(p, J, torch.full_like(h, torch.nan))),
        ("batch dims", lambda: info_filter(p, J.expand(3, T, D, D), h.expand(2, T, D))),
        ("obs_cov", lambda: log_likelihood(p, C, None, -R, y)),
        ("emission", lambda: log_likelihood(p, C, None, R, y, time_varying=True)),
        ("obs_cov", lambda: log_likelihood(p, C.expand(T, N, D), None, R, y, time_varying=True)),
        ("emission", lambda: log_likelihood(p, torch.randn(N, D + 1, dtype=DT), None, R, y)),
        ("obs_bias", lambda: log_likelihood(p, C, torch.zeros(N + 1, dtype=DT), R, y)),
        ("y", lambda: log_likelihood(p, C, None, R, nan_y)),
        ("y", lambda: log_likelihood(p, C, None, R, nan_y, mask=torch.ones(T, dtype=torch.bool))),
        ("mask", lambda: log_likelihood(p, C, None, R, y, mask=mask.float())),
        ("mask", lambda: log_likelihood(p, C, None, R, y, mask=mask[:-1])),
        ("input_matrix", lambda: with_inputs(p, torch.zeros(D + 1, 2, dtype=DT), torch.zeros(T, 2, dtype=DT))),
        ("inputs", lambda: with_inputs(p, torch.zeros(D, 2, dtype=DT), torch.zeros(T, 3, dtype=DT))),
    ]


@pytest.mark.parametrize("index", range(len(_bad_cases())))
def test_bad_input_raises_value_error_naming_the_argument(index):
    name, call = _bad_cases()[index]
    with pytest.raises(ValueError, match=name.replace(".", r"\.")):
        call()


def test_nan_in_unobserved_steps_is_allowed():
    g = torch.Generator().manual_seed(20)
    prior = random_prior(g, (), 2, 4)
    C, R = torch.randn(1, 2, dtype=DT), torch.eye(1, dtype=DT)
    y = torch.tensor([[0.3], [torch.nan], [1.0], [-0.2]], dtype=DT, requires_grad=True)
    mask = torch.tensor([True, False, True, True])
    ll = log_likelihood(prior, C, None, R, y, mask)
    y_filled = torch.nan_to_num(y.detach(), nan=123.0)
    assert torch.isfinite(ll) and torch.equal(ll, log_likelihood(prior, C, None, R, y_filled, mask))
    ll.backward()
    assert torch.isfinite(y.grad).all() and y.grad[1].item() == 0.0, "NaN leaked into the gradient"


# ----------------------------------------------------------------------------- device
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu():
    g = torch.Generator().manual_seed(21)
    D, N, T = 3, 2, 200
    prior = random_prior(g, (4,), D, T)
    C, R = torch.randn(N, D, generator=g, dtype=DT), spd(g, dim=N)
    y = torch.randn(4, T, N, generator=g, dtype=DT)
    mask = torch.rand(4, T, generator=g) < 0.8
    cpu = kalman_smoother(prior, C, None, R, y, mask)
    dev = LDSPrior(*[x.cuda() for x in prior[:5]])
    gpu = kalman_smoother(dev, C.cuda(), None, R.cuda(), y.cuda(), mask.cuda())
    for a, b in zip(cpu, gpu):
        assert b.device.type == "cuda" and torch.allclose(a, b.cpu(), atol=1e-8), "CUDA differs from CPU by > 1e-8"
    x = sample_posterior(dev, C.cuda(), None, R.cuda(), y.cuda(), mask.cuda(), (3,),
                         generator=torch.Generator(device="cuda").manual_seed(0))
    assert x.shape == (3, 4, T, D) and x.device.type == "cuda" and torch.isfinite(x).all()
