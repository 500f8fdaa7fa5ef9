r"""Gaussian mixture model (full or diagonal covariance).

Generative process, for n = 1..N data points in R^D and K components:

.. math::
    \pi \sim \mathrm{Dir}(\alpha 1_K), \quad
    \mu_k \sim N(0, s_0^2 I), \quad
    \sigma_k \sim \mathrm{HalfNormal}(s_\sigma)^{D}, \quad
    L_k \sim \mathrm{LKJCholesky}(D, \eta) \ (\text{full only}) \\
    z_n \sim \mathrm{Cat}(\pi), \quad
    x_n \mid z_n \sim N(\mu_{z_n}, \Sigma_{z_n}), \quad
    \Sigma_k = \mathrm{diag}(\sigma_k) L_k L_k^\top \mathrm{diag}(\sigma_k)

Shapes: ``x: (N, D)``; ``weights: (K,)``; ``loc: (K, D)``; ``scale: (K, D)``; ``corr_chol: (K, D, D)``;
``z: (N,)``.

Backend the compiler chooses: ``exact`` (rule ``discrete-with-globals``: z is summed out exactly, the globals
are fitted by MAP on the exact marginal likelihood with L-BFGS); ``backend="svi"`` gives an AutoNormal
posterior over the globals instead.
"""
from __future__ import annotations

import torch

import ppl
from ppl import dist

from . import Simulated
from ._util import best_permutation

EXPECTED_BACKEND = "exact"


@ppl.model
def gmm(x: torch.Tensor, K: int = 3, covariance: str = "full", prior_scale: float = 10.0):
    """Gaussian mixture of ``K`` components on ``x: (N, D)``; ``covariance`` is "full" or "diag"."""
    if covariance not in ("full", "diag"):
        raise ValueError(f"covariance must be 'full' or 'diag', got {covariance!r}")
    N, D = x.shape
    weights = ppl.sample("weights", dist.Dirichlet(x.new_ones(K)))
    with ppl.plate("components", K):
        loc = ppl.sample("loc", dist.Normal(x.new_zeros(D), prior_scale).to_event(1))
        scale = ppl.sample("scale", dist.HalfNormal(x.new_ones(D)).to_event(1))
        if covariance == "full":
            corr = ppl.sample("corr_chol", dist.LKJCholesky(D, x.new_tensor(2.0)))
            tril = scale.unsqueeze(-1) * corr
        else:
            tril = torch.diag_embed(scale)
    with ppl.plate("data", N):
        z = ppl.sample("z", dist.Categorical(weights))
        ppl.sample("x", dist.MultivariateNormal(loc[z], scale_tril=tril[z]), obs=x)


def init_locations(x: torch.Tensor, K: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """k-means++ seeding: ``{"loc": (K, D)}`` data points spread out, to break label symmetry."""
    gen = torch.Generator().manual_seed(seed)
    centers = [x[torch.randint(x.shape[0], (1,), generator=gen)].squeeze(0)]
    for _ in range(1, K):
        d2 = torch.cdist(x, torch.stack(centers)).min(-1).values ** 2
        centers.append(x[torch.multinomial((d2 / d2.sum()).cpu(), 1, generator=gen).to(x.device)].squeeze(0))
    return {"loc": torch.stack(centers)}


def simulate(seed: int = 0, N: int = 400, K: int = 3, D: int = 2, spread: float = 4.0) -> Simulated:
    """Draw ``x: (N, D)`` from K unit-covariance components with means ``spread * N(0, I)``."""
    gen = torch.Generator().manual_seed(seed)
    loc = spread * torch.randn(K, D, generator=gen)
    weights = torch.full((K,), 1.0 / K)
    z = torch.multinomial(weights, N, replacement=True, generator=gen)
    x = loc[z] + torch.randn(N, D, generator=gen)
    return Simulated((x,), {"K": K, "covariance": "diag"}, {"loc": loc, "weights": weights, "z": z})


def infer_options(sim: Simulated) -> dict:
    """k-means++ starting locations (breaks the label symmetry); the rest are the backend's defaults."""
    return dict(init=init_locations(sim.args[0], sim.kwargs["K"]))


def recovery_errors(post, sim: Simulated) -> dict[str, float]:
    """Largest error of the component means and weights under the best relabelling."""
    perm = best_permutation(post.mean("loc"), sim.truth["loc"])
    return {"loc": float((post.mean("loc")[perm] - sim.truth["loc"]).abs().max()),
            "weights": float((post.mean("weights")[perm] - sim.truth["weights"]).abs().max())}


TOLERANCES = {"loc": 0.3, "weights": 0.06}  # 400 points: sd of a mean ~0.09, of a weight ~0.024
model = gmm
