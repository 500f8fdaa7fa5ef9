"""Pieces shared by the exponential families: input checks (each a ValueError naming the
argument, the expected and the actual shape or value), the pairing :math:`\\langle\\eta, t\\rangle`,
the multivariate digamma function and the inverse-Wishart integrals used by NIW and MNIW."""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor


def as_tensor(name: str, x, like: Tensor | None = None) -> Tensor:
    """A floating tensor from ``x``: Python numbers take the dtype and device of ``like``;
    tensors must be floating point (and share ``like``'s dtype and device)."""
    if isinstance(x, (int, float)) and not isinstance(x, bool) and like is not None:
        return torch.tensor(float(x), dtype=like.dtype, device=like.device)
    if not isinstance(x, Tensor) or not x.is_floating_point():
        kind = f"a tensor of dtype {x.dtype}" if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"{name} must be a floating-point torch.Tensor, got {kind}")
    if like is not None and (x.dtype != like.dtype or x.device != like.device):
        raise ValueError(f"{name} must have dtype {like.dtype} on {like.device} (like the other inputs), "
                         f"got {x.dtype} on {x.device}")
    return x


def check_not_nan(name: str, x: Tensor, allow_neg_inf: bool = False) -> None:
    """Require no NaN and no +inf in ``x`` (and no -inf unless ``allow_neg_inf``)."""
    ok = (x < math.inf) if allow_neg_inf else torch.isfinite(x)        # NaN compares False
    if not bool(ok.all()):
        allowed = "finite or -inf" if allow_neg_inf else "finite"
        raise ValueError(f"{name} must be {allowed}, got NaN or inf in a tensor of shape {tuple(x.shape)}")


def check_event(name: str, x: Tensor, event: tuple, spelled: str) -> tuple:
    """Require ``x.shape`` to end with ``event`` (``None`` entries match any size); returns the batch shape."""
    tail = tuple(x.shape[x.dim() - len(event):]) if x.dim() >= len(event) else None
    if tail is None or not all(e is None or e == a for e, a in zip(event, tail)):
        raise ValueError(f"{name} must have shape {spelled}, got {tuple(x.shape)}")
    return tuple(x.shape[:x.dim() - len(event)])


def check_batch(name: str, x: Tensor, batch: tuple, num_event_dims: int, spelled: str) -> None:
    """Require the batch part of ``x.shape`` (all but the last ``num_event_dims``) to equal ``batch``."""
    got = tuple(x.shape[:x.dim() - num_event_dims])
    if got != tuple(batch):
        raise ValueError(f"{name} must have shape {spelled} with batch shape {tuple(batch)} "
                         f"(like the other fields), got {tuple(x.shape)}")


def scalar_field(name: str, x, like: Tensor, batch: tuple) -> Tensor:
    """A per-batch scalar parameter: a Python number is expanded to ``batch``; a tensor must
    have shape ``batch``."""
    if isinstance(x, (int, float)) and not isinstance(x, bool):
        return as_tensor(name, x, like).expand(batch)
    x = as_tensor(name, x, like)
    check_batch(name, x, batch, 0, "(*batch)")
    return x


def check_greater(name: str, x: Tensor, bound, what: str) -> None:
    """Require ``x > bound`` elementwise (``bound`` a number or a broadcastable tensor)."""
    bad = ~(x > bound)
    if bool(bad.any()):
        raise ValueError(f"{name} must be {what}, got {x[bad].flatten()[:4].tolist()} (shape {tuple(x.shape)})")


def check_symmetric(name: str, x: Tensor) -> None:
    """Require finite, symmetric ``x: (..., D, D)`` up to 1000 eps relative to its largest entry."""
    check_not_nan(name, x)
    detached = x.detach()
    scale = detached.abs().amax(dim=(-2, -1), keepdim=True).clamp_min(torch.finfo(x.dtype).tiny)
    if bool(((detached - detached.mT).abs() > 1000 * torch.finfo(x.dtype).eps * scale).any()):
        raise ValueError(f"{name} must be symmetric, got an asymmetric matrix of shape {tuple(x.shape)}")


def cholesky(name: str, x: Tensor) -> Tensor:
    """Lower Cholesky factor of a symmetric positive definite ``x: (..., D, D)``; ValueError naming
    ``name`` when ``x`` is asymmetric (beyond 1000 eps relative) or not positive definite."""
    check_symmetric(name, x)
    L, info = torch.linalg.cholesky_ex(x)
    if bool((info > 0).any()):
        raise ValueError(f"{name} must be positive definite, got a matrix of shape {tuple(x.shape)} "
                         "whose Cholesky factorization fails")
    return L


def symmetrize(x: Tensor) -> Tensor:
    """``(x + x^T) / 2`` on the last two dims."""
    return 0.5 * (x + x.mT)


def logdet_chol(L: Tensor) -> Tensor:
    """``log|L L^T|`` from the lower Cholesky factor ``L: (..., D, D)``; returns ``(...)``."""
    return 2.0 * L.diagonal(dim1=-2, dim2=-1).log().sum(-1)


def pair(eta: Sequence[Tensor], stats: Sequence[Tensor], event_dims: Sequence[int]) -> Tensor:
    """The pairing :math:`\\langle\\eta, t\\rangle = \\sum_i \\mathrm{sum}(\\eta_i \\odot t_i)`, each field
    summed over its last ``event_dims[i]`` dims (Frobenius for matrices); returns the batch shape."""
    total = 0.0
    for e, s, k in zip(eta, stats, event_dims):
        prod = e * s
        total = total + (prod.sum(dim=tuple(range(-k, 0))) if k else prod)
    return total


