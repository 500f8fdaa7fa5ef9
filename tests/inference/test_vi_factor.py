"""Linear-Gaussian latent factor models in backend "vi" (``inference/vi/factor_analysis.py``) against oracles:

- loadings, offsets and noise known (plain tensors, or a conditioned loading site): the model's posterior is in
  the family, so one sweep gives the exact Gaussian posterior q(z_n) = N(m_n, Sigma) (to 1e-9) and the ELBO equals
  the exact log evidence, the dense Gaussian marginal N(mu + W m0, W Sigma0 W^T + Psi) (to 1e-8 relative), with
  diagonal and full noise and a correlated, non-centred prior on z;
- W and Psi known, offset latent with a Normal prior: (z, offset) is jointly Gaussian, and mean-field VB on a
  Gaussian recovers its exact posterior mean (to 1e-6 after convergence);
- factor analysis (``models/cca.py``, noise="diag"): the log-likelihood of the fitted point is within 0.002
  nats/point of scikit-learn's FactorAnalysis maximum (measured 1.6e-4 on seed 0), and not above it;
- the objective (ELBO + log prior of the point-estimated noise) never decreases, its terms sum to it;
- the row-by-row and the joint q(B) updates agree on a diagonal noise; a shared HalfNormal noise scale ends at its
  closed-form MAP given q (to 1e-6 relative);
- routing and explain(); posterior draws; errors that name the site.
"""
import math
import warnings

import pytest
import torch
from torch.distributions import MultivariateNormal

import ppl
from ppl import dist
from ppl.inference.vi import factor_analysis as F
from ppl.inference.vi.cavi import ELBODecreased
from ppl.models import cca

D64 = torch.float64


def structure_of(model, args, kwargs=None) -> F.FactorStructure:
    plan = ppl.compile(model, *args, **(kwargs or {}))
    return F.analyse(model, args, kwargs or {}, plan.facts, plan.graph)


@ppl.model
def known_views(x1, x2, W1, W2, mu1, mu2, T1, T2, z_loc, z_cov):
    """Two views with known loadings, offsets and noise Cholesky factors; z ~ N(z_loc, z_cov)."""
    with ppl.plate("data", x1.shape[0]):
        z = ppl.sample("z", dist.MultivariateNormal(z_loc, z_cov))
        ppl.sample("x1", dist.MultivariateNormal(z @ W1.T + mu1, scale_tril=T1), obs=x1)
        ppl.sample("x2", dist.Normal(z @ W2.T + mu2, T2.diagonal()).to_event(1), obs=x2)


def known_data(full: bool, seed=0, N=30, D1=4, D2=3, k=2):
    gen = torch.Generator().manual_seed(seed)
    W1, W2 = torch.randn(D1, k, generator=gen, dtype=D64), torch.randn(D2, k, generator=gen, dtype=D64)
    mu1, mu2 = torch.randn(D1, generator=gen, dtype=D64), torch.randn(D2, generator=gen, dtype=D64)
    A = torch.randn(D1, D1, generator=gen, dtype=D64)
    T1 = torch.linalg.cholesky(A @ A.T / D1 + 0.3 * torch.eye(D1, dtype=D64)) if full else \
        torch.diag(0.5 + torch.rand(D1, generator=gen, dtype=D64))
    T2 = torch.diag(0.4 + torch.rand(D2, generator=gen, dtype=D64))
    z_loc = torch.tensor([0.5, -1.0], dtype=D64)
    z_cov = torch.tensor([[1.5, 0.4], [0.4, 0.8]], dtype=D64)
    x1 = torch.randn(N, D1, generator=gen, dtype=D64) * 2
    x2 = torch.randn(N, D2, generator=gen, dtype=D64) + 1
    return (x1, x2, W1, W2, mu1, mu2, T1, T2, z_loc, z_cov)


