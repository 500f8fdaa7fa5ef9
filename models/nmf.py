r"""Poisson matrix factorization (Cemgil 2009; Gopalan, Hofman & Blei 2015): Bayesian NMF of counts.

Generative process, for an N x M count matrix X and K latent factors:

.. math::
    W_{nk} \sim \mathrm{Gamma}(a, b), \quad
    H_{km} \sim \mathrm{Gamma}(a, b), \quad
    X_{nm} \mid W, H \sim \mathrm{Poisson}\Big(\sum_{k=1}^{K} W_{nk} H_{km}\Big)

(Gamma with shape a and rate b.) W and H are identified only up to a common rescaling
(W D, D^{-1} H for a positive diagonal D) and a permutation of the factors, so recovery
compares the rate matrix W H, averaged over posterior draws, with the truth (relative
Frobenius error).

Shapes: ``X: (N, M)`` non-negative counts; ``W: (N, K)``; ``H: (K, M)``.

Backend the compiler chooses: ``vi`` (rule ``conjugate-exponential``: with latent sources
S_nkm ~ Poisson(W_nk H_km), X_nm = sum_k S_nkm, every mean-field update is a closed-form Gamma,
``inference/vi/nmf.py``; the ELBO, in closed form, is that of the source-augmented model).
"""
from __future__ import annotations

import torch

import ppl
from ppl import dist

from . import Simulated

EXPECTED_BACKEND = "vi"


def _check_inputs(X, K, a, b) -> None:
    """Raise ValueError naming the argument when the data or an option is malformed."""
    if isinstance(K, bool) or not isinstance(K, int) or K < 1:
        raise ValueError(f"K must be an integer >= 1, got {K!r}")
    for name, value in (("a", a), ("b", b)):
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0:
            raise ValueError(f"{name} must be a positive number, got {value!r}")
    if not isinstance(X, torch.Tensor) or X.dim() != 2:
        got = tuple(X.shape) if isinstance(X, torch.Tensor) else type(X).__name__
        raise ValueError(f"X must be a tensor of shape (N, M), got {got}")
    if not X.is_floating_point():
        raise ValueError(f"X must be a floating tensor of counts, got dtype {X.dtype}")
    bad = (X < 0) | (X != X.round())
    if bool(bad.any()):
        index = tuple(int(i) for i in bad.nonzero()[0])
        raise ValueError(f"X must hold non-negative integer counts, got X{list(index)} = {float(X[index])}")


@ppl.model
def nmf(X: torch.Tensor, K: int = 3, a: float = 1.0, b: float = 1.0):
    """Poisson factorization of counts ``X: (N, M)`` into ``W: (N, K)`` and ``H: (K, M)`` with
    Gamma(a, b) priors."""
    _check_inputs(X, K, a, b)
    N, M = X.shape
    W = ppl.sample("W", dist.Gamma(X.new_full((N, K), a), b).to_event(2))
    H = ppl.sample("H", dist.Gamma(X.new_full((K, M), a), b).to_event(2))
    ppl.sample("X", dist.Poisson(W @ H).to_event(2), obs=X)


def simulate(seed: int = 0, N: int = 60, M: int = 40, K: int = 3, a: float = 1.0, b: float = 0.5) -> Simulated:
    """Draw ``W: (N, K)``, ``H: (K, M)`` from Gamma(a, b) (mean a / b = 2, so rates W H average 12)
    and counts ``X ~ Poisson(W H): (N, M)``."""
    gen = torch.Generator().manual_seed(seed)
    W = torch._standard_gamma(torch.full((N, K), float(a)), generator=gen) / b
    H = torch._standard_gamma(torch.full((K, M), float(a)), generator=gen) / b
    X = torch.poisson(W @ H, generator=gen)
    return Simulated((X,), {"K": K, "a": a, "b": b}, {"W": W, "H": H, "rate": W @ H})


def init_values(X: torch.Tensor, K: int) -> dict[str, torch.Tensor]:
    r"""Starting factors from a rank-K truncated SVD of \sqrt{X} (absolute values, floored at 0.05),
    rescaled so that W H matches the mean count: ``{"W": (N, K), "H": (K, M)}``."""
    U, S, Vh = torch.linalg.svd(X.sqrt(), full_matrices=False)
    W = (U[:, :K] * S[:K].sqrt()).abs().clamp_min(0.05)
    H = (S[:K].sqrt()[:, None] * Vh[:K]).abs().clamp_min(0.05)
    ratio = (X.mean() / (W @ H).mean()).sqrt()
    return {"W": W * ratio, "H": H * ratio}


def infer_options(sim: Simulated) -> dict:
    """The vi backend's defaults (3 starts: NNDSVD and random, screened; at most 500 sweeps), 100 draws."""
    return dict(num_samples=100)


def relative_error(estimate: torch.Tensor, truth: torch.Tensor) -> float:
    """``||estimate - truth||_F / ||truth||_F``."""
    return float(torch.linalg.norm(estimate - truth) / torch.linalg.norm(truth))


def recovery_errors(post, sim: Simulated) -> dict[str, float]:
    """Relative Frobenius error of the posterior mean rate matrix E[W H] ``(N, M)`` (scale- and
    permutation-invariant)."""
    draws = post.sample(100)
    rate = (draws["W"] @ draws["H"]).mean(0)
    return {"rate": relative_error(rate, sim.truth["rate"].to(rate))}


TOLERANCES = {
    # 2400 counts with mean ~12 (Poisson noise ~29% per entry) inform K (N + M) = 300 parameters: the
    # fitted rates average ~sqrt(300 / 2400) of that noise, ~0.1 relative -> 0.2.
    "rate": 0.2,
}
model = nmf
