"""SVI backend: a simulated GMM's means are recovered (up to label permutation)."""
import itertools

import torch

import ppl
from ppl.models import gmm as gmm_lib


def best_permutation_error(estimate: torch.Tensor, truth: torch.Tensor) -> float:
    """Largest absolute error of ``estimate (K, D)`` vs ``truth`` under the best relabelling."""
    K = truth.shape[0]
    return min(float((estimate[list(p)] - truth).abs().max()) for p in itertools.permutations(range(K)))


def test_svi_recovers_gmm_means():
    (x,), _, params = gmm_lib.simulate(seed=4, N=400, K=3, D=2, spread=5.0)  # clusters >= 8 apart
    post = ppl.infer(gmm_lib.gmm, x, model_kwargs={"K": 3, "covariance": "full"}, backend="svi",
                     num_steps=600, lr=0.05, num_samples=200, init=gmm_lib.init_locations(x, 3), progress=False)
    assert post.plan.backend == "svi"
    # ~133 points per cluster, unit noise: each coordinate known to ~0.09; max of 6 coordinates < 0.3.
    assert best_permutation_error(post.mean("loc"), params["loc"]) < 0.3
    assert post.log_evidence.kind == "elbo" and len(post.history) == 600
    probs = post.marginals("z")
    assert probs.shape == (400, 3) and torch.allclose(probs.sum(-1), torch.ones(400), atol=1e-5)


def test_svi_delta_guide_is_map():
    """With guide='delta', the normal-normal model converges to the closed-form posterior mode."""
    torch.manual_seed(0)
    y = 3.0 + 1.5 * torch.randn(30)

    @ppl.model
    def model(y):
        mu = ppl.sample("mu", ppl.dist.Normal(1.0, 2.0))
        with ppl.plate("data", y.shape[0]):
            ppl.sample("y", ppl.dist.Normal(mu, 1.5), obs=y)

    post = ppl.infer(model, y, backend="svi", guide="delta", num_steps=800, lr=0.05, num_samples=5, progress=False)
    precision = 1 / 4 + 30 / 2.25
    mode = (1.0 / 4 + float(y.sum()) / 2.25) / precision
    assert abs(float(post.mean("mu")) - mode) < 1e-2
