"""Missing data in the model library: an HMM and an LDS fitted with 20% of their observations masked.

Each model is simulated (``simulate(seed=0)``), a random 20% of the observed entries is replaced by
NaN and marked False in ``mask``, and ``ppl.infer`` (backend auto) fits the masked data. The masked
entries are marginalized (left out of the density), so the globals must still be recovered, and the
posterior-predictive mean of the masked entries (``post.predictive``: chains drawn from their exact
posterior given the observed entries, then the observations) must beat the unconditional guess, the
mean of the observed entries (per output for the LDS).
"""
import pytest
import torch

import ppl
from ppl.models import hmm, lds


def _mask_20_percent(y: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(y with NaN where missing, mask)``: each entry missing with probability 0.2."""
    mask = torch.rand(y.shape, generator=torch.Generator().manual_seed(seed)) >= 0.2
    return y.masked_fill(~mask, float("nan")), mask


def _fit_masked(module, seed_mask: int):
    sim = module.simulate(seed=0)
    (y,) = sim.args
    y_in, mask = _mask_20_percent(y, seed_mask)
    masked = sim._replace(args=(y_in,), kwargs={**sim.kwargs, "mask": mask})
    post = ppl.infer(module.model, y_in, model_kwargs=masked.kwargs, progress=False,
                     **module.infer_options(masked))
    return sim, y, mask, post


def test_hmm_with_20_percent_missing_recovers_parameters_and_imputes():
    sim, y, mask, post = _fit_masked(hmm, seed_mask=10)
    assert post.plan.backend == "exact"
    assert int((~mask).sum()) == 159  # of 800: the draw is fixed by the seed
    errors = hmm.recovery_errors(post, sim)
    # hmm.TOLERANCES were set at ~4 sd for 800 observations; 640 observed raise the sds by
    # sqrt(800 / 640) ~ 1.12, still >= 3.5 sd. Measured (mask seeds 10-12, data seeds 0-2):
    # trans <= 0.05, loc <= 0.18, scale <= 0.11.
    for key, tol in hmm.TOLERANCES.items():
        assert errors[key] < tol, f"{key}: {errors[key]:.3g} >= {tol}"
    imputed = post.predictive(200)["y"].mean(0)
    mse = float(((imputed - y)[~mask] ** 2).mean())
    unconditional = float(((y[mask].mean() - y)[~mask] ** 2).mean())
    # The states are sticky (0.8) and well separated, so the neighbours say which state a missing step
    # is likely in: measured MSE 7.3 vs 13.1 (data seed 0), 4.3-5.1 vs 9.7-10.9 (seeds 1-2). Require a
    # 25% improvement (the 200-draw Monte Carlo error of the imputed means is < 1% of the MSE).
    assert mse < 0.75 * unconditional


def test_lds_with_20_percent_missing_recovers_parameters_and_imputes():
    sim, y, mask, post = _fit_masked(lds, seed_mask=10)
    assert post.plan.backend == "exact"
    assert int((~mask).sum()) == 120  # of 600 entries (200 steps x 3 outputs)
    errors = lds.recovery_errors(post, sim)
    # lds.TOLERANCES are 3-10x the largest errors measured with all data; with 20% of the entries
    # missing the measured errors (mask seeds 10-12, data seeds 0-2) stayed within half of them
    # (largest: state_noise 0.071 of 0.15, obs_noise 0.057 of 0.1, obs_offset 0.08 of 0.35).
    for key, tol in lds.TOLERANCES.items():
        assert errors[key] < tol, f"{key}: {errors[key]:.3g} >= {tol}"
    imputed = post.predictive(200)["y"].mean(0)
    mse = float(((imputed - y)[~mask] ** 2).mean())
    column_means = torch.nanmean(y.masked_fill(~mask, float("nan")), 0)
    unconditional = float(((column_means - y)[~mask] ** 2).mean())
    # The smoothed state pins a missing entry to within the noise (obs sd 0.2-0.4 plus the state's
    # posterior sd): measured MSE 0.14-0.16, vs 12-16 for the column means (the state wanders far
    # from its mean). Require MSE below 0.5 (three times the measured) and a tenth of the baseline.
    assert mse < 0.5 and mse < 0.1 * unconditional


@pytest.mark.parametrize("module, y, bad_mask, pattern", [
    (hmm, torch.randn(2, 10), torch.ones(2, 9, dtype=torch.bool),
     r"mask must be a bool tensor of y's shape \(2, 10\)"),
    (hmm, torch.full((10,), float("nan")), None, r"y must be finite where observed"),
    (lds, torch.randn(10, 3), torch.ones(10, 2, dtype=torch.bool),
     r"mask must be a bool tensor of y's shape \(10, 3\) or \(10,\)"),
    (lds, torch.randn(10, 3), torch.ones(10, 3), r"mask must be a bool tensor.*torch.float32"),
])
def test_bad_mask_or_unmasked_nan_is_a_clear_error(module, y, bad_mask, pattern):
    with pytest.raises(ValueError, match=pattern):
        module.model(y, mask=bad_mask)
