r"""Probabilistic canonical correlation analysis (Bach & Jordan 2005) and factor analysis.

Generative process, for n = 1..N paired observations x^{(1)}_n \in R^{D_1}, x^{(2)}_n \in R^{D_2}
sharing a k-dimensional latent z_n:

.. math::
    W_v \sim N(0, s_w^2)^{D_v \times k}, \quad \mu_v \sim N(0, s_0^2 I), \quad
    \sigma_v \sim \mathrm{HalfNormal}(s_\sigma)^{D_v}, \quad
    L_v \sim \mathrm{LKJCholesky}(D_v, 2)\ (\text{``full'' noise only}) \\
    z_n \sim N(0, I_k), \quad
    x^{(v)}_n \mid z_n \sim N(W_v z_n + \mu_v, \Psi_v), \quad v = 1, 2, \\
    \Psi_v = \mathrm{diag}(\sigma_v) L_v L_v^\top \mathrm{diag}(\sigma_v)\ (\text{``full'', CCA}), \quad
    \Psi_v = \mathrm{diag}(\sigma_v^2)\ (\text{``diag'', factor analysis})

Marginally [x^{(1)}; x^{(2)}] \sim N(\mu, W W^\top + \Psi) with W = [W_1; W_2] and
\Psi = \mathrm{blockdiag}(\Psi_1, \Psi_2). W is identified only up to a rotation (W R, R
orthogonal), so recovery compares the implied joint covariance W W^\top + \Psi, averaged
over posterior draws, to the truth (relative Frobenius error).

Shapes: ``x1: (N, D1)``, ``x2: (N, D2)``; ``loading1: (D1, k)``, ``loading2: (D2, k)``;
``loc1: (D1,)``, ``loc2: (D2,)``; ``scale1: (D1,)``, ``scale2: (D2,)``; ``corr_chol1: (D1, D1)``,
``corr_chol2: (D2, D2)`` (full noise); ``z: (N, k)``.

Backend the compiler chooses: ``vi`` (rule ``conjugate-exponential``: a Gaussian local whose views are affine
in it, ``inference/vi/factor_analysis.py``): variational Bayesian factor analysis (Ghahramani & Beal 2000) by
coordinate ascent, q(z_n) and q(loading_v, loc_v) Gaussian in closed form (jointly per view with the full noise,
row by row with the diagonal one), the noise sites ``scale{v}`` (HalfNormal) and ``corr_chol{v}`` (LKJ) not
conjugate, so point-estimated (L-BFGS on the expected log joint inside each sweep; their posterior draws are a
point mass). ``backend="svi"`` (AutoNormal over z and every global) also runs it.
"""
from __future__ import annotations

import torch

import ppl
from ppl import dist

from . import Simulated

EXPECTED_BACKEND = "vi"
NOISES = ("full", "diag")


def _check_inputs(x1, x2, k: int, noise: str) -> None:
    """Raise ValueError naming the argument when the data or an option is malformed."""
    if noise not in NOISES:
        raise ValueError(f"noise must be one of {NOISES}, got {noise!r}")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be an integer >= 1, got {k!r}")
    for name, x in (("x1", x1), ("x2", x2)):
        if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() != 2:
            got = (tuple(x.shape), x.dtype) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"{name} must be a floating tensor of shape (N, D), got {got}")
    if x1.shape[0] != x2.shape[0]:
        raise ValueError(f"x1 and x2 must have the same number of rows N, got {x1.shape[0]} and {x2.shape[0]}")


def _view(v: int, x: torch.Tensor, z: torch.Tensor, data, k: int, noise: str, prior_scale: float) -> None:
    """Globals of view ``v`` (loading ``(D, k)``, loc, noise) and its observation ``x: (N, D)`` in the
    plate ``data``."""
    D = x.shape[-1]
    W = ppl.sample(f"loading{v}", dist.Normal(x.new_zeros(D, k), 1.0).to_event(2))
    mu = ppl.sample(f"loc{v}", dist.Normal(x.new_zeros(D), prior_scale).to_event(1))
    sigma = ppl.sample(f"scale{v}", dist.HalfNormal(x.new_ones(D)).to_event(1))
    if noise == "full":
        corr = ppl.sample(f"corr_chol{v}", dist.LKJCholesky(D, x.new_tensor(2.0)))
        tril = sigma.unsqueeze(-1) * corr
    else:
        tril = torch.diag_embed(sigma)
    with data:
        ppl.sample(f"x{v}", dist.MultivariateNormal(z @ W.T + mu, scale_tril=tril), obs=x)


