"""The LDS-SVAE's block-tridiagonal local inference (``inference/svae/lds_banded.py``) against the
dense-Gaussian oracle and against the parallel-scan path: log Z, posterior means, the expected log
potential, the KL's gradients, the sample's distribution, and the auto dispatch."""
import pytest
import torch

from ppl.inference.exact.kalman_info import LDSPrior
from ppl.inference.svae.lds_banded import _assemble, _prior_blocks, banded_lds_local, chunk_length, use_banded
from ppl.inference.svae.local import lds_local
from tests.conftest import cuda_params
from tests.reference.dense_gaussian import potentials_posterior


def make_chain(N, T, D, time_varying=False, offsets=False, seed=0, device="cpu", dtype=torch.float64):
    """A batch of N chains sharing A, Q (rotation-like dynamics), per-chain m0, diagonal-plus-low-rank
    PSD potentials J and random h."""
    g = torch.Generator().manual_seed(seed)
    to = dict(dtype=dtype)
    A = 0.9 * torch.linalg.qr(torch.randn(D, D, generator=g, **to))[0]
    Q = 0.1 * torch.eye(D, **to) + 0.02 * torch.ones(D, D, **to)
    if time_varying:
        A = A + 0.1 * torch.randn(T - 1, D, D, generator=g, **to)
        Q = Q * (1 + torch.rand(T - 1, 1, 1, generator=g, **to))
    m0 = torch.randn(N, D, generator=g, **to)
    P0 = 2 * torch.eye(D, **to)
    b = torch.randn(N, T - 1, D, generator=g, **to) if offsets else None
    R = torch.randn(N, T, D, 1, generator=g, **to)
    J = torch.diag_embed(3 * torch.rand(N, T, D, generator=g, **to)) + R @ R.mT
    h = torch.randn(N, T, D, generator=g, **to)
    dev = lambda x: None if x is None else x.to(device)  # noqa: E731
    return LDSPrior(dev(m0), dev(P0), dev(A), dev(Q), dev(b), time_varying), dev(J), dev(h)


def oracle(prior, J, h, n):
    """Dense log Z, means (T, D), covariances (T, D, D) of chain n (float64, CPU)."""
    T, D = h.shape[-2:]
    cpu = lambda x: x.detach().double().cpu()  # noqa: E731
    A = prior.dynamics if prior.time_varying else prior.dynamics.expand(T - 1, D, D)
    Q = prior.noise_cov if prior.time_varying else prior.noise_cov.expand(T - 1, D, D)
    b = prior.offsets[n] if prior.offsets is not None else torch.zeros(T - 1, D, dtype=h.dtype, device=h.device)
    log_z, mean, cov, _, _ = potentials_posterior(cpu(prior.initial_loc[n]), cpu(prior.initial_cov), cpu(A), cpu(Q),
                                                  cpu(b), cpu(J[n]), cpu(h[n]))
    return log_z, mean, cov


@pytest.mark.parametrize("device", cuda_params())
@pytest.mark.parametrize("time_varying,offsets", [(False, False), (True, True)])
@pytest.mark.parametrize("chunk,dense_max", [(2, 0), (3, 0), (4, 0), (7, 0), (None, 0), (None, 64), (2, 64)])
def test_banded_matches_dense_oracle(device, time_varying, offsets, chunk, dense_max):
    # T = 7, D = 3 (21 dims). First-level chunks of 2 (4 chunks, one padded), 3 (3 chunks, two padded),
    # 4, 7 (one chunk: dense) and the default (4 for D = 3); dense_max 0 dissects wherever there is more
    # than one chunk, 64 makes the default path dense and the separators' chains dense. float64: agreement
    # to ~1e-12 measured; 1e-8 leaves room for other BLAS backends.
    prior, J, h = make_chain(3, 7, 3, time_varying, offsets, device=device)
    out = banded_lds_local(prior, J, h, torch.Generator(device=device).manual_seed(0), chunk, dense_max)
    for n in range(3):
        log_z, mean, cov = oracle(prior, J, h, n)
        assert abs(float(out.log_z[n]) - float(log_z)) < 1e-8
        torch.testing.assert_close(out.mean[n].cpu(), mean, atol=1e-8, rtol=0)
        Jn, hn = J[n].cpu(), h[n].cpu()
        second = cov + mean.unsqueeze(-1) * mean.unsqueeze(-2)
        elp = float(-0.5 * (Jn * second).sum() + (hn * mean).sum())
        assert abs(float(out.expected_log_potential[n]) - elp) < 1e-8


