r"""Generative adversarial network: a generator network as a simulator with no density, on a ring of Gaussians.

Generative process, for n = 1..N points in the plane and a noise dimension d:

.. math::
    z_n \sim N(0, I_d), \qquad x_n = G_\theta(z_n)

(``ppl.Implicit(G, z)``: the draw of a simulator, cheap to sample, no likelihood). Data of ``simulate``:
a ring of 8 Gaussians, :math:`x \sim \frac18 \sum_k N(r(\cos 2\pi k/8, \sin 2\pi k/8), s^2 I)` with
:math:`r = 2`, :math:`s = 0.05` (the mode-collapse benchmark of Metz et al. 2017).

Shapes: ``x: (N, 2)``; ``z: (N, d)``.

Backend the compiler chooses: ``adversarial`` (rule ``implicit-simulator``: the generator is trained against
a discriminator that estimates the density ratio data / model; non-saturating GAN by default).
``mode_coverage`` measures how many of the 8 modes the samples cover and how many samples lie within
3 standard deviations of a mode.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import nn

import ppl
from ppl import dist
from ppl.primitives import ModelInputError

from . import Simulated

EXPECTED_BACKEND = "adversarial"


class MLPGenerator(nn.Module):
    """Generator :math:`G_\\theta`: ``z (..., d) -> x (..., 2)``, two ReLU hidden layers."""

    def __init__(self, noise_dim: int = 2, hidden: int = 64, out_dim: int = 2):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(noise_dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                                 nn.Linear(hidden, out_dim))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z)


def make_generator(noise_dim: int = 2, hidden: int = 64, seed: int = 0, device="cpu", dtype=torch.float32):
    """A generator initialized from ``seed`` without touching the global RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return MLPGenerator(noise_dim, hidden).to(device=device, dtype=dtype)


@ppl.model
def gan(x: torch.Tensor, generator: nn.Module, noise_dim: int = 2):
    """GAN on points ``x: (N, D)``: z_n ~ N(0, I_noise_dim), x_n = generator(z_n) (a simulator: no density)."""
    if not isinstance(x, torch.Tensor) or x.dim() != 2:
        got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ModelInputError(f"x must be (points, dims), got {got}")
    G = ppl.module("generator", generator)
    with ppl.plate("data", x.shape[0]):
        z = ppl.sample("z", dist.Normal(x.new_zeros(noise_dim), 1.0).to_event(1))
        ppl.sample("x", ppl.Implicit(G, z), obs=x)


def ring_centers(num_modes: int = 8, radius: float = 2.0, dtype=torch.float32, device="cpu") -> torch.Tensor:
    """The modes' centers ``(num_modes, 2)`` on a circle of ``radius``."""
    angle = 2 * math.pi * torch.arange(num_modes, dtype=dtype, device=device) / num_modes
    return radius * torch.stack([torch.cos(angle), torch.sin(angle)], -1)


def sample_ring(n: int, sd: float = 0.05, num_modes: int = 8, radius: float = 2.0, seed: int = 0,
                dtype=torch.float32, device="cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """``(points (n, 2), mode of each (n,))`` from the ring mixture, drawn with a generator seeded ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    modes = torch.randint(num_modes, (n,), generator=gen)
    noise = torch.randn(n, 2, generator=gen, dtype=torch.float64)
    x = ring_centers(num_modes, radius, torch.float64)[modes] + sd * noise
    return x.to(device=device, dtype=dtype), modes.to(device)


class Coverage(NamedTuple):
    """modes: how many modes hold at least ``min_share`` of the samples within 3 sd; high_quality: fraction of
    samples within 3 sd of their nearest mode; per_mode: that count per mode ``(num_modes,)``."""

    modes: int
    high_quality: float
    per_mode: torch.Tensor


def mode_coverage(samples: torch.Tensor, centers: torch.Tensor, sd: float, min_share: float = 0.01) -> Coverage:
    r"""Mode coverage of ``samples (n, 2)`` around ``centers (K, 2)`` of standard deviation ``sd``: a sample is
    high quality if it lies within :math:`3 s` of its nearest center; a mode is covered if at least
    ``min_share * n`` high-quality samples are nearest to it."""
    dist_, nearest = torch.cdist(samples.double(), centers.double()).min(-1)
    good = dist_ < 3 * sd
    per_mode = torch.bincount(nearest[good], minlength=centers.shape[0])
    return Coverage(int((per_mode >= min_share * samples.shape[0]).sum()), float(good.double().mean()), per_mode)


def simulate(seed: int = 0, N: int = 2000, sd: float = 0.05, noise_dim: int = 16, hidden: int = 128,
             device="cpu", dtype=torch.float32) -> Simulated:
    """``x: (N, 2)`` from the ring of 8 Gaussians (radius 2, sd ``sd``); an untrained generator."""
    x, modes = sample_ring(N, sd, seed=seed, dtype=dtype, device=device)
    truth = {"centers": ring_centers(dtype=dtype, device=device), "sd": sd, "modes": modes}
    return Simulated((x,), {"generator": make_generator(noise_dim, hidden, seed, device, dtype),
                            "noise_dim": noise_dim}, truth)


def infer_options(sim: Simulated) -> dict:
    """The settings of the tutorial's longest run (``tutorials/gan_ring.py``)."""
    return dict(num_steps=4000, lr=1e-3, batch_size=512, hidden=128)


def recovery_errors(post, sim: Simulated) -> dict[str, float]:
    """``missing_modes``: modes of 8 not covered by 2000 fresh draws; ``low_quality``: fraction of the draws
    farther than 3 sd from every mode."""
    draws = post.predictive(1, seed=1)["x"][0]
    cov = mode_coverage(draws, sim.truth["centers"], sim.truth["sd"])
    return {"missing_modes": float(8 - cov.modes), "low_quality": 1.0 - cov.high_quality}


# The targets: all 8 modes covered, at least 90 % of the draws within 3 sd of a mode. Measured with
# infer_options at seeds 0, 1: 8 modes, 92.7 % and 91.5 % within 3 sd (3000 steps at lr 2e-3: 93.5 % at seed 0
# but 7 modes and 79 % at seed 1).
TOLERANCES = {"missing_modes": 0.5, "low_quality": 0.10}
model = gan
