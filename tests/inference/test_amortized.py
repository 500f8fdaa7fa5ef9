"""Backend "amortized": minibatch ELBO unbiased (exact average over every batch), the fit against the closed-form
posterior of a linear-Gaussian model, routing and clear errors (data-parallel training: test_distributed.py)."""
import itertools

import pyro
import pytest
import torch

import ppl
from ppl import dist
from ppl.inference.amortized import backend as amortized
from tests.ppl import models_for_tests as M

shift = M.local_shift  # b ~ N(0, 10^2); z_n ~ N(0, 1); x_n ~ N(z_n + b, 1): q(z_n | x_n) = N((x_n - b)/2, 1/2)


@ppl.model
def positive_locals(x):
    """Locals with a positive support (a LogNormal rate per point) and a global scale."""
    s = ppl.sample("s", dist.HalfNormal(x.new_ones(())))
    with ppl.plate("data", x.shape[0]):
        rate = ppl.sample("rate", dist.LogNormal(x.new_zeros(()), s))
        ppl.sample("x", dist.Poisson(rate), obs=x)


def _objective(model, x, batch_size):
    plan = ppl.compile(model, x, backend="amortized")
    return amortized._Objective(model, (x,), {}, plan, batch_size, None, None)


@pytest.mark.parametrize("model", [shift, positive_locals])
def test_the_minibatch_elbo_is_unbiased(model):
    """N = 5, B = 2 drawn with replacement: the average of the scaled batch losses over all 25 equally likely
    batches equals the full-data loss (same global draw, the same local noise per point)."""
    x = torch.tensor([0.0, 1.0, 3.0, 2.0, 5.0], dtype=torch.float64)
    with pyro.get_param_store().scope():
        objective = _objective(model, x, 2)
        noise = {n: torch.randn((5,) + shape, dtype=torch.float64) for n, shape in objective.shapes.items()}
        pyro.set_rng_seed(1)
        full = objective.loss_on(torch.arange(5), 1.0, noise)
        batches = []
        for pair in itertools.product(range(5), repeat=2):
            index = torch.tensor(pair)
            pyro.set_rng_seed(1)
            batches.append(objective.loss_on(index, 5 / 2, {n: e[index] for n, e in noise.items()}))
    assert float(torch.stack(batches).mean().detach()) == pytest.approx(float(full.detach()), rel=1e-12)


def test_the_fit_matches_the_closed_form_posterior():
    """Integrating z: x_n ~ N(b, 2), so p(b | x) = N(~mean(x), 2/N); the optimal encoder is (x - b)/2, sd 1/sqrt 2."""
    x = 2.0 + torch.randn(1000, generator=torch.Generator().manual_seed(0)) * 2 ** 0.5
    post = ppl.infer(shift, x, num_steps=1000, lr=0.03, num_samples=200, progress=False)
    assert post.backend == "amortized"
    assert float(post.mean("b")) == pytest.approx(float(x.mean()), abs=0.06)
    assert float(post.draws["b"].std()) == pytest.approx((2 / 1000) ** 0.5, rel=0.35)
    new = torch.tensor([1.0, 2.0, 3.0])
    local = post.encode(new)["z"]
    assert torch.allclose(local.mean, (new - post.mean("b")) / 2, atol=0.25)
    assert torch.allclose(local.scale, torch.full((3,), 0.5 ** 0.5), atol=0.12)
    assert post.smoothed_means["z"].shape == (1000,)


def test_the_compiler_routes_many_local_points_here_and_says_so():
    plan = ppl.compile(shift, torch.randn(amortized.MIN_POINTS))
    assert plan.backend == "amortized" and "encoder" in plan.explain()
    assert ppl.compile(shift, torch.randn(50)).backend != "amortized"   # few points: per-point guides are cheap


def test_bad_options_and_models_are_named():
    x = torch.randn(20)
    with pytest.raises(ValueError, match="batch_size must be an integer >= 1, got 0"):
        ppl.infer(shift, x, backend="amortized", batch_size=0, progress=False)
    with pytest.raises(ValueError, match=r"encoder= names unknown site\(s\) \['w'\]"):
        ppl.infer(shift, x, backend="amortized", encoder={"w": torch.nn.Linear(1, 2)}, progress=False)

    @ppl.model
    def no_locals(y):
        mu = ppl.sample("mu", dist.Normal(0.0, 1.0))
        with ppl.plate("data", y.shape[0]):
            ppl.sample("y", dist.Normal(mu, 1.0), obs=y)

    with pytest.raises(Exception, match="no continuous latent inside a plate"):
        ppl.infer(no_locals, x, backend="amortized", progress=False)
