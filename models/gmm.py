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

Backend the compiler chooses: ``svi`` (z is enumerated exactly, the globals get an
AutoNormal guide; rule ``default-svi``).
"""
from __future__ import annotations

import torch

import ppl
from ppl import dist

EXPECTED_BACKEND = "svi"


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


def simulate(N: int = 500, K: int = 3, D: int = 2, seed: int = 0, spread: float = 4.0):
    """Draw a data set from known parameters: returns ``(x (N, D), z (N,), params)``."""
    gen = torch.Generator().manual_seed(seed)
    loc = spread * torch.randn(K, D, generator=gen)
    weights = torch.full((K,), 1.0 / K)
    z = torch.multinomial(weights, N, replacement=True, generator=gen)
    x = loc[z] + torch.randn(N, D, generator=gen)
    return x, z, {"loc": loc, "weights": weights}
