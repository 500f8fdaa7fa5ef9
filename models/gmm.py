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

Conjugate variant ``gmm_conjugate`` (full covariance): Dirichlet weights and normal-inverse-Wishart components
with scikit-learn ``BayesianGaussianMixture``'s data-scaled default priors (``conjugate_priors``); the compiler
routes it to ``vi`` (rule ``conjugate-exponential``: variational Bayes, every update in closed form, the full
posterior q(weights) q(loc, cov) and the ELBO). Being Bayesian it may leave a component empty where the data do
not support K of them: on Fisher's iris (K = 3) its best ELBO, like scikit-learn's VB, merges versicolor and
virginica (two components hold the data), where MAP/maximum likelihood (``gmm``) separates them.
"""
from __future__ import annotations

import torch

import ppl
from ppl import dist
from ppl.primitives import ModelInputError

from . import Simulated
from ._util import best_permutation, check_positive_ints

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


def conjugate_priors(x: torch.Tensor, K: int, weight_concentration: float | None = None, mean_precision: float = 1.0,
                     degrees_of_freedom: float | None = None, covariance_prior: torch.Tensor | None = None) -> dict:
    r"""The priors of ``gmm_conjugate`` on ``x: (N, D)``, scikit-learn ``BayesianGaussianMixture``'s defaults
    (data-scaled, so they follow the data's location and scale):

    .. math::
        \pi \sim \mathrm{Dir}(\alpha 1_K),\ \alpha = 1/K; \quad
        (\mu_k, \Sigma_k) \sim NIW(\bar x, \kappa_0 = 1, \Psi_0 = \mathrm{cov}(x), \nu_0 = D),

    i.e. :math:`\Sigma_k \sim IW(\Psi_0, \nu_0)`, :math:`\mu_k \mid \Sigma_k \sim N(\bar x, \Sigma_k / \kappa_0)`.
    Each argument left None takes that default. Returns ``{"weights": Dirichlet (K,), "theta":
    NormalInverseWishart}`` (theta's batch shape is set by the model's plate). ``ModelInputError`` names a bad
    argument (x not ``(N, D)`` floating and finite with N >= 2, K not an integer >= 1, a non-positive
    hyperparameter, cov(x) singular)."""
    if not isinstance(x, torch.Tensor) or x.dim() != 2 or not x.is_floating_point():
        got = f"{tuple(x.shape)} {x.dtype}" if isinstance(x, torch.Tensor) else type(x).__name__
        raise ModelInputError(f"gmm_conjugate: x must be a floating (N, D) tensor, got {got}")
    check_positive_ints(K=K)
    N, D = x.shape
    if N < 2 or not bool(torch.isfinite(x).all()):
        raise ModelInputError(f"gmm_conjugate: x must have N >= 2 rows, all finite (the priors are scaled by its "
                              f"mean and covariance), got N = {N}, {int((~torch.isfinite(x)).sum())} non-finite")
    alpha = 1.0 / K if weight_concentration is None else weight_concentration
    df = float(D) if degrees_of_freedom is None else degrees_of_freedom
    for name, value, low in (("weight_concentration", alpha, 0.0), ("mean_precision", mean_precision, 0.0),
                             ("degrees_of_freedom", df, D - 1.0)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > low:
            raise ModelInputError(f"gmm_conjugate: {name} must be a number > {low:g}, got {value!r}")
    scale = torch.cov(x.T).reshape(D, D) if covariance_prior is None else covariance_prior
    if tuple(scale.shape) != (D, D) or not bool(torch.linalg.cholesky_ex(scale.to(x.dtype))[1] == 0):
        what = "cov(x) (a constant or collinear column?)" if covariance_prior is None else "covariance_prior"
        raise ModelInputError(f"gmm_conjugate: the prior covariance {what} must be a positive-definite ({D}, {D}) "
                              f"matrix, got shape {tuple(scale.shape)}; pass covariance_prior=")
    return {"weights": dist.Dirichlet(x.new_full((K,), float(alpha))),
            "theta": ppl.NormalInverseWishart(x.mean(0), float(mean_precision), scale.to(x), float(df))}


@ppl.model
def gmm_conjugate(x: torch.Tensor, K: int = 3, weight_concentration: float | None = None, mean_precision: float = 1.0,
                  degrees_of_freedom: float | None = None, covariance_prior: torch.Tensor | None = None):
    r"""Gaussian mixture with conjugate priors (``conjugate_priors``: scikit-learn's data-scaled defaults),
    routed to backend ``vi``:

    .. math::
        \pi \sim \mathrm{Dir}(\alpha 1_K), \quad (\mu_k, \Sigma_k) \sim NIW(\bar x, \kappa_0, \Psi_0, \nu_0), \quad
        z_n \sim \mathrm{Cat}(\pi), \quad x_n \mid z_n \sim N(\mu_{z_n}, \Sigma_{z_n}).

    Shapes: ``x: (N, D)``; ``weights: (K,)``; ``theta: (K, D, D + 1)`` (``ppl.NormalInverseWishart.unpack``:
    ``loc (K, D)``, ``cov (K, D, D)``); ``z: (N,)``. ``ppl.infer`` fits it by variational Bayes (coordinate ascent
    from k-means++ starts, closed-form updates): ``post.point`` holds q's mode (``theta``: the joint mode
    ``[Psi_k / (nu_k + D + 2) | m_k]``; ``weights``: the Dirichlet mode where every concentration is >= 1, else
    its mean); ``post.mean`` averages draws from q."""
    prior = conjugate_priors(x, K, weight_concentration, mean_precision, degrees_of_freedom, covariance_prior)
    weights = ppl.sample("weights", prior["weights"])
    with ppl.plate("components", K):
        theta = ppl.sample("theta", prior["theta"])
    loc, cov = ppl.NormalInverseWishart.unpack(theta)
    with ppl.plate("data", x.shape[0]):
        z = ppl.sample("z", dist.Categorical(weights))
        ppl.sample("x", dist.MultivariateNormal(loc[z], cov[z]), obs=x)


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