@pytest.mark.parametrize("T", [1, 2])
def test_short_chains_match_the_scan(T):
    # T = 1 (no dynamics: one block of padding) and T = 2; float64, both exact (~1e-15 measured)
    prior, J, h = make_chain(2, T, 3, seed=4)
    scan, banded = lds_local(prior, J, h, None, "scan"), lds_local(prior, J, h, None, "banded")
    assert abs(float(scan.kl) - float(banded.kl)) < 1e-9
    torch.testing.assert_close(banded.mean, scan.mean, atol=1e-10, rtol=0)


def test_kl_and_gradients_match_the_scan():
    # Both paths are exact, so KL and its gradients agree to rounding (float64, measured ~1e-14); the J
    # gradient is compared symmetrized (J enters only through its symmetric part).
    prior, J, h = make_chain(4, 9, 2, time_varying=True, offsets=True, seed=1)
    A = prior.dynamics.clone().requires_grad_()
    J, h = J.clone().requires_grad_(), h.clone().requires_grad_()
    prior = prior._replace(dynamics=A)
    grads = {}
    for method in ("scan", "banded"):
        local = lds_local(prior, J, h, None, method)
        grads[method] = (float(local.kl.detach()), *torch.autograd.grad(local.kl, (J, h, A)))
        torch.testing.assert_close(local.mean, lds_local(prior, J, h, None, "scan").mean, atol=1e-10, rtol=0)
    assert abs(grads["scan"][0] - grads["banded"][0]) < 1e-9
    sym = lambda g: 0.5 * (g + g.mT)  # noqa: E731
    torch.testing.assert_close(sym(grads["banded"][1]), sym(grads["scan"][1]), atol=1e-9, rtol=0)
    for a, b in zip(grads["banded"][2:], grads["scan"][2:]):
        torch.testing.assert_close(a, b, atol=1e-9, rtol=0)


@pytest.mark.parametrize("dense_max", [0, 40])
def test_long_chain_recursion_matches_the_scan(dense_max):
    # T = 61, D = 2 with the default chunks of 5 steps: 61 -> 13 -> 3 separators (dense_max 0: two levels
    # of dissection, then dense) or 61 -> 13 separators (26 dims <= 40: dense). Both paths exact, so the
    # KL, means and the KL's gradients (J, h, A, Q) agree to rounding (float64, ~1e-13 measured).
    prior, J, h = make_chain(3, 61, 2, time_varying=False, offsets=True, seed=5)
    A, Q = prior.dynamics.clone().requires_grad_(), prior.noise_cov.clone().requires_grad_()
    J, h = J.clone().requires_grad_(), h.clone().requires_grad_()
    prior = prior._replace(dynamics=A, noise_cov=Q)
    scan = lds_local(prior, J, h, None, "scan")
    b = banded_lds_local(prior, J, h, None, None, dense_max)
    kl = b.expected_log_potential.sum() - b.log_z.sum()
    assert abs(float(kl.detach()) - float(scan.kl.detach())) < 1e-8
    torch.testing.assert_close(b.mean, scan.mean, atol=1e-9, rtol=0)
    g_banded = torch.autograd.grad(kl, (J, h, A, Q))
    g_scan = torch.autograd.grad(scan.kl, (J, h, A, Q))
    sym = lambda g: 0.5 * (g + g.mT)  # noqa: E731
    torch.testing.assert_close(sym(g_banded[0]), sym(g_scan[0]), atol=1e-8, rtol=0)
    for a, c in zip(g_banded[1:], g_scan[1:]):
        torch.testing.assert_close(a, c, atol=1e-8, rtol=0)


