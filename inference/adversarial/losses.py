r"""Adversarial objectives: the discriminator as a density-ratio estimator (pure functions of its outputs).

A discriminator :math:`D_\omega(x) = v \in \mathbb{R}` separates data :math:`x \sim p` from simulator draws
:math:`x \sim q_\theta`. Each divergence fixes (i) the discriminator's loss, (ii) the generator's loss and
(iii) how the optimal discriminator's output reads as the log density ratio :math:`\log p(x)/q_\theta(x)`:

- ``"gan"``: non-saturating GAN (Goodfellow et al. 2014). Logistic loss
  :math:`\mathrm{softplus}(-v(x_p)) + \mathrm{softplus}(v(x_q))`; the optimal logit is
  :math:`v^* = \log p/q`; the generator minimizes :math:`\mathrm{softplus}(-v(x_q))` (i.e. maximizes
  :math:`\log \sigma(v)`, the non-saturating form).
- ``"kl"`` (f-GAN, Nowozin et al. 2016, :math:`f(u) = u \log u`, :math:`KL(p \| q)`): :math:`T = v`,
  :math:`f^*(t) = e^{t-1}`; the discriminator maximizes :math:`E_p[T] - E_q[f^*(T)]`, the generator minimizes
  :math:`-E_q[f^*(T)]`; :math:`T^* = f'(p/q) = 1 + \log p/q`, so :math:`\log p/q = v - 1`.
- ``"reverse_kl"`` (f-GAN, :math:`f(u) = -\log u`, :math:`KL(q \| p)`): :math:`T = -e^{-v}`,
  :math:`f^*(T) = -1 + v`; :math:`T^* = -q/p`, so :math:`\log p/q = v`; the generator minimizes :math:`-E_q[v]`.

Shapes: ``real (B,)``, ``fake (B,)`` discriminator outputs; losses are scalars (means over the batch).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

DIVERGENCES = {
    "gan": "non-saturating GAN (Jensen-Shannon), discriminator logit = log density ratio",
    "kl": "f-GAN with KL(data || model), discriminator output - 1 = log density ratio",
    "reverse_kl": "f-GAN with KL(model || data), discriminator output = log density ratio",
}


def check_divergence(divergence) -> None:
    """ValueError naming the option and the valid values."""
    if divergence not in DIVERGENCES:
        raise ValueError(f"backend 'adversarial': divergence must be one of {sorted(DIVERGENCES)}, got {divergence!r}")


def discriminator_loss(real: torch.Tensor, fake: torch.Tensor, divergence: str = "gan") -> torch.Tensor:
    r"""The discriminator's loss (minimized): the negated variational lower bound of the divergence."""
    if divergence == "gan":
        return F.softplus(-real).mean() + F.softplus(fake).mean()
    if divergence == "kl":
        return -real.mean() + torch.exp(fake.clamp(max=30.0) - 1.0).mean()
    if divergence == "reverse_kl":
        return torch.exp(-real.clamp(min=-30.0)).mean() + fake.mean()
    check_divergence(divergence)
    raise AssertionError("unreachable")


def generator_loss(fake: torch.Tensor, divergence: str = "gan") -> torch.Tensor:
    r"""The generator's loss (minimized) at the simulator's draws ``fake (B,)``."""
    if divergence == "gan":
        return F.softplus(-fake).mean()
    if divergence == "kl":
        return -torch.exp(fake.clamp(max=30.0) - 1.0).mean()
    if divergence == "reverse_kl":
        return -fake.mean()
    check_divergence(divergence)
    raise AssertionError("unreachable")


def log_density_ratio(output: torch.Tensor, divergence: str = "gan") -> torch.Tensor:
    r""":math:`\log p(x) / q(x)` read off the discriminator's ``output (...)`` (exact at the optimal discriminator)."""
    check_divergence(divergence)
    return output - 1.0 if divergence == "kl" else output
