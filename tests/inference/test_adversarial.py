"""Implicit (simulator) models: the discriminator as a density-ratio estimator against the closed-form ratio
of two Gaussians, a GAN / f-GAN recovering a Gaussian's parameters, the compiler's routing and errors."""
import math

import pytest
import torch

import ppl
from ppl import dist
from ppl.implicit import NoDensityError
from ppl.inference.adversarial import losses
from ppl.inference.adversarial.backend import log_density_ratio


@ppl.model
def fixed_simulator(x):
    """x_n = 1 + 0.5 z_n, z_n ~ N(0, 1): a simulator with no parameters (only the discriminator learns)."""
    with ppl.plate("data", x.shape[0]):
        z = ppl.sample("z", dist.Normal(x.new_zeros(1), 1.0).to_event(1))
        ppl.sample("x", ppl.Implicit(lambda u: 1.0 + 0.5 * u, z), obs=x)


@ppl.model
def location_scale(x):
    """x_n = loc + exp(log_scale) z_n: a two-parameter generator."""
    loc = ppl.param("loc", x.new_zeros(1))
    log_scale = ppl.param("log_scale", x.new_zeros(1))
    with ppl.plate("data", x.shape[0]):
        z = ppl.sample("z", dist.Normal(x.new_zeros(1), 1.0).to_event(1))
        ppl.sample("x", ppl.Implicit(lambda u: loc + log_scale.exp() * u, z), obs=x)


def normal_data(n, loc, scale, seed=0):
    return loc + scale * torch.randn(n, 1, generator=torch.Generator().manual_seed(seed))


def test_discriminator_estimates_the_log_density_ratio_of_two_gaussians():
    """data N(0, 1), simulator N(1, 0.5^2): log p/q is quadratic; the discriminator matches it where both
    have mass (|error| < 0.35 nats on [0, 1.75], where the ratio spans 2.7 nats)."""
    x = normal_data(4000, 0.0, 1.0)
    post = ppl.infer(fixed_simulator, x, progress=False, num_steps=400, lr=5e-3, batch_size=512)
    grid = torch.linspace(0.0, 1.75, 36).unsqueeze(-1)
    exact = (dist.Normal(0.0, 1.0).log_prob(grid) - dist.Normal(1.0, 0.5).log_prob(grid)).squeeze(-1)
    est = log_density_ratio(post, grid)
    assert float((est - exact).abs().max()) < 0.35, (est - exact)
    assert float(exact.max() - exact.min()) > 2.0


@pytest.mark.parametrize("divergence", ["gan", "kl"])
def test_generator_recovers_a_gaussian(divergence):
    x = normal_data(2000, 2.0, 0.5)
    post = ppl.infer(location_scale, x, progress=False, num_steps=300, lr=0.03, batch_size=256,
                     divergence=divergence)
    loc, scale = float(post.params["loc"]), float(post.params["log_scale"].exp())
    assert abs(loc - 2.0) < 0.15 and abs(scale - 0.5) < 0.15, (divergence, loc, scale)
    draws = post.predictive(1, seed=3)["x"][0]
    assert abs(float(draws.mean()) - 2.0) < 0.2
    assert len(post.elbo_terms["discriminator"]) == 300 and math.isnan(float(post.log_evidence))


def test_losses_are_optimal_at_the_true_ratio():
    """At fixed samples of N(0, 1) and N(0.5, 1) (equal scales: every ratio has finite variance), the
    discriminator loss is minimized by the true log ratio (perturbing it by a constant raises the loss)."""
    gen = torch.Generator().manual_seed(0)
    real = torch.randn(20000, generator=gen)
    fake = 0.5 + torch.randn(20000, generator=gen)

    def ratio(t):
        return dist.Normal(0.0, 1.0).log_prob(t) - dist.Normal(0.5, 1.0).log_prob(t)

    for div in losses.DIVERGENCES:
        shift = 1.0 if div == "kl" else 0.0  # the KL critic's optimum is 1 + log ratio
        base = losses.discriminator_loss(ratio(real) + shift, ratio(fake) + shift, div)
        for eps in (-0.3, 0.3):
            moved = losses.discriminator_loss(ratio(real) + shift + eps, ratio(fake) + shift + eps, div)
            assert float(moved) > float(base), (div, eps)
        assert torch.allclose(losses.log_density_ratio(ratio(real[:5]) + shift, div), ratio(real[:5]))