@ppl.model
def cca(x1: torch.Tensor, x2: torch.Tensor, k: int = 2, noise: str = "full", prior_scale: float = 10.0):
    """Probabilistic CCA (``noise="full"``) or factor analysis (``"diag"``) with a ``k``-dim shared
    latent on two views ``x1: (N, D1)``, ``x2: (N, D2)``."""
    _check_inputs(x1, x2, k, noise)
    data = ppl.plate("data", x1.shape[0])
    with data:
        z = ppl.sample("z", dist.Normal(x1.new_zeros(k), 1.0).to_event(1))
    _view(1, x1, z, data, k, noise, prior_scale)
    _view(2, x2.to(x1.dtype), z, data, k, noise, prior_scale)


def noise_covariance(scale: torch.Tensor, corr_chol: torch.Tensor | None) -> torch.Tensor:
    r"""\Psi = \mathrm{diag}(\sigma) L L^\top \mathrm{diag}(\sigma) ``(..., D, D)`` from ``scale: (..., D)``
    and ``corr_chol: (..., D, D)``; \mathrm{diag}(\sigma^2) when ``corr_chol`` is None."""
    tril = torch.diag_embed(scale) if corr_chol is None else scale.unsqueeze(-1) * corr_chol
    return tril @ tril.transpose(-1, -2)


def joint_covariance(loading1, loading2, psi1, psi2) -> torch.Tensor:
    r"""Implied covariance of [x^{(1)}; x^{(2)}]: W W^\top + \mathrm{blockdiag}(\Psi_1, \Psi_2).

    loading1: ``(..., D1, k)``, loading2: ``(..., D2, k)``, psi1: ``(..., D1, D1)``, psi2: ``(..., D2, D2)``.
    Returns ``(..., D1 + D2, D1 + D2)``.
    """
    W = torch.cat([loading1, loading2], -2)
    D1, D2 = psi1.shape[-1], psi2.shape[-1]
    psi = W.new_zeros(W.shape[:-2] + (D1 + D2, D1 + D2))
    psi[..., :D1, :D1] = psi1
    psi[..., D1:, D1:] = psi2
    return W @ W.transpose(-1, -2) + psi


