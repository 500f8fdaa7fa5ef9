r"""Local inference of the structured VAE: the latent structure's prior times recognition
potentials, solved by exact message passing or structured mean field.

Recognition potentials on a latent Gaussian node x are
:math:`\psi(x) = \exp(-\tfrac12 x^\top J x + h^\top x)` (``J: (..., D, D)``, ``h: (..., D)``).
Each function returns a ``Local``: a reparameterized sample ``x`` from q(x), the KL
:math:`\mathrm{KL}(q \,\|\, p)` of the local latents (summed over batch and time), and the
posterior summaries kept for the Posterior (means, discrete marginals).

- ``lds_local``: :math:`q(x) \propto p(x \mid \theta)\,\psi(x)` is exact (Kalman);
  :math:`\mathrm{KL} = \mathbb{E}_q[\log\psi(x)] - \log Z`.
- ``gaussian_local``: a single Gaussian node (a VAE's prior), exact.
- ``mixture_local``: z ~ Cat(pi), x | z ~ N(mu_z, Lambda_z^{-1}); mean field q(z) q(x) with
  coordinate updates, as in Johnson et al. (2016).
- ``slds_local`` (in ``slds.py``): switching LDS by structured mean field q(z) q(x).
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch

from ..exact.kalman_info import LDSPrior, filter_result, prepare, run_filter, sample, smooth
from .lds_banded import banded_lds_local, use_banded


class Local(NamedTuple):
    r"""x: sample ``(..., D)`` or ``(..., T, D)``; kl: scalar; mean: E_q[x]; probs: q(z) or None;
    moments: for a chain asked for them (``lds_local(moments=True)``), ``(cov (..., T, D, D), cross (..., T-1, D, D))``
    = :math:`(\mathrm{Cov}(x_t), \mathrm{Cov}(x_{t+1}, x_t))`, else None."""

    x: torch.Tensor
    kl: torch.Tensor
    mean: torch.Tensor
    probs: torch.Tensor | None
    moments: tuple | None = None


def expected_log_potential(J: torch.Tensor, h: torch.Tensor, mean: torch.Tensor, cov: torch.Tensor) -> torch.Tensor:
    r""":math:`\mathbb{E}[-\tfrac12 x^\top J x + h^\top x]` for x ~ N(mean, cov), elementwise over batch: ``(...)``."""
    second = cov + mean.unsqueeze(-1) * mean.unsqueeze(-2)
    return -0.5 * (J * second).sum((-1, -2)) + (h * mean).sum(-1)


def lds_local(prior: LDSPrior, J: torch.Tensor, h: torch.Tensor, generator=None, method: str = "auto",
              expected=None, moments: bool = False) -> Local:
    r"""Exact q(x) of a linear-Gaussian chain under potentials ``J (..., T, D, D)``, ``h (..., T, D)``.

    ``method``: "scan" (parallel Kalman filter/smoother, :mod:`ppl.inference.exact.kalman_info`),
    "banded" (block-tridiagonal Cholesky in nested-dissection order, :mod:`.lds_banded`) or "auto": banded
    where ``lds_banded.use_banded`` allows (well-conditioned noise; on CUDA, short chains), else the scan.
    Both are exact; the KL is :math:`\mathbb{E}_q[\log\psi(x)] - \log Z` and ``x`` a reparameterized sample.

    ``expected``: ``MNIWExpectations`` of a conjugate q(A, Q) on the dynamics (:mod:`.conjugate`): q(x) is then
    :math:`\propto \exp(E_{q(A,Q)}\log p(x \mid A, Q))\,\psi(x)` and the KL is
    :math:`E_q\log q(x) - E_{q(x)q(A,Q)}\log p(x \mid A, Q)`; always solved by the banded path (the expected
    blocks are not an (A, Q) pair). ``moments``: also return ``(cov, cross)`` (banded path only).
    """
    if method not in ("auto", "scan", "banded"):
        raise ValueError(f"lds_local: method must be 'auto', 'scan' or 'banded', got {method!r}")
    if expected is not None or moments:
        if method == "scan":
            raise ValueError("lds_local: expected dynamics statistics and moments need method 'banded' or 'auto'")
        b = banded_lds_local(prior, J, h, generator, expected=expected, moments=moments)
        return Local(b.x, b.expected_log_potential.sum() - b.log_z.sum(), b.mean, None,
                     (b.cov, b.cross) if moments else None)
    if method == "banded" or (method == "auto" and use_banded(prior, h.shape[-2], h.shape[-1])):
        b = banded_lds_local(prior, J, h, generator)
        return Local(b.x, b.expected_log_potential.sum() - b.log_z.sum(), b.mean, None)
    f = run_filter(prepare(prior, J, h, check_j=False))
    log_z = filter_result(f).log_normalizer
    smoothed = smooth(f)
    x = sample(f, (), generator)
    kl = expected_log_potential(J, h, smoothed.mean, smoothed.cov).sum() - log_z.sum()
    return Local(x, kl, smoothed.mean, None)


def gaussian_posterior(prec: torch.Tensor, lin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(mean, cov, scale_tril) of N with precision ``prec (..., D, D)`` and ``prec @ mean = lin``."""
    L = torch.linalg.cholesky(prec)
    mean = torch.cholesky_solve(lin.unsqueeze(-1), L).squeeze(-1)
    eye = torch.eye(prec.shape[-1], dtype=prec.dtype, device=prec.device).expand(prec.shape)
    inv_L = torch.linalg.solve_triangular(L, eye, upper=False)
    cov = inv_L.mT @ inv_L
    return mean, cov, inv_L.mT