def exact_posterior_and_evidence(x1, x2, W1, W2, mu1, mu2, T1, T2, z_loc, z_cov):
    """q(z_n) = N(m_n, Sigma) and log p(x) from the dense Gaussian of the stacked views."""
    W, mu = torch.cat([W1, W2]), torch.cat([mu1, mu2])
    psi = torch.block_diag(T1 @ T1.T, T2 @ T2.T)
    x = torch.cat([x1, x2], 1)
    prec = torch.linalg.inv(z_cov) + W.T @ torch.linalg.solve(psi, W)
    cov = torch.linalg.inv(prec)
    mean = (z_loc @ torch.linalg.inv(z_cov) + (x - mu) @ torch.linalg.solve(psi, W)) @ cov
    marginal = MultivariateNormal(mu + W @ z_loc, W @ z_cov @ W.T + psi)
    return mean, cov, float(marginal.log_prob(x).sum())


@pytest.mark.parametrize("full", [False, True])
def test_known_loadings_and_noise_give_the_exact_posterior_and_log_evidence(full):
    args = known_data(full)
    structure = structure_of(known_views, args)
    assert not structure.noise and all(not v.sites for v in structure.views)
    assert [v.diagonal for v in structure.views] == [not full, True]
    mean, cov, log_evidence = exact_posterior_and_evidence(*args)
    fit, _ = F.fit(structure, 5, 0.0, 1, 0, False)
    assert torch.allclose(fit.state.qz.mean, mean, atol=1e-9)
    assert torch.allclose(fit.state.qz.cov, cov, atol=1e-9)
    assert fit.history[0] == pytest.approx(log_evidence, rel=1e-10)
    # through ppl.infer: the same number as log_evidence, and the plan routes the model to vi
    plan = ppl.compile(known_views, *args)
    assert plan.backend == "vi", plan.explain()
    post = ppl.infer(known_views, *args, progress=False, num_samples=10)
    assert float(post.log_evidence) == pytest.approx(log_evidence, rel=1e-8)
    assert torch.allclose(post.point["z"], mean, atol=1e-8)


@ppl.model
def conditioned_loading(x, mu, T):
    """One view whose loading is a site (conditioned to a value in the test)."""
    W = ppl.sample("W", dist.Normal(torch.zeros(x.shape[1], 2, dtype=x.dtype), 2.0).to_event(2))
    with ppl.plate("data", x.shape[0]):
        z = ppl.sample("z", dist.Normal(torch.zeros(2, dtype=x.dtype), 1.0).to_event(1))
        ppl.sample("x", dist.MultivariateNormal(z @ W.T + mu, scale_tril=T), obs=x)


def test_a_conditioned_loading_is_fixed_and_its_log_prior_a_constant_term():
    x1, _, W1, _, mu1, _, T1, _, _, _ = known_data(True)
    model = ppl.condition(conditioned_loading, {"W": W1})
    structure = structure_of(model, (x1, mu1, T1))
    fit, _ = F.fit(structure, 3, 0.0, 1, 0, False)
    eye = torch.eye(2, dtype=D64)
    _, _, log_evidence = exact_posterior_and_evidence(x1, x1[:, :0], W1, W1[:0], mu1, mu1[:0], T1, T1[:0, :0],
                                                      torch.zeros(2, dtype=D64), eye)
    log_prior = float(torch.distributions.Normal(0.0, 2.0).log_prob(W1).sum())
    assert fit.history[0] == pytest.approx(log_evidence + log_prior, rel=1e-10)


@ppl.model
def latent_offset(x, W, T, prior_scale: float = 2.0):
    """W and the noise known, the offset latent with a Normal prior."""
    mu = ppl.sample("mu", dist.Normal(torch.zeros(x.shape[1], dtype=x.dtype), prior_scale).to_event(1))
    with ppl.plate("data", x.shape[0]):
        z = ppl.sample("z", dist.Normal(torch.zeros(W.shape[1], dtype=x.dtype), 1.0).to_event(1))
        ppl.sample("x", dist.MultivariateNormal(z @ W.T + mu, scale_tril=T), obs=x)


