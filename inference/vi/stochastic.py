r"""Stochastic natural-gradient VI (Hoffman, Blei, Wang & Paisley 2013) for the vi backend.

A conjugate global :math:`q(g)` with natural parameter :math:`\lambda` has the coordinate-ascent optimum
:math:`\hat\lambda = \eta_0 + \sum_{n=1}^N E_q[t(x_n, z_n)]` (prior plus expected sufficient statistics of all
N data units). On a minibatch :math:`B` of the units drawn uniformly without replacement, the scaled statistics
:math:`\frac{N}{|B|}\sum_{n \in B} E_q[t(x_n, z_n)]` are an unbiased estimate of the full sum, and so is
:math:`\hat\lambda_B = \eta_0 + \frac{N}{|B|}\sum_{n\in B} E_q[t]` of :math:`\hat\lambda`. The natural
gradient of the ELBO in :math:`\lambda` is :math:`\hat\lambda - \lambda`, and the update

.. math::
    \lambda_t = (1 - \rho_t)\,\lambda_{t-1} + \rho_t\,\hat\lambda_B, \qquad \rho_t = (\tau_0 + t)^{-\kappa}

(t = 1, 2, ...) is a Robbins-Monro step: it converges for :math:`\kappa \in (0.5, 1]`, :math:`\tau_0 \ge 0`.
With :math:`B` = all units and :math:`\rho = 1` it *is* the coordinate-ascent update (the step itself is
``ppl.expfam.natural_step``, shared with the SVAE).
"""
from __future__ import annotations

import math

import torch

DEFAULT_TAU0 = 10.0   # scikit-learn's learning_offset; Hoffman et al. 2010 use 1 to 1024
DEFAULT_KAPPA = 0.7   # scikit-learn's learning_decay; Hoffman et al. 2010 found 0.5-0.9 all work


def check_schedule(batch_size, tau0, kappa, num_units: int, unit: str) -> None:
    """Raise ValueError naming the option when ``batch_size`` (None or an integer in [1, num_units]), ``tau0``
    (a finite number >= 0) or ``kappa`` (in (0.5, 1], the Robbins-Monro range) is invalid."""
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int)
                                   or not 1 <= batch_size <= num_units):
        raise ValueError(f"backend 'vi': batch_size must be None (full batch) or an integer in [1, {num_units}] "
                         f"(the number of {unit}), got {batch_size!r}")
    if isinstance(tau0, bool) or not isinstance(tau0, (int, float)) or not (math.isfinite(tau0) and tau0 >= 0):
        raise ValueError(f"backend 'vi': tau0 (step size rho_t = (tau0 + t)^-kappa) must be a finite number >= 0, "
                         f"got {tau0!r}")
    if isinstance(kappa, bool) or not isinstance(kappa, (int, float)) or not 0.5 < kappa <= 1:
        raise ValueError(f"backend 'vi': kappa (step size rho_t = (tau0 + t)^-kappa) must be in (0.5, 1] for the "
                         f"steps to converge (Robbins-Monro), got {kappa!r}")


def step_size(t: int, tau0: float, kappa: float) -> float:
    r""":math:`\rho_t = (\tau_0 + t)^{-\kappa}` for step ``t >= 1`` (at most 1)."""
    return min(1.0, (tau0 + t) ** (-kappa))


def batches(num_units: int, batch_size: int, gen: torch.Generator) -> list[torch.Tensor]:
    """One pass over ``num_units`` units in minibatches of ``batch_size`` (the last may be smaller): a random
    permutation from ``gen`` cut in order, so every unit is visited once a pass; each minibatch sorted (the
    statistics do not depend on the order, and a full batch is then ``arange(num_units)`` itself)."""
    order = torch.randperm(num_units, generator=gen)
    return [b.sort().values for b in order.split(batch_size)]