def _rsample(mean: torch.Tensor, tril: torch.Tensor, generator=None) -> torch.Tensor:
    eps = torch.randn(mean.shape, dtype=mean.dtype, device=mean.device, generator=generator)
    return mean + (tril @ eps.unsqueeze(-1)).squeeze(-1)


def gaussian_entropy(cov_tril: torch.Tensor) -> torch.Tensor:
    """Entropy of N(., L L^T): ``(...)``."""
    D = cov_tril.shape[-1]
    return 0.5 * D * (1 + math.log(2 * math.pi)) + cov_tril.diagonal(dim1=-2, dim2=-1).abs().log().sum(-1)


def expected_gaussian_log_density(mu: torch.Tensor, prec: torch.Tensor, mean: torch.Tensor,
                                  cov: torch.Tensor) -> torch.Tensor:
    r""":math:`\mathbb{E}_{x \sim N(mean, cov)} \log N(x \mid mu, prec^{-1})`, broadcast: ``(...)``."""
    D = mu.shape[-1]
    diff = (mean - mu).unsqueeze(-1)
    quad = (prec * cov).sum((-1, -2)) + (diff.mT @ prec @ diff).squeeze(-1).squeeze(-1)
    return 0.5 * torch.linalg.slogdet(prec)[1] - 0.5 * D * math.log(2 * math.pi) - 0.5 * quad


def gaussian_local(mu: torch.Tensor, prec: torch.Tensor, J: torch.Tensor, h: torch.Tensor, generator=None) -> Local:
    """Exact q(x) ∝ N(x | mu, prec^{-1}) psi(x) for independent nodes ``(..., D)``."""
    post_prec = prec + J
    mean, cov, tril = gaussian_posterior(post_prec, (prec @ mu.unsqueeze(-1)).squeeze(-1) + h)
    x = _rsample(mean, tril, generator)
    kl = -gaussian_entropy(tril) - expected_gaussian_log_density(mu, prec, mean, cov)
    return Local(x, kl.sum(), mean, None)


def mixture_local(log_weights: torch.Tensor, mu: torch.Tensor, prec: torch.Tensor, J: torch.Tensor,
                  h: torch.Tensor, num_iters: int = 3, generator=None, fixed_log_r: torch.Tensor | None = None) -> Local:
    r"""Mean-field q(z) q(x) for z ~ Cat(pi), x | z=k ~ N(mu_k, prec_k^{-1}), psi(x).

    ``log_weights (..., K)`` is log pi (normalized), or E_q[log pi] under a Dirichlet q(pi) (not
    normalized: the KL then counts E_q[log p(z | pi)] exactly). Shapes: ``mu (K, ..., D)``; ``prec (K, ..., D, D)``; ``J (..., D, D)``; ``h (..., D)``.
    q(z) starts at the exact marginal :math:`p(z=k \mid \psi) \propto \pi_k \int N(x|\mu_k,\Lambda_k^{-1})\psi(x)dx`;
    then ``num_iters`` coordinate updates:
    :math:`q(x) \propto \exp(\sum_k r_k \log N(x|\mu_k,\Lambda_k^{-1}))\psi(x)`,
    :math:`r_k \propto \pi_k \exp \mathbb{E}_{q(x)} \log N(x|\mu_k,\Lambda_k^{-1})`.

    ``fixed_log_r (..., K)``: q(z) held at these normalized log-probabilities (the backend's warm-up,
    ``warmup.py``); only q(x) is solved (one exact step) and the KL is that of this q(z) q(x), a valid bound.
    """
    log_pi = log_weights
    if fixed_log_r is not None:
        r = fixed_log_r.exp()
    else:
        r = (log_pi + _component_evidence(mu, prec, J, h).movedim(0, -1)).softmax(-1)
    for _ in range(1 if fixed_log_r is not None else max(1, num_iters)):
        rk = r.movedim(-1, 0)
        post_prec = (rk[..., None, None] * prec).sum(0) + J
        lin = (rk[..., None] * (prec @ mu.unsqueeze(-1)).squeeze(-1)).sum(0) + h
        mean, cov, tril = gaussian_posterior(post_prec, lin)
        expected = expected_gaussian_log_density(mu, prec, mean, cov).movedim(0, -1)  # (..., K)
        if fixed_log_r is None:
            r = (log_pi + expected).softmax(-1)
    x = _rsample(mean, tril, generator)
    log_r = (log_pi + expected).log_softmax(-1) if fixed_log_r is None else fixed_log_r
    kl = (r * (log_r - log_pi - expected)).sum(-1) - gaussian_entropy(tril)
    return Local(x, kl.sum(), mean, r)


