"""Exponential families in natural-parameter form (priors and local factors of the SVAE).

Every family module exposes the same functions, named after the math:
``natural_from_standard``, ``standard_from_natural``, ``log_partition`` (A(eta), batched over
leading dims), ``expected_stats`` (E[t(x)] = grad A(eta), closed form), ``sufficient_stats``,
``sample``, ``log_prob`` and ``kl``; the conjugate priors (``dirichlet``, ``niw``, ``mniw``) add
``conjugate_update(natparam, stats)`` = natparam + stats. ``natural_step(current, target, step)`` is the
natural-gradient step ``(1 - step) * current + step * target`` of any family (on a tensor, or field by field).

- :mod:`.categorical`: t(z) = onehot(z), eta = logits.
- :mod:`.dirichlet`: t(pi) = log pi, eta = alpha - 1 (conjugate to categorical counts).
- :mod:`.gaussian`: t(x) = (-1/2 x x^T, x), eta = (J, h) (information form).
- :mod:`.niw`: normal-inverse-Wishart prior on a Gaussian's (mu, Sigma).
- :mod:`.mniw`: matrix-normal-inverse-Wishart prior on regression / LDS dynamics (A, Q).
"""
from . import categorical, dirichlet, gaussian, mniw, niw
from ._common import natural_step

__all__ = ["categorical", "dirichlet", "gaussian", "mniw", "natural_step", "niw"]
