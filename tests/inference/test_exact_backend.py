"""The exact backend end to end: models in the DSL, chains marginalized, results vs oracles
(brute-force enumeration of all paths; the dense joint Gaussian)."""
import pytest
import torch

import ppl
from ppl import dist
from tests.reference.brute_force import brute_force
from tests.reference import dense_gaussian as dense
from tests.reference.log_space import forward_backward
from tests.reference.random_inputs import LEFT_RIGHT_LOC, LEFT_RIGHT_TRANS, left_right_hmm_data

K, T = 3, 6
INIT = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
TRANS = torch.tensor([[0.8, 0.1, 0.1], [0.2, 0.7, 0.1], [0.25, 0.25, 0.5]], dtype=torch.float64)
MU = torch.tensor([-2.0, 0.0, 2.5], dtype=torch.float64)


def hmm_fixed(y, mask=None):
    z = ppl.markov_chain("z", K, TRANS, INIT, length=y.shape[-1])
    ppl.sample("y", dist.Normal(MU[z], 1.0), obs=y, mask=mask)


@ppl.model
def hmm_priors(y):
    trans = ppl.sample("trans", dist.Dirichlet(torch.ones(K, K, dtype=y.dtype)).to_event(1))
    loc = ppl.sample("loc", dist.Normal(torch.zeros(K, dtype=y.dtype), 10.0).to_event(1))
    z = ppl.markov_chain("z", K, trans, INIT, length=y.shape[-1])
    ppl.sample("y", dist.Normal(loc[z], 1.0), obs=y)


def oracle(y, mask=None):
    log_lik = dist.Normal(MU, 1.0).log_prob(y.unsqueeze(-1))
    if mask is not None:
        log_lik = log_lik * mask.unsqueeze(-1)
    return brute_force(INIT.log(), TRANS.log(), log_lik)


@pytest.fixture
def y():
    torch.manual_seed(0)
    return torch.tensor([-2.1, -1.5, 0.3, 2.2, 2.9, -0.2], dtype=torch.float64)


def test_hmm_marginals_viterbi_evidence_match_brute_force(y):
    post = ppl.infer(hmm_fixed, y, progress=False)
    bf = oracle(y)
    assert post.plan.backend == "exact" and post.plan.treatment("z") == "message passing"
    assert torch.allclose(post.marginals("z"), bf.marginals, atol=1e-10)
    assert torch.equal(post.viterbi("z"), bf.map_path)
    assert abs(post.log_evidence.value - float(bf.log_normalizer)) < 1e-9
    assert post.log_evidence.kind == "exact log p(data)"


def test_hmm_exact_samples_follow_the_path_posterior(y):
    post = ppl.infer(hmm_fixed, y, progress=False)
    paths = post.sample(4000, seed=3)["z"]
    bf = oracle(y)
    top = bf.path_probs.argmax()
    freq = (paths == bf.paths[top]).all(-1).double().mean()
    p = float(bf.path_probs[top])
    assert abs(float(freq) - p) < 4 * (p * (1 - p) / 4000) ** 0.5  # 4 standard errors


def test_hmm_missing_observations_are_marginalized(y):
    mask = torch.tensor([True, True, False, True, False, True])
    y_nan = y.clone()
    y_nan[~mask] = float("nan")
    post = ppl.infer(hmm_fixed, y_nan, model_kwargs={"mask": mask}, progress=False)
    bf = oracle(y, mask.double())
    assert torch.allclose(post.marginals("z"), bf.marginals, atol=1e-10)
    assert abs(post.log_evidence.value - float(bf.log_normalizer)) < 1e-9


def test_conditioning_globals_equals_the_fixed_model(y):
    conditioned = ppl.condition(hmm_priors, {"trans": TRANS, "loc": MU})
    post = ppl.infer(conditioned, y, progress=False)
    assert post.plan.backend == "exact"
    assert torch.allclose(post.marginals("z"), oracle(y).marginals, atol=1e-10)


def test_neural_emission_on_a_discrete_chain_is_tabulated_exactly(y):
    torch.manual_seed(1)
    net = torch.nn.Sequential(torch.nn.Linear(1, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1)).double()
    for p in net.parameters():
        p.requires_grad_(False)

    def model(y):
        z = ppl.markov_chain("z", K, TRANS, INIT, length=y.shape[-1])
        loc = net(z.unsqueeze(-1).to(y.dtype)).squeeze(-1)
        ppl.sample("y", dist.Normal(loc, 1.0), obs=y)

    post = ppl.infer(model, y, progress=False)
    with torch.no_grad():
        log_lik = dist.Normal(net(torch.arange(K, dtype=y.dtype).unsqueeze(-1)).squeeze(-1), 1.0).log_prob(y.unsqueeze(-1))
    bf = brute_force(INIT.log(), TRANS.log(), log_lik)
    assert torch.allclose(post.marginals("z"), bf.marginals, atol=1e-10)