def kl_from_parts(a_q: Tensor, a_p: Tensor, eta_q, eta_p, stats_q, event_dims) -> Tensor:
    """:math:`KL(q\\|p) = A(\\eta_p) - A(\\eta_q) - \\langle \\eta_p - \\eta_q, E_q[t]\\rangle`."""
    diff = [ep - eq for ep, eq in zip(eta_p, eta_q)]
    return a_p - a_q - pair(diff, stats_q, event_dims)


def check_weights(weights, x: Tensor) -> Tensor:
    """Validate per-observation ``weights: (*batch, num)`` for ``x: (*batch, num, dim)``."""
    w = as_tensor("weights", weights, x)
    if w.shape != x.shape[:-1]:
        raise ValueError(f"weights must have shape (*batch, num) = {tuple(x.shape[:-1])}, got {tuple(w.shape)}")
    check_not_nan("weights", w)
    return w


def add_fieldwise(prior: tuple, stats: tuple) -> tuple:
    """``prior + stats`` field by field (two named tuples of one type); shapes must match exactly."""
    for field, a, b in zip(type(prior)._fields, prior, stats):
        if a.shape != b.shape:
            raise ValueError(f"stats.{field} must have the shape of natparam.{field}, {tuple(a.shape)}, "
                             f"got {tuple(b.shape)}")
    return type(prior)(*(a + b for a, b in zip(prior, stats)))


def check_same_batch(name_q: str, q: Tensor, name_p: str, p: Tensor) -> None:
    """Require two parameter tensors (first fields of two natural parameters) to have equal shapes."""
    if q.shape != p.shape:
        raise ValueError(f"{name_p} must have the shape of {name_q}, {tuple(q.shape)}, got {tuple(p.shape)}")


def mvdigamma(a: Tensor, p: int) -> Tensor:
    """Multivariate digamma :math:`\\psi_p(a) = \\sum_{i=1}^{p} \\psi(a + (1 - i)/2)`; ``a: (...)``."""
    offsets = -0.5 * torch.arange(p, dtype=a.dtype, device=a.device)
    return torch.digamma(a[..., None] + offsets).sum(-1)


def mvlgamma(a: Tensor, p: int) -> Tensor:
    """Multivariate log-gamma, ``a: (...)``:
    :math:`\\log\\Gamma_p(a) = \\frac{p(p-1)}{4}\\log\\pi + \\sum_{i=1}^{p}\\log\\Gamma(a + (1-i)/2)`."""
    offsets = -0.5 * torch.arange(p, dtype=a.dtype, device=a.device)
    return p * (p - 1) / 4 * math.log(math.pi) + torch.lgamma(a[..., None] + offsets).sum(-1)


def iw_log_normalizer(L_psi: Tensor, nu: Tensor) -> Tensor:
    """Log normalizer of the inverse Wishart :math:`IW(\\Psi, \\nu)` on p x p matrices,
    :math:`\\frac{\\nu p}{2}\\log 2 + \\log\\Gamma_p(\\nu/2) - \\frac{\\nu}{2}\\log|\\Psi|`.
    ``L_psi: (..., p, p)`` Cholesky factor of Psi, ``nu: (...)``; returns ``(...)``."""
    p = L_psi.shape[-1]
    return 0.5 * nu * p * math.log(2.0) + mvlgamma(0.5 * nu, p) - 0.5 * nu * logdet_chol(L_psi)


def iw_expectations(L_psi: Tensor, nu: Tensor) -> tuple[Tensor, Tensor]:
    """For :math:`Q \\sim IW(\\Psi, \\nu)`: :math:`E[Q^{-1}] = \\nu\\Psi^{-1}` ``(..., p, p)`` and
    :math:`E[\\log|Q|] = \\log|\\Psi| - p\\log 2 - \\psi_p(\\nu/2)` ``(...)``."""
    p = L_psi.shape[-1]
    prec = nu[..., None, None] * torch.cholesky_inverse(L_psi)
    logdet = logdet_chol(L_psi) - p * math.log(2.0) - mvdigamma(0.5 * nu, p)
    return prec, logdet


def sample_inverse_wishart(L_psi: Tensor, nu: Tensor, sample_shape: tuple, generator) -> Tensor:
    """Draw :math:`Q \\sim IW(\\Psi, \\nu)` by the Bartlett decomposition: with
    :math:`\\Psi = U U^T` and :math:`B` lower triangular, :math:`B_{ii}^2 \\sim \\chi^2_{\\nu - i + 1}`,
    :math:`B_{ij} \\sim N(0, 1)` (i > j), :math:`Q^{-1} = U^{-T} B B^T U^{-1}` is Wishart, so
    :math:`Q = C C^T` with :math:`C = U B^{-T}`. Returns ``(*sample_shape, ..., p, p)``."""
    p = L_psi.shape[-1]
    shape = tuple(sample_shape) + tuple(L_psi.shape[:-2])
    opts = dict(dtype=L_psi.dtype, device=L_psi.device)
    dof = nu.expand(shape)[..., None] - torch.arange(p, **opts)          # (..., p): nu - i + 1, i = 1..p
    chi2 = 2.0 * torch._standard_gamma(0.5 * dof, generator=generator)
    normals = torch.randn(shape + (p, p), generator=generator, **opts).tril(-1)
    B = normals + torch.diag_embed(chi2.sqrt())
    C = torch.linalg.solve_triangular(B.mT, L_psi.expand(shape + (p, p)), upper=True, left=False)
    return symmetrize(C @ C.mT)