@pytest.mark.parametrize("full", [False, True])
def test_mean_field_recovers_the_exact_posterior_mean_of_a_latent_offset(full):
    x, _, W, _, _, _, T, _, _, _ = known_data(full, N=20)
    structure = structure_of(latent_offset, (x, W, T))
    assert structure.views[0].sites == ("mu",)
    fit, _ = F.fit(structure, 2000, 1e-14, 1, 0, False)
    # exact: x_n ~ N(mu, C) given mu, C = W W^T + Psi; mu ~ N(0, 4 I)
    C_inv = torch.linalg.inv(W @ W.T + T @ T.T)
    prec = torch.eye(x.shape[1], dtype=D64) / 4.0 + x.shape[0] * C_inv
    exact = torch.linalg.solve(prec, C_inv @ x.sum(0))
    assert torch.allclose(fit.state.qb[0].mean[:, 2], exact, atol=1e-6)


@pytest.mark.parametrize("noise", ["diag", "full"])
def test_the_objective_never_decreases_and_its_terms_sum_to_it(noise):
    sim = cca.simulate(seed=1, N=150, noise=noise)
    structure = structure_of(cca.model, sim.args, sim.kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ELBODecreased)
        fit = F.coordinate_ascent(structure, F.initial_state(structure, 1, torch.Generator().manual_seed(0)), 40,
                                  0.0)
    h = fit.history
    assert all(b >= a - 1e-9 * abs(a) for a, b in zip(h, h[1:]))
    assert h[-1] > h[0] + 1.0   # from a random start it moves
    for i in (0, len(h) - 1):
        assert sum(v[i] for v in fit.terms.values()) == pytest.approx(h[i], rel=1e-12)
    names = set(fit.terms)
    point = "scale1, scale2" if noise == "diag" else "scale1, corr_chol1, scale2, corr_chol2"
    assert {"E log p(x1)", "E log p(x2)", "-KL(z)", "-KL(loading1, loc1)", "-KL(loading2, loc2)",
            f"log p(point estimates) {point}"} == names


def test_factor_analysis_matches_scikit_learn_at_the_fitted_point():
    sklearn = pytest.importorskip("sklearn.decomposition")
    sim = cca.simulate(seed=0, noise="diag")
    structure = structure_of(cca.model, sim.args, sim.kwargs)
    fit, _ = F.fit(structure, 500, 1e-9, 1, 0, False)
    s = fit.state
    W = torch.cat([q.mean[:, :2] for q in s.qb])
    mu = torch.cat([q.mean[:, 2] for q in s.qb])
    psi = torch.cat([T.diagonal() ** 2 for T in s.trils])
    x = torch.cat(sim.args, 1).double()
    ours = float(MultivariateNormal(mu, W @ W.T + torch.diag(psi)).log_prob(x).mean())
    fa = sklearn.FactorAnalysis(2, tol=1e-10, max_iter=10000).fit(x.numpy())
    theirs = float(fa.score(x.numpy()))
    assert theirs - 0.002 < ours <= theirs + 1e-6


def test_cca_routes_to_vi_and_explain_names_each_update():
    sim = cca.simulate(seed=0, N=60)
    text = ppl.compile(cca.model, *sim.args, **sim.kwargs).explain()
    assert "backend: vi" in text
    assert "q(loading1, loc1) = MultivariateNormal: closed form from expected statistics of z" in text
    assert "jointly over the view (full noise covariance)" in text
    assert "scale1: point estimate (HalfNormal prior not conjugate), L-BFGS on the expected log joint" in text
    assert "corr_chol2: point estimate (LKJCholesky prior not conjugate)" in text
    diag = cca.simulate(seed=0, N=60, noise="diag")
    assert "row by row (diagonal noise)" in ppl.compile(cca.model, *diag.args, **diag.kwargs).explain()