# --- linear-Gaussian chains -------------------------------------------------------------

D, N, TL = 2, 2, 7
A = torch.tensor([[0.9, 0.2], [-0.2, 0.85]], dtype=torch.float64)
Q = torch.tensor([[0.2, 0.05], [0.05, 0.15]], dtype=torch.float64)
C = torch.tensor([[1.0, 0.5], [0.0, 1.0]], dtype=torch.float64)
R = torch.tensor([[0.3, 0.1], [0.1, 0.4]], dtype=torch.float64)
M0 = torch.tensor([0.5, -0.5], dtype=torch.float64)
P0 = torch.eye(2, dtype=torch.float64)
OFFSET = torch.tensor([0.1, -0.2], dtype=torch.float64)


def lds_fixed(y, mask=None):
    x = ppl.gaussian_chain("x", D, A, Q, M0, P0, length=y.shape[-2])
    ppl.sample("y", dist.MultivariateNormal(x @ C.T + OFFSET, R), obs=y, mask=mask)


def dense_args():
    return (M0, P0, A.expand(TL - 1, D, D), Q.expand(TL - 1, D, D), torch.zeros(TL - 1, D, dtype=torch.float64),
            C.expand(TL, N, D), OFFSET.expand(TL, N), R.expand(TL, N, N))


@pytest.mark.parametrize("missing", [(), (2, 5)])
def test_lds_evidence_and_smoother_match_dense_gaussian(missing):
    torch.manual_seed(2)
    y = torch.randn(TL, N, dtype=torch.float64)
    mask = torch.ones(TL, dtype=torch.bool)
    mask[list(missing)] = False
    y_in = y.clone()
    y_in[~mask] = float("nan")
    post = ppl.infer(lds_fixed, y_in, model_kwargs={"mask": mask}, progress=False)
    assert post.plan.backend == "exact" and post.plan.treatment("x") == "message passing"
    log_p = dense.log_marginal(*dense_args(), y, mask.tolist())
    assert abs(post.log_evidence.value - float(log_p)) < 1e-8
    mean, cov, cross, _ = dense.posterior(*dense_args(), y, mask.tolist())
    assert torch.allclose(post.smoothed_means["x"], mean, atol=1e-8)
    draws = post.sample(4000, seed=1)["x"]
    assert draws.shape == (4000, TL, D)
    assert torch.allclose(draws.mean(0), mean, atol=5 * float(cov.diagonal(dim1=-2, dim2=-1).max().sqrt()) / 4000 ** 0.5)


def test_lds_imputation_beats_unconditional_mean():
    """Posterior predictive of a missing observation uses the neighbours: closer than the prior mean."""
    torch.manual_seed(3)
    x = torch.zeros(TL, D, dtype=torch.float64)
    x[0] = M0
    for t in range(1, TL):
        x[t] = A @ x[t - 1] + 0.05 * torch.randn(D, dtype=torch.float64)
    y = x @ C.T + OFFSET + 0.05 * torch.randn(TL, N, dtype=torch.float64)
    mask = torch.ones(TL, dtype=torch.bool)
    mask[3] = False
    y_in = y.clone()
    y_in[3] = float("nan")
    post = ppl.infer(lds_fixed, y_in, model_kwargs={"mask": mask}, progress=False)
    imputed = post.predictive(400)["y"][:, 3].mean(0)
    prior_mean = dense.prior_moments(*dense_args()[:5])[0].reshape(TL, D)[3] @ C.T + OFFSET
    assert (imputed - y[3]).norm() < (prior_mean - y[3]).norm()


def test_forecast_one_liner_matches_the_kalman_predictive_mean():
    """ppl.extend pads the future; the posterior predictive there is the exact forecast."""
    torch.manual_seed(4)
    y = torch.randn(TL - 2, N, dtype=torch.float64)
    y_ext, mask = ppl.extend(y, steps=2, time_dim=-2)
    assert y_ext.shape == (TL, N) and mask.tolist() == [True] * (TL - 2) + [False] * 2
    post = ppl.infer(lds_fixed, y_ext, model_kwargs={"mask": mask}, progress=False)
    forecast = post.predictive(4000)["y"][:, TL - 2:]
    mean, cov, _, _ = dense.posterior(*dense_args(), y_ext.nan_to_num(), mask.tolist())
    expected = mean[TL - 2:] @ C.T + OFFSET
    sd = (C @ cov[-1] @ C.T + R).diagonal().max().sqrt()
    assert torch.allclose(forecast.mean(0), expected, atol=5 * float(sd) / 4000 ** 0.5)


