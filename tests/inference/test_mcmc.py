"""MCMC backend: NUTS on a normal-normal model matches the closed-form posterior."""
import pytest
import torch

import ppl
from tests.ppl.models_for_tests import normal_normal


def test_nuts_matches_conjugate_posterior():
    torch.manual_seed(1)
    y = 3.0 + 1.5 * torch.randn(20)
    post = ppl.infer(normal_normal, y, backend="auto", num_samples=300, warmup_steps=150, num_chains=2,
                     progress=False)
    assert post.plan.backend == "mcmc"
    precision = 1 / 2.0 ** 2 + 20 / 1.5 ** 2
    mean = (1.0 / 2.0 ** 2 + float(y.sum()) / 1.5 ** 2) / precision
    sd = precision ** -0.5
    draws = post.sample(600)["mu"]
    # 600 draws with ESS >~ 300: Monte Carlo error of the mean ~ sd/17; tolerance sd/4.
    assert abs(float(draws.mean()) - mean) < sd / 4
    assert abs(float(draws.std()) - sd) < sd * 0.2
    assert post.draws["mu"].shape == (2, 300)
    assert float(post.mcmc.r_hat["mu"]) < 1.05
    assert post.mcmc.divergences == 0


def test_nuts_enumerates_a_mixture():
    """NUTS with the discrete assignment enumerated: two well separated clusters."""
    torch.manual_seed(2)
    x = torch.cat([torch.randn(30) - 3, torch.randn(30) + 3])

    @ppl.model
    def mix(x):
        loc = ppl.sample("loc", ppl.dist.Normal(torch.tensor([-1.0, 1.0]), 5.0).to_event(1))
        with ppl.plate("data", x.shape[0]):
            z = ppl.sample("z", ppl.dist.Categorical(torch.tensor([0.5, 0.5])))
            ppl.sample("x", ppl.dist.Normal(loc[z], 1.0), obs=x)

    post = ppl.infer(mix, x, backend="mcmc", num_samples=150, num_chains=1, progress=False)
    loc = post.mean("loc")
    assert abs(float(loc[0]) + 3) < 0.6 and abs(float(loc[1]) - 3) < 0.6
    z = post.marginals("z").argmax(-1)
    assert (z[:30] == 0).all() and (z[30:] == 1).all()


def test_sampler_statistics_reach_arviz_and_seed_changes_the_draws():
    """What NUTS wrote per draw (diverging, step size, acceptance) is in post.mcmc and in ArviZ's
    sample_stats; R-hat and ESS in its attributes; infer(seed=) reaches the sampler."""
    arviz = pytest.importorskip("arviz")
    y = 1.0 + torch.randn(10)
    post = ppl.infer(normal_normal, y, num_samples=30, warmup_steps=30, num_chains=2, seed=3, progress=False)
    stats = post.mcmc.per_draw
    assert set(stats) == {"diverging", "tree_depth", "n_steps", "step_size", "accept_prob", "energy"}
    assert all(v.shape == (2, 30) for v in stats.values())
    assert bool(((stats["accept_prob"] >= 0) & (stats["accept_prob"] <= 1)).all())
    assert bool((stats["step_size"] > 0).all()) and int(stats["diverging"].sum()) == post.mcmc.divergences
    # the step size is adapted during warmup only: constant per chain afterwards
    assert bool((stats["step_size"] == stats["step_size"][:, :1]).all())
    idata = post.to_arviz()
    assert isinstance(idata, arviz.InferenceData)
    assert idata.sample_stats["diverging"].shape == (2, 30) and "step_size" in idata.sample_stats
    assert idata.attrs["r_hat_mu"] == pytest.approx(float(post.mcmc.r_hat["mu"]))
    again = ppl.infer(normal_normal, y, num_samples=30, warmup_steps=30, num_chains=2, seed=3, progress=False)
    other = ppl.infer(normal_normal, y, num_samples=30, warmup_steps=30, num_chains=2, seed=4, progress=False)
    assert torch.equal(post.draws["mu"], again.draws["mu"])
    assert not torch.equal(post.draws["mu"], other.draws["mu"])
