r"""Dirichlet distribution on the (K-1)-simplex in natural-parameter form.

.. math::
    p(\pi) = \exp\big(\langle \eta, t(\pi)\rangle - A(\eta)\big), \qquad t(\pi) = \log \pi, \qquad
    \eta = \alpha - 1,

    A(\eta) = \sum_{k=1}^{K} \log\Gamma(\alpha_k) - \log\Gamma\Big(\sum_k \alpha_k\Big), \qquad
    E[\log \pi_k] = \nabla_{\eta_k} A = \psi(\alpha_k) - \psi\Big(\sum_j \alpha_j\Big),

with the density taken w.r.t. Lebesgue measure on the first K-1 coordinates of the simplex (as
``torch.distributions.Dirichlet``). Conjugate to the categorical: with counts
:math:`c_k = \sum_n [z_n = k]` (:func:`ppl.expfam.categorical.counts`), the posterior is
:math:`\eta' = \eta + c`, and :math:`\log p(z_{1:N}) = A(\eta + c) - A(\eta)` (:func:`conjugate_update`).

Shapes: ``natparam: (*batch, states)``; values ``pi: (*sample, *batch, states)``.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from ..checks import as_tensor, check_finite, check_greater, check_same_shape, check_trailing
from ._common import kl_from_parts, pair


class DirichletParams(NamedTuple):
    """Standard parameters: ``concentration: (*batch, states)``, positive (alpha)."""
    concentration: Tensor


def _concentration(natparam: Tensor, name: str = "natparam") -> Tensor:
    natparam = as_tensor(name, natparam)
    check_trailing(name, natparam, (None,), "(*batch, states)")
    check_finite(name, natparam)
    check_greater(name, natparam, -1.0, "> -1 (concentration alpha = natparam + 1 > 0)")
    return natparam + 1.0


def natural_from_standard(concentration: Tensor) -> Tensor:
    r""":math:`\eta = \alpha - 1` ``(*batch, states)`` from ``concentration: (*batch, states)``, alpha > 0."""
    concentration = as_tensor("concentration", concentration)
    check_trailing("concentration", concentration, (None,), "(*batch, states)")
    check_finite("concentration", concentration)
    check_greater("concentration", concentration, 0.0, "positive")
    return concentration - 1.0


def standard_from_natural(natparam: Tensor) -> DirichletParams:
    r"""``DirichletParams(concentration = natparam + 1)``."""
    return DirichletParams(_concentration(natparam))


def log_partition(natparam: Tensor) -> Tensor:
    r""":math:`A = \sum_k \log\Gamma(\alpha_k) - \log\Gamma(\sum_k\alpha_k)`;
    ``natparam: (*batch, states)`` -> ``(*batch)``."""
    alpha = _concentration(natparam)
    return torch.lgamma(alpha).sum(-1) - torch.lgamma(alpha.sum(-1))


def expected_stats(natparam: Tensor) -> Tensor:
    r""":math:`E[\log\pi_k] = \psi(\alpha_k) - \psi(\sum_j\alpha_j)` ``(*batch, states)``."""
    alpha = _concentration(natparam)
    return torch.digamma(alpha) - torch.digamma(alpha.sum(-1, keepdim=True))


def sufficient_stats(pi: Tensor) -> Tensor:
    r""":math:`t(\pi) = \log\pi`; ``pi: (..., states)`` -> ``(..., states)``."""
    pi = as_tensor("pi", pi)
    check_trailing("pi", pi, (None,), "(..., states)")
    return pi.log()


def sample(natparam: Tensor, sample_shape: tuple = (), generator: torch.Generator | None = None) -> Tensor:
    r"""Points of the simplex ``(*sample_shape, *batch, states)`` (normalized Gamma(alpha_k, 1) draws)."""
    alpha = _concentration(natparam)
    alpha = alpha.expand(tuple(sample_shape) + tuple(alpha.shape))
    return torch._sample_dirichlet(alpha.contiguous(), generator=generator)


def log_prob(natparam: Tensor, pi: Tensor) -> Tensor:
    r""":math:`\log p(\pi) = \langle \alpha - 1, \log\pi\rangle - A`;
    ``pi: (*sample, *batch, states)`` -> ``(*sample, *batch)``."""
    alpha = _concentration(natparam)
    stats = sufficient_stats(pi)
    if stats.shape[-1] != alpha.shape[-1]:
        raise ValueError(f"pi must have {alpha.shape[-1]} states in its last dim, got shape {tuple(pi.shape)}")
    return pair([natparam], [stats], [1]) - log_partition(natparam)


def kl(natparam_q: Tensor, natparam_p: Tensor) -> Tensor:
    r""":math:`KL(q\|p) = A(\eta_p) - A(\eta_q) - \langle\eta_p - \eta_q, E_q[\log\pi]\rangle`; ``(*batch)``."""
    _concentration(natparam_q, "natparam_q")
    _concentration(natparam_p, "natparam_p")
    check_same_shape("natparam_q", natparam_q, "natparam_p", natparam_p)
    return kl_from_parts(log_partition(natparam_q), log_partition(natparam_p), [natparam_q], [natparam_p],
                         [expected_stats(natparam_q)], [1])


def conjugate_update(natparam: Tensor, counts: Tensor) -> Tensor:
    r"""Posterior natural parameter :math:`\eta + c` after observing categorical counts
    ``counts: (*batch, states)`` (nonnegative, possibly fractional: expected counts) -> ``(*batch, states)``."""
    _concentration(natparam)
    counts = as_tensor("counts", counts, natparam)
    check_finite("counts", counts)
    if counts.shape != natparam.shape:
        raise ValueError(f"counts must have the shape of natparam, {tuple(natparam.shape)}, "
                         f"got {tuple(counts.shape)}")
    if bool((counts < 0).any()):
        raise ValueError(f"counts must be nonnegative, got min {float(counts.min())}")
    return natparam + counts