def true_parameters(D1: int, D2: int, k: int, noise: str, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """Loadings with N(0, 1) entries, locs ``N(0, 2^2)``, noise sds ``0.5``; with ``noise="full"`` each
    view's noise has correlation 0.4 between neighbouring dims (``corr_chol{v}`` its Cholesky)."""
    out = {}
    for v, D in ((1, D1), (2, D2)):
        out[f"loading{v}"] = torch.randn(D, k, generator=gen)
        out[f"loc{v}"] = 2.0 * torch.randn(D, generator=gen)
        out[f"scale{v}"] = torch.full((D,), 0.5)
        if noise == "full":
            corr = torch.eye(D) + 0.4 * (torch.diag(torch.ones(D - 1), 1) + torch.diag(torch.ones(D - 1), -1))
            out[f"corr_chol{v}"] = torch.linalg.cholesky(corr)
    return out


def simulate(seed: int = 0, N: int = 400, D1: int = 3, D2: int = 3, k: int = 2, noise: str = "full") -> Simulated:
    """Draw ``x1: (N, D1)``, ``x2: (N, D2)`` from ``true_parameters`` with latents ``z: (N, k)``."""
    if noise not in NOISES:
        raise ValueError(f"noise must be one of {NOISES}, got {noise!r}")
    gen = torch.Generator().manual_seed(seed)
    truth = true_parameters(D1, D2, k, noise, gen)
    z = torch.randn(N, k, generator=gen)
    views = []
    for v, D in ((1, D1), (2, D2)):
        psi = noise_covariance(truth[f"scale{v}"], truth.get(f"corr_chol{v}"))
        eps = torch.randn(N, D, generator=gen) @ torch.linalg.cholesky(psi).T
        views.append(z @ truth[f"loading{v}"].T + truth[f"loc{v}"] + eps)
    cov = joint_covariance(truth["loading1"], truth["loading2"], *(
        noise_covariance(truth[f"scale{v}"], truth.get(f"corr_chol{v}")) for v in (1, 2)))
    return Simulated(tuple(views), {"k": k, "noise": noise}, {**truth, "z": z, "joint_cov": cov})


def init_values(x1: torch.Tensor, x2: torch.Tensor, k: int) -> dict[str, torch.Tensor]:
    r"""Starting values from the sample moments (principal-component initialization): ``loc{v}`` the
    view means, ``[loading1; loading2] = U_k \Lambda_k^{1/2}`` from the top-k eigenpairs of the joint
    sample covariance S, ``scale{v}`` the square root of the unexplained variance
    \mathrm{diag}(S - W W^\top) (floored at 0.1 \mathrm{diag}(S))."""
    x = torch.cat([x1, x2.to(x1.dtype)], -1)
    S = torch.cov(x.T)
    evals, evecs = torch.linalg.eigh(S)
    W = evecs[:, -k:] * evals[-k:].clamp_min(0).sqrt()
    resid = (S.diagonal() - (W * W).sum(-1)).clamp_min(0.1 * S.diagonal()).sqrt()
    D1 = x1.shape[-1]
    return {"loc1": x1.mean(0), "loc2": x[:, D1:].mean(0), "loading1": W[:D1], "loading2": W[D1:],
            "scale1": resid[:D1], "scale2": resid[D1:]}


def infer_options(sim: Simulated) -> dict:
    """The vi backend's defaults (principal-component start and 2 random restarts screened by a few sweeps, the
    relative tolerance 1e-6), 200 posterior draws (``recovery_errors`` uses 200)."""
    return dict(num_samples=200)


def svi_infer_options(sim: Simulated) -> dict:
    """SVI (Adam, AutoNormal; pass ``backend="svi"``) from ``init_values``: 150 steps settle the implied covariance
    (doubling them moved its error 0.108 -> 0.116 on seed 0; the ELBO still creeps down by ~0.4%, mostly the guide
    of the N local z)."""
    (x1, x2), k = sim.args, sim.kwargs["k"]
    return dict(num_steps=150, lr=0.05, num_samples=100, init=init_values(x1, x2, k))


def posterior_joint_covariance(draws: dict[str, torch.Tensor]) -> torch.Tensor:
    """Posterior mean of W W^T + Psi over draws (site -> ``(n, ...)``): ``(D1 + D2, D1 + D2)``."""
    psi = [noise_covariance(draws[f"scale{v}"], draws.get(f"corr_chol{v}")) for v in (1, 2)]
    return joint_covariance(draws["loading1"], draws["loading2"], *psi).mean(0)


def recovery_errors(post, sim: Simulated) -> dict[str, float]:
    """Relative Frobenius error of the implied joint covariance (rotation invariant) and the largest
    absolute error of the view means."""
    cov = posterior_joint_covariance(post.sample(200))
    truth = sim.truth["joint_cov"].to(cov)
    loc = torch.cat([post.mean("loc1"), post.mean("loc2")])
    true_loc = torch.cat([sim.truth["loc1"], sim.truth["loc2"]]).to(loc)
    return {"joint_cov": float(torch.linalg.norm(cov - truth) / torch.linalg.norm(truth)),
            "loc": float((loc - true_loc).abs().max())}


TOLERANCES = {
    # the sample covariance itself (N = 400 draws, 6 dims) errs by 0.09-0.16 relative Frobenius on
    # seeds 0-2; the fit tracks it (0.10-0.13) -> 0.25.
    "joint_cov": 0.25,
    # sd of a mean ~ sqrt(var / 400) with marginal variances up to ~5.3: ~0.12 -> 0.35 (3 sd).
    "loc": 0.35,
}
model = cca
