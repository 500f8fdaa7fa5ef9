"""Math shared by the exponential families: the pairing :math:`\\langle\\eta, t\\rangle` and the KL from
log partitions, field-wise updates of natural parameters (the conjugate update and the natural-gradient
step), the multivariate digamma / log-gamma functions and the inverse-Wishart integrals used by NIW and
MNIW. The input checks live in :mod:`ppl.checks`."""
from __future__ import annotations

import math
import operator
from typing import Sequence

import torch
from torch import Tensor

from ..checks import check_same_shape


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


def _fieldwise(fn, first: tuple, second: tuple, names: tuple[str, str]) -> tuple:
    """``fn(a, b)`` field by field on two named tuples of one type; every pair of fields must have
    equal shapes (a ValueError names the field of ``second`` that differs, ``names`` = their labels)."""
    for field, a, b in zip(type(first)._fields, first, second):
        check_same_shape(f"{names[0]}.{field}", a, f"{names[1]}.{field}", b)
    return type(first)(*(fn(a, b) for a, b in zip(first, second)))


def add_fieldwise(prior: tuple, stats: tuple) -> tuple:
    """``prior + stats`` field by field (two named tuples of one type); shapes must match exactly."""
    return _fieldwise(operator.add, prior, stats, ("natparam", "stats"))


def natural_step(current, target, step: float):
    r"""The natural-gradient step :math:`\eta \leftarrow (1-\rho)\eta + \rho\,\eta^*` of size ``step``
    (:math:`\rho`) from the natural parameter ``current`` towards the coordinate optimum ``target``: on one
    tensor, or field by field on a named tuple of natural parameters (``NIWNatural``, ``MNIWNatural``);
    shapes must match exactly and the result has them. ``step == 1`` gives ``target`` itself (the
    coordinate-ascent update, bit for bit)."""
    def blend(a: Tensor, b: Tensor) -> Tensor:
        return b if step == 1 else (1 - step) * a + step * b
    if isinstance(current, Tensor):
        check_same_shape("natparam", current, "target", target)
        return blend(current, target)
    return _fieldwise(blend, current, target, ("natparam", "target"))


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