def test_posterior_draws_q_for_the_conjugate_globals_and_a_point_mass_for_the_noise():
    sim = cca.simulate(seed=0, N=80, noise="full")
    post = ppl.infer(cca.model, *sim.args, model_kwargs=sim.kwargs, backend="vi", progress=False, num_samples=300,
                     restarts=1)
    draws = post.sample(300)
    assert draws["loading1"].shape == (300, 3, 2) and draws["loc2"].shape == (300, 3)
    assert draws["z"].shape == (300, 80, 2) and draws["loading1"].dtype == sim.args[0].dtype
    assert float(draws["loading1"].std(0).min()) > 0.01
    assert torch.equal(draws["scale1"], post.point["scale1"].expand(300, 3))
    assert torch.allclose(draws["loading1"].mean(0), post.point["loading1"], atol=0.05)
    h = [-v for v in post.history]
    assert all(b >= a - 1e-9 * abs(a) for a, b in zip(h, h[1:]))
    # log_evidence: the ELBO without the point estimates' log prior
    prior = post.elbo_terms["log p(point estimates) scale1, corr_chol1, scale2, corr_chol2"][-1]
    assert float(post.log_evidence) == pytest.approx(h[-1] - prior, rel=1e-12)
    assert math.isfinite(prior)


@ppl.model
def user_model(x, kind: str = "tanh"):
    """A one-view model that is not a conjugate latent factor model in the way ``kind`` says."""
    D = x.shape[1]
    prior = dist.Laplace(torch.zeros(D, 2), 1.0) if kind == "laplace" else dist.Normal(torch.zeros(D, 2), 1.0)
    W = ppl.sample("W", prior.to_event(2))
    sigma = ppl.sample("sigma", dist.HalfNormal(torch.ones(D)).to_event(1))
    with ppl.plate("data", x.shape[0]):
        z = ppl.sample("z", dist.Normal(torch.zeros(2), 1.0).to_event(1))
        loc = torch.tanh(z) @ W.T if kind == "tanh" else z @ W.T
        scale = sigma * (1 + z[..., :1].abs()) if kind == "heteroscedastic" else sigma.expand(loc.shape)
        ppl.sample("x", dist.Normal(loc, scale).to_event(1), obs=x)


@pytest.mark.parametrize("kind, message", [
    ("tanh", "site 'x': its mean is not affine in the local 'z'"),
    ("heteroscedastic", "site 'x': its covariance must be the same for every row and not depend on the local 'z'"),
    ("laplace", "site 'W': the loading of view 'x' needs a Normal prior to be conjugate"),
])
def test_a_model_that_is_not_a_conjugate_factor_model_is_refused_naming_the_site(kind, message):
    x = torch.randn(20, 3, generator=torch.Generator().manual_seed(0))
    plan = ppl.compile(user_model, x, kind=kind)
    assert plan.backend != "vi"
    assert message in plan.facts.of("vi").problem
    with pytest.raises(Exception, match=message.replace("(", r"\(").replace(")", r"\)")):
        ppl.infer(user_model, x, model_kwargs={"kind": kind}, backend="vi", progress=False)


def test_the_linear_model_runs_and_minibatches_are_refused():
    x = torch.randn(20, 3, generator=torch.Generator().manual_seed(0))
    plan = ppl.compile(user_model, x, kind="linear")
    assert plan.backend == "vi", plan.explain()
    with pytest.raises(ValueError, match="batch_size=5 .* latent factor model \\('z'\\)"):
        ppl.infer(user_model, x, model_kwargs={"kind": "linear"}, backend="vi", progress=False, batch_size=5)


