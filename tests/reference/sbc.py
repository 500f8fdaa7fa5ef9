"""Simulation-based calibration (Talts, Betancourt, Simpson, Vehtari & Gelman 2018, arXiv:1804.06788).

Draw ``theta_r`` from the prior, data ``y_r`` from the model given ``theta_r``, and ``L`` (nearly independent,
thinned) posterior draws given ``y_r``. For a correct sampler the rank of ``theta_r`` among its ``L`` draws,
``#{l : theta_r^l < theta_r}``, is uniform on ``{0, ..., L}`` for every scalar parameter; a chi-square test
on the ranks grouped into ``bins`` equal bins gives a p-value.
"""
from __future__ import annotations

from typing import Callable

import torch


def ranks(truth: torch.Tensor, draws: torch.Tensor) -> torch.Tensor:
    """Rank of each true value among its draws: ``truth`` ``(R,)``, ``draws`` ``(R, L)`` -> ``(R,)`` in ``0..L``."""
    return (draws < truth.unsqueeze(-1)).sum(-1)


def uniformity_pvalue(rank: torch.Tensor, num_draws: int, bins: int) -> float:
    """Chi-square p-value that ranks ``(R,)`` in ``0..num_draws`` are uniform, grouped into ``bins`` bins of equal
    width (``num_draws + 1`` must be a multiple of ``bins``): ``X = sum_b (n_b - R/B)^2 / (R/B)`` against a
    chi-square with ``B - 1`` degrees of freedom, ``p = Q((B - 1)/2, X/2)`` (the regularized upper gamma)."""
    if (num_draws + 1) % bins:
        raise ValueError(f"num_draws + 1 = {num_draws + 1} is not a multiple of bins = {bins}")
    counts = torch.bincount(rank.long() * bins // (num_draws + 1), minlength=bins).double()
    expected = rank.numel() / bins
    stat = ((counts - expected) ** 2 / expected).sum()
    return float(torch.special.gammaincc(torch.tensor((bins - 1) / 2, dtype=torch.float64), stat / 2))


def run_sbc(sample_prior: Callable[[int, torch.Generator], dict[str, torch.Tensor]],
            simulate: Callable[[dict[str, torch.Tensor], torch.Generator], torch.Tensor],
            fit: Callable[[torch.Tensor], dict[str, torch.Tensor]], num_replications: int, seed: int = 0
            ) -> dict[str, torch.Tensor]:
    """Ranks of the true parameters: name -> ``(R,)``.

    sample_prior(R, generator): name -> ``(R,)`` scalar parameters drawn from the prior;
    simulate(theta, generator): the ``R`` data sets, one per replication (leading dim R);
    fit(data): name -> ``(R, L)`` thinned posterior draws for each data set.
    """
    gen = torch.Generator().manual_seed(seed)
    theta = sample_prior(num_replications, gen)
    draws = fit(simulate(theta, gen))
    return {name: ranks(theta[name], draws[name]) for name in theta}