def diagonal_mixture_local(log_weights: torch.Tensor, mu: torch.Tensor, prec: torch.Tensor, J: torch.Tensor,
                           h: torch.Tensor, num_iters: int = 3, generator=None,
                           fixed_log_r: torch.Tensor | None = None) -> Local:
    r"""``mixture_local`` when every precision is diagonal: ``prec (K, ..., D)`` and ``J (..., D)`` hold the
    diagonals (a ``Normal(loc, scale).to_event(1)`` prior; recognition potentials are diagonal by construction,
    ``recognition.potentials``). The same updates, elementwise per dimension d:

    .. math::
        \log\!\int\! N(x|\mu_k,\Lambda_k^{-1})\psi(x)dx = \tfrac12\sum_d\Big(\log\lambda_{kd} - \log(\lambda_{kd}+J_d)
            + \frac{(\lambda_{kd}\mu_{kd}+h_d)^2}{\lambda_{kd}+J_d} - \lambda_{kd}\mu_{kd}^2\Big),\quad
        q(x) = N\Big(\frac{\sum_k r_k\lambda_k\mu_k + h}{\sum_k r_k\lambda_k + J},
                     \mathrm{diag}\frac{1}{\sum_k r_k\lambda_k + J}\Big),

        E_{q(x)}\log N(x|\mu_k,\Lambda_k^{-1}) = \tfrac12\sum_d\big(\log\lambda_{kd} - \log 2\pi
            - \lambda_{kd}((m_d-\mu_{kd})^2 + v_d)\big).

    No batched D x D factorizations (their forward and backward dominated a step; measured a whole training step
    85 -> 48 ms of CPU on ``bench/bench_svae_gmm.py``'s warped data, N = 2000, K = 4, D = 2, one thread).
    Returns the same ``Local`` as ``mixture_local`` on the equivalent full matrices (tested)."""
    log_pi = log_weights
    if fixed_log_r is not None:
        r = fixed_log_r.exp()
    else:
        post = prec + J
        lin = prec * mu + h
        evidence = 0.5 * (prec.log() - post.log() + lin ** 2 / post - prec * mu ** 2).sum(-1)   # (K, ...)
        r = (log_pi + evidence.movedim(0, -1)).softmax(-1)
    for _ in range(1 if fixed_log_r is not None else max(1, num_iters)):
        rk = r.movedim(-1, 0)[..., None]
        post_prec = (rk * prec).sum(0) + J
        mean = ((rk * prec * mu).sum(0) + h) / post_prec
        var = 1.0 / post_prec
        expected = 0.5 * (prec.log() - math.log(2 * math.pi) - prec * ((mean - mu) ** 2 + var)).sum(-1).movedim(0, -1)
        if fixed_log_r is None:
            r = (log_pi + expected).softmax(-1)
    eps = torch.randn(mean.shape, dtype=mean.dtype, device=mean.device, generator=generator)
    x = mean + var.sqrt() * eps
    log_r = (log_pi + expected).log_softmax(-1) if fixed_log_r is None else fixed_log_r
    entropy = 0.5 * mean.shape[-1] * (1 + math.log(2 * math.pi)) - 0.5 * post_prec.log().sum(-1)
    kl = (r * (log_r - log_pi - expected)).sum(-1) - entropy
    return Local(x, kl.sum(), mean, r)


def _component_evidence(mu, prec, J, h):
    r""":math:`\log \int N(x|\mu_k,\Lambda_k^{-1}) \psi(x) dx` per component: ``(K, ...)``."""
    lin = (prec @ mu.unsqueeze(-1)).squeeze(-1) + h
    post_prec = prec + J
    L = torch.linalg.cholesky(post_prec)
    sol = torch.cholesky_solve(lin.unsqueeze(-1), L).squeeze(-1)
    log_det_post = 2 * L.diagonal(dim1=-2, dim2=-1).log().sum(-1)
    quad_prior = (mu * (prec @ mu.unsqueeze(-1)).squeeze(-1)).sum(-1)
    return 0.5 * (torch.linalg.slogdet(prec)[1] - log_det_post + (lin * sol).sum(-1) - quad_prior)