def test_plan_names_the_estimator_and_the_simulator_has_no_density():
    x = normal_data(50, 0.0, 1.0)
    plan = ppl.compile(location_scale, x)
    assert plan.backend == "adversarial" and plan.treatment("x") == "observed"
    assert "non-saturating GAN" in plan.explain() and "density ratio" in plan.explain()
    assert plan.treatment("z") == "sampled"
    with pytest.raises(NoDensityError, match="no density"):
        ppl.Implicit(lambda: torch.zeros(3, 1)).log_prob(torch.zeros(3, 1))


def test_bad_inputs_name_the_argument():
    x = normal_data(50, 0.0, 1.0)
    with pytest.raises(ValueError, match="divergence must be one of .*got 'wasserstein'"):
        ppl.infer(location_scale, x, progress=False, num_steps=1, divergence="wasserstein")
    with pytest.raises(TypeError, match="simulator must return a floating-point tensor, got dtype torch.int64"):
        ppl.Implicit(lambda: torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="batch_size must be None or an integer >= 1, got 0"):
        ppl.infer(location_scale, x, progress=False, num_steps=1, batch_size=0)


# ---- the density-ratio trick for an implicit q (adversarial variational Bayes) against the conjugate posterior ----

@ppl.model
def normal_mean(x):
    mu = ppl.sample("mu", dist.Normal(x.new_zeros(1), 1.0).to_event(1))
    with ppl.plate("data", x.shape[0]):
        ppl.sample("x", dist.Normal(mu, 1.0).to_event(1), obs=x)


def test_implicit_posterior_matches_the_conjugate_posterior():
    """mu ~ N(0, 1), x_i ~ N(mu, 1): posterior N(sum x / (N + 1), 1 / (N + 1)). q is a network of 4 noise
    variables (a simulator: no density); its mean within a quarter of a posterior sd, its sd within 25 %, the
    ELBO below log p(x) (1 nat of Monte Carlo slack) and within 1 nat of it."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))

    def implicit_guide(x):
        q = ppl.module("q_net", net)
        ppl.sample("mu", ppl.Implicit(lambda e: q(e).reshape(1), torch.randn(4, dtype=x.dtype)))

    x = 1.0 + torch.randn(20, 1, generator=torch.Generator().manual_seed(0))
    N = x.shape[0]
    mean, sd = float(x.sum() / (N + 1)), (1 / (N + 1)) ** 0.5
    log_p = float(dist.MultivariateNormal(torch.zeros(N), torch.eye(N) + torch.ones(N, N)).log_prob(x[:, 0]))
    plan = ppl.compile(normal_mean, x, backend="adversarial")
    assert plan.treatment("mu") == "guide" and "adversarial variational Bayes" in plan.explain()
    post = ppl.infer(normal_mean, x, backend="adversarial", guide=implicit_guide, progress=False, num_steps=250,
                     lr=0.01, draws=8)
    draws = post.draws["mu"].reshape(-1)
    assert abs(float(draws.mean()) - mean) < 0.25 * sd, (float(draws.mean()), mean)
    assert abs(float(draws.std()) / sd - 1) < 0.25, (float(draws.std()), sd)
    assert log_p - 1.0 < float(post.log_evidence) < log_p + 1.0, (float(post.log_evidence), log_p)


def test_a_model_with_a_density_needs_a_guide_on_the_adversarial_backend():
    x = normal_data(10, 0.0, 1.0)
    with pytest.raises(ValueError, match="pass guide="):
        ppl.infer(normal_mean, x, backend="adversarial", progress=False, num_steps=1)