def test_extend_rejects_bad_input():
    with pytest.raises(ValueError, match="steps must be a positive integer"):
        ppl.extend(torch.zeros(3), 0)
    with pytest.raises(ValueError, match="floating-point"):
        ppl.extend(torch.zeros(3, dtype=torch.long), 2)


def test_log_evidence_excludes_sites_fixed_by_condition(y):
    conditioned = ppl.condition(hmm_priors, {"trans": TRANS, "loc": MU})
    post = ppl.infer(conditioned, y, progress=False)
    assert abs(post.log_evidence.value - float(oracle(y).log_normalizer)) < 1e-9


@ppl.model
def left_right_hmm(y):
    loc = ppl.sample("loc", dist.Normal(torch.zeros(3), 10.0).to_event(1))
    trans = LEFT_RIGHT_TRANS.float()
    z = ppl.markov_chain("z", 3, trans, initial=torch.tensor([1.0, 0.0, 0.0]), length=y.shape[-1])
    ppl.sample("y", dist.Normal(loc[z], 1.0), obs=y)


def test_map_fit_with_structural_zeros_on_a_long_chain():
    """A state that cannot be re-entered, T = 400 (the tree product from T = 256): before the fix the MAP fit
    crashed on a NaN gradient; now it runs and the marginals at the MAP are the log-space oracle's (1e-5)."""
    y = left_right_hmm_data(400).float()
    post = ppl.infer(left_right_hmm, y, backend="exact", num_steps=30, init={"loc": LEFT_RIGHT_LOC.float()},
                     progress=False)
    marg = post.marginals("z")
    assert torch.isfinite(marg).all()
    point_lik = torch.distributions.Normal(post.point["loc"].double(), 1.0).log_prob(y.double()[:, None])
    log_init = torch.tensor([0.0, -torch.inf, -torch.inf], dtype=torch.float64)
    _, ref = forward_backward(log_init, LEFT_RIGHT_TRANS.log(), point_lik)
    assert torch.allclose(marg.double(), ref, atol=1e-5)


def random_walk(T: int, seed: int = 0) -> torch.Tensor:
    """y: (T, 1) float64, a local-level random walk (state noise 0.1, obs noise 1) that wanders ~sqrt(T / 10)."""
    g = torch.Generator().manual_seed(seed)
    x = (0.1 ** 0.5 * torch.randn(T, dtype=torch.float64, generator=g)).cumsum(0)
    return (x + torch.randn(T, dtype=torch.float64, generator=g))[:, None]


def local_level(y):
    eye = torch.eye(1, dtype=y.dtype)
    x = ppl.gaussian_chain("x", 1, eye, 0.1 * eye, torch.zeros(1, dtype=y.dtype), eye, length=y.shape[-2])
    ppl.sample("y", dist.Normal(x, 1.0).to_event(2), obs=y)


def local_level_oracle(y: torch.Tensor) -> float:
    """log p(y) by the float64 innovation-form Kalman filter."""
    from ppl.inference.exact import kalman
    eye = torch.eye(1, dtype=torch.float64)
    prior = kalman.LDSPrior(torch.zeros(1, dtype=torch.float64), eye, eye, 0.1 * eye)
    return float(kalman.log_likelihood(prior, eye, None, eye, y.double()))


def test_float32_collapsed_lds_log_likelihood_at_T_100000():
    """A float32 random walk of 1e5 steps: the collapsed log-likelihood (log Z of the potentials about 0 plus
    their constant, each ~2e8 with opposite signs) was 12 nats off (27.7 via the kernels' float32 log Z);
    with the float64 accumulators and the potentials re-taken about the filtered means it is within 0.01."""
    from ppl.handlers import CollapseSpec
    from ppl.inference import chains

    y = random_walk(100_000)
    _, tables = chains._run_collapsed(local_level, (y.float(),), {}, CollapseSpec(gaussian={"x": ("y",)}))
    assert tables["x"].center is not None, "re-centered: the constant about 0 is too large for float32"
    got = chains.collapsed_log_normalizer(tables["x"])
    assert got.dtype == torch.float32
    assert abs(float(got.detach()) - local_level_oracle(y.float())) < 0.01