def test_row_by_row_and_joint_updates_agree_on_a_diagonal_noise():
    """The row-wise q(B) (diagonal noise) and the joint one (full noise) are the same closed form when the noise is
    diagonal: one sweep each from the same start gives the same q's and terms."""
    from dataclasses import replace
    sim = cca.simulate(seed=2, N=50, noise="diag")
    structure = structure_of(cca.model, sim.args, sim.kwargs)
    joint = replace(structure, views=tuple(replace(v, diagonal=False) for v in structure.views))
    start = F.initial_state(structure, 0, torch.Generator().manual_seed(0))
    for_joint = F.State(start.qz, tuple(F.QB(q.mean, torch.zeros(q.mean.numel(), q.mean.numel(), dtype=D64))
                                        for q in start.qb), start.theta, start.trils, start.log_prior)
    a, b = F.sweep(structure, start), F.sweep(joint, for_joint)
    assert torch.allclose(a.qz.mean, b.qz.mean, atol=1e-9)
    for qa, qb in zip(a.qb, b.qb):
        assert torch.allclose(qa.mean, qb.mean, atol=1e-9)
        assert torch.allclose(torch.block_diag(*qa.cov), qb.cov, atol=1e-12)
    ta, tb = F.elbo_terms(structure, a), F.elbo_terms(joint, b)
    assert ta == pytest.approx(tb, rel=1e-9)


@ppl.model
def shared_noise_fa(x1, x2, k: int = 2):
    """A user's two-view factor analysis: loadings stored transposed (k, D), constant offsets, one HalfNormal noise
    scale shared by both views."""
    s = ppl.sample("s", dist.HalfNormal(torch.ones((), dtype=x1.dtype)))
    Wt1 = ppl.sample("Wt1", dist.Normal(torch.zeros(k, x1.shape[1], dtype=x1.dtype), 1.0).to_event(2))
    Wt2 = ppl.sample("Wt2", dist.Normal(torch.zeros(k, x2.shape[1], dtype=x1.dtype), 1.0).to_event(2))
    with ppl.plate("data", x1.shape[0]):
        z = ppl.sample("z", dist.Normal(torch.zeros(k, dtype=x1.dtype), 1.0).to_event(1))
        ppl.sample("x1", dist.Normal(z @ Wt1, s).to_event(1), obs=x1)
        ppl.sample("x2", dist.Normal(z @ Wt2 + 1.0, s).to_event(1), obs=x2)


def test_a_users_factor_model_with_transposed_loadings_and_shared_noise():
    sim = cca.simulate(seed=3, N=120, noise="diag")
    x1, x2 = (x.double() for x in sim.args)
    structure = structure_of(shared_noise_fa, (x1, x2))
    assert list(structure.noise) == ["s"]
    assert [v.loading.transposed for v in structure.views] == [True, True]
    assert [v.sites for v in structure.views] == [("Wt1",), ("Wt2",)]
    assert torch.equal(structure.views[1].offset.value, torch.ones(x2.shape[1], dtype=D64))
    post = ppl.infer(shared_noise_fa, x1, x2, progress=False, num_samples=50)
    assert post.plan.backend == "vi"
    h = [-v for v in post.history]
    assert all(b >= a - 1e-9 * abs(a) for a, b in zip(h, h[1:]))
    assert post.sample(50)["Wt1"].shape == (50, 2, 3)
    # without overrelaxation a sweep ends with the noise step, so s is then the MAP given q in closed form: with
    # r = tr R1 + tr R2 over n = N (D1 + D2) entries, maximize -n log s - r / (2 s^2) - s^2 / 2 (HalfNormal(1))
    fit = F.coordinate_ascent(structure, F.initial_state(structure, 0, torch.Generator()), 30, 0.0, overrelax=False)
    Ez, S = F.z_statistics(fit.state.qz)
    r = sum(float(F.expected_scatter(v, Ez, S, q).trace()) for v, q in zip(structure.views, fit.state.qb))
    n = x1.shape[0] * (x1.shape[1] + x2.shape[1])
    s2 = (-n + math.sqrt(n * n + 4 * r)) / 2
    assert float(fit.state.theta["s"]) == pytest.approx(math.sqrt(s2), rel=1e-6)