def test_sample_gradient_matches_a_dense_cholesky_sample():
    # The sample is x = m + L^{-T} eps with L the Cholesky factor of the precision in the dissection order
    # (interiors of each chunk first, then the separators). Rebuilding that x from a dense float64 Cholesky
    # with the same eps and permutation checks the value and, through autograd of the dense path, the
    # hand-written backward of the factorization (x is a deterministic function of J, h, A given eps).
    # T = 7, D = 2, chunk 3, dense_max 0: chunks {0,1|2}, {3,4|5}, {6,pad|pad}; separators 2, 5, 8 form a
    # 3-step chain solved densely (T <= default chunk 5). Measured agreement ~1e-14; tolerance 1e-9.
    prior, J, h = make_chain(2, 7, 2, seed=6)
    A = prior.dynamics.clone().requires_grad_()
    J, h = J.clone().requires_grad_(), h.clone().requires_grad_()
    prior = prior._replace(dynamics=A)
    gen = torch.Generator().manual_seed(7)
    b = banded_lds_local(prior, J, h, gen, 3, 0)
    eps = torch.randn(h.shape, dtype=h.dtype, generator=torch.Generator().manual_seed(7))
    w = torch.randn(h.shape, dtype=h.dtype, generator=torch.Generator().manual_seed(8))
    g_banded = torch.autograd.grad((b.x * w).sum(), (J, h, A))
    # dense reference on the padded chain of 9 steps (pad nodes: identity precision, no coupling)
    diag, lower, hp, _ = _prior_blocks(prior, 7, 2)
    eye, zero = torch.eye(2, dtype=h.dtype), torch.zeros(2, 2, dtype=h.dtype)
    xs = []
    order = [0, 1, 3, 4, 6, 7, 2, 5, 8]
    for n in range(2):
        dg = torch.cat([diag + J[n], eye.expand(2, 2, 2)])
        lw = torch.cat([lower, zero.expand(2, 2, 2)])
        Lam = _assemble(dg, lw)
        hq = torch.cat([hp[n] + h[n], torch.zeros(2, 2, dtype=h.dtype)]).reshape(-1)
        e = torch.cat([eps[n], torch.zeros(2, 2, dtype=h.dtype)])
        # eps of the pad steps are zero in the banded path; of the real steps, in time order
        perm = torch.tensor([2 * t + i for t in order for i in range(2)])
        L = torch.linalg.cholesky(Lam[perm][:, perm])
        x_perm = torch.cholesky_solve(hq[perm].unsqueeze(-1), L).squeeze(-1) + torch.linalg.solve_triangular(
            L.mT, e.reshape(-1)[perm].unsqueeze(-1), upper=True).squeeze(-1)
        x = torch.empty_like(x_perm).index_put((perm,), x_perm)
        xs.append(x.reshape(9, 2)[:7])
    x_dense = torch.stack(xs)
    torch.testing.assert_close(b.x, x_dense, atol=1e-9, rtol=0)
    g_dense = torch.autograd.grad((x_dense * w).sum(), (J, h, A))
    sym = lambda g: 0.5 * (g + g.mT)  # noqa: E731
    torch.testing.assert_close(sym(g_banded[0]), sym(g_dense[0]), atol=1e-9, rtol=0)
    for a, c in zip(g_banded[1:], g_dense[1:]):
        torch.testing.assert_close(a, c, atol=1e-9, rtol=0)


def test_sample_has_the_posterior_distribution():
    # 20000 copies of one chain (T = 5, D = 2) in the batch: sample mean and covariance of the whole path
    # vs the dense posterior. Standard errors: mean ~ sd / 141, covariance entries ~ sd^2 * sqrt(2) / 141;
    # the bounds are 5 standard errors of the largest entry.
    prior, J, h = make_chain(1, 5, 2, seed=2)
    M = 20000
    prior = prior._replace(initial_loc=prior.initial_loc.expand(M, 2))
    out = banded_lds_local(prior, J.expand(M, 5, 2, 2), h.expand(M, 5, 2), torch.Generator().manual_seed(3), 2)
    T, D = 5, 2
    zeros = torch.zeros(T - 1, D, dtype=h.dtype)
    _, mean, _, _, full_cov = potentials_posterior(prior.initial_loc[0], prior.initial_cov,
                                                   prior.dynamics.expand(T - 1, D, D),
                                                   prior.noise_cov.expand(T - 1, D, D), zeros, J[0], h[0])
    x = out.x.reshape(M, T * D)
    mean = mean.reshape(-1)
    sd = full_cov.diagonal().sqrt().max()
    assert float((x.mean(0) - mean).abs().max()) < 5 * float(sd) / M ** 0.5
    emp = torch.cov(x.T)
    assert float((emp - full_cov).abs().max()) < 5 * 2 ** 0.5 * float(sd) ** 2 / M ** 0.5


def test_auto_dispatch_and_errors():
    prior, J, h = make_chain(2, 6, 2, dtype=torch.float32)
    assert use_banded(prior, 6, 2)
    assert chunk_length(2) == 5 and chunk_length(6) == 3 and chunk_length(10) == 2 and chunk_length(40) == 2
    with pytest.raises(ValueError, match="chunk must be >= 2 time steps, got 1"):
        banded_lds_local(prior, J, h, None, 1)
    # an ill-conditioned noise covariance (cond 1e7 > 1e-2 / float32 eps) goes to the scan, which never
    # inverts it; in float64 the same matrix is fine for the banded path
    stiff = prior._replace(noise_cov=torch.diag(torch.tensor([1.0, 1e-7])))
    assert not use_banded(stiff, 6, 2)
    assert use_banded(stiff._replace(noise_cov=stiff.noise_cov.double()), 6, 2)
    scan, auto = lds_local(stiff, J, h, None, "scan"), lds_local(stiff, J, h, None, "auto")
    torch.testing.assert_close(auto.mean, scan.mean)
    with pytest.raises(ValueError, match="method must be 'auto', 'scan' or 'banded', got 'dense'"):
        lds_local(prior, J, h, None, "dense")
    with pytest.raises(ValueError, match="not numerically positive definite"):
        banded_lds_local(prior, -100 * J, h)