def test_centered_tables_equal_tables_about_zero():
    """Centering is a change of variables: same log-likelihood, smoothed means and sample law (float64)."""
    from ppl.handlers import CollapseSpec, tabulate
    from ppl.inference import chains
    from ppl.inference.exact import tables as kernels

    y = random_walk(60, seed=3)
    spec = CollapseSpec(gaussian={"x": ("y",)})
    plain = tabulate(local_level, (y,), {}, spec)["x"]
    center = kernels.gaussian_filtered_means(plain) + 0.3  # any fixed path
    centered = tabulate(local_level, (y,), {}, spec, centers={"x": center})["x"]
    assert torch.equal(centered.center, center)
    want = local_level_oracle(y)
    for table in (plain, centered):
        assert abs(float(chains.collapsed_log_normalizer(table).detach()) - want) < 1e-9
    assert torch.allclose(kernels.gaussian_posterior(centered).mean, kernels.gaussian_posterior(plain).mean,
                          atol=1e-10)
    draws = kernels.gaussian_sample(centered, 4000, torch.Generator().manual_seed(0))
    sd = kernels.gaussian_posterior(plain).cov.diagonal(dim1=-2, dim2=-1).sqrt()
    assert ((draws.mean(0) - kernels.gaussian_posterior(plain).mean).abs() < 5 * sd / 4000 ** 0.5).all()


def test_float32_exact_fit_of_a_long_random_walk_matches_float64():
    """End to end (exact backend, T = 20,000 float32): log evidence and smoothed means as in float64."""
    y = random_walk(20_000, seed=1)
    post32 = ppl.infer(local_level, y.float(), progress=False)
    assert abs(post32.log_evidence.value - local_level_oracle(y.float())) < 0.01
    post64 = ppl.infer(local_level, y.float().double(), progress=False)
    assert torch.allclose(post32.smoothed_means["x"].double(), post64.smoothed_means["x"], atol=1e-3)


@ppl.model
def local_level_noise(y):
    noise = ppl.sample("noise", dist.LogNormal(torch.zeros((), dtype=y.dtype), 1.0))
    eye = torch.eye(1, dtype=y.dtype)
    x = ppl.gaussian_chain("x", 1, eye, 0.1 * eye, torch.zeros(1, dtype=y.dtype), eye, length=y.shape[-2])
    ppl.sample("y", dist.Normal(x, noise).to_event(2), obs=y)


def test_float32_map_fit_of_a_long_random_walk_with_a_global():
    """The re-centered second tabulation runs inside the fit's trace: it must not record the global twice
    ('Multiple sample sites named noise') and must use the fit's value of it, not a prior draw."""
    from ppl.inference.exact import kalman

    y = random_walk(20_000, seed=2).float()
    post = ppl.infer(local_level_noise, y, num_steps=30, progress=False)
    noise = post.point["noise"].double()
    assert abs(float(noise) - 1.0) < 0.05
    eye = torch.eye(1, dtype=torch.float64)
    prior = kalman.LDSPrior(torch.zeros(1, dtype=torch.float64), eye, eye, 0.1 * eye)
    want = float(kalman.log_likelihood(prior, eye, None, noise ** 2 * eye, y.double()))
    assert abs(post.log_evidence.value - want) < 0.05


@ppl.model
def _poisson_hmm_event(y, rate, trans):
    z = ppl.markov_chain("z", num_states=3, transition=trans, length=y.shape[-1])
    ppl.sample("y", dist.Poisson(rate[z]).to_event(1), obs=y)     # the whole path as one event


@ppl.model
def _poisson_hmm_elementwise(y, rate, trans):
    z = ppl.markov_chain("z", num_states=3, transition=trans, length=y.shape[-1])
    ppl.sample("y", dist.Poisson(rate[z]), obs=y)


def test_a_chain_child_declared_as_one_event_over_time_is_tabulated():
    """``Poisson(rate[z]).to_event(1)`` over the path: under enumeration ``rate[z]`` has the path's shape (the
    support is expanded over every position), so the model is exact and equals the elementwise one; before,
    ``rate[z]`` was (K, 1), the event shape (1,) did not match the data and no backend could run it."""
    y = torch.tensor([0.0, 3.0, 12.0, 9.0, 1.0, 0.0, 15.0, 4.0])
    rate = torch.tensor([1.0, 5.0, 12.0])
    trans = torch.tensor([[0.8, 0.1, 0.1], [0.1, 0.8, 0.1], [0.1, 0.1, 0.8]])
    posts = [ppl.infer(m, y, model_kwargs={"rate": rate, "trans": trans}, progress=False)
             for m in (_poisson_hmm_event, _poisson_hmm_elementwise)]
    assert [p.backend for p in posts] == ["exact", "exact"]
    assert abs(posts[0].log_evidence.value - posts[1].log_evidence.value) < 1e-4
    assert torch.allclose(posts[0].marginals("z"), posts[1].marginals("z"), atol=1e-5)
