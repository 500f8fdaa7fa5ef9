"""The Nile local-level model (tutorials/lds_nile.py) against statsmodels' UnobservedComponents.

Oracle: statsmodels' Kalman filter / smoother for the same model with the same initial-state treatment
(exact diffuse, or a known N(m, P) prior), and its MLE maximized tightly (Nelder-Mead, xtol 1e-10).
Real data: the annual Nile flow 1871-1970 bundled with statsmodels (nothing is downloaded)."""
import importlib.util
import math
from pathlib import Path

import pytest
import torch

import ppl

pytest.importorskip("statsmodels")

_PATH = Path(__file__).resolve().parents[2] / "tutorials" / "lds_nile.py"
_spec = importlib.util.spec_from_file_location("lds_nile_tutorial", _PATH)
nile = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(nile)

DK = (15099.0, 1469.1)   # Durbin & Koopman (2012) ch. 2 MLE (sigma_v^2, sigma_w^2)


@pytest.fixture(scope="module")
def y():
    return nile.load_nile()


@pytest.fixture(scope="module")
def statsmodels_mle(y):
    return nile.statsmodels_mle(y)


def test_routed_to_exact_with_kalman_on_the_level(y):
    for kwargs in ({}, {"initial": (1000.0, 1e4)}, {"mask": ppl.extend(y, 5)[1]}):
        yy = ppl.extend(y, 5)[0] if "mask" in kwargs else y
        plan = ppl.compile(nile.local_level, yy, **kwargs)
        assert plan.backend == "exact", (kwargs, plan.explain())
        assert "Kalman" in plan.explain()


@pytest.mark.parametrize("variances", [DK, (5000.0, 300.0)])
@pytest.mark.parametrize("initial", [None, (1000.0, 1e4), (1120.0, 50.0)])
def test_log_likelihood_at_fixed_variances_matches_statsmodels(y, variances, initial):
    """Same parameters, same initial state. Diffuse start: the model's evidence is log p(y_2:n | y_1), which
    is statsmodels' exact-diffuse log-likelihood + 0.5 log 2 pi (D&K eq. 2.60, the diffuse first step
    contributes -0.5 log 2 pi). Measured relative difference <= 2e-16 in float64; tolerance 1e-6 (brief)."""
    fixed = ppl.condition(nile.local_level, nile.fixed_variances(*variances, y))
    kwargs = {} if initial is None else {"initial": initial}
    post = ppl.infer(fixed, y, model_kwargs=kwargs, progress=False)
    ours = post.log_evidence.value - (nile.HALF_LOG_2PI if initial is None else 0.0)
    theirs = float(nile.statsmodels_model(y, initial).loglike(list(variances)))
    assert ours == pytest.approx(theirs, rel=1e-6, abs=0.0)


def test_fitted_variances_match_statsmodels_mle(y, statsmodels_mle):
    """300 Adam steps (lr 0.1) on the exact marginal likelihood from var(diff y) / 2 for both variances.
    Measured: sigma_v^2 15098.14 vs statsmodels 15098.52 (rel 2.5e-5), sigma_w^2 1469.43 vs 1469.18
    (rel 1.7e-4), max log-lik higher by 2e-8 nats. The likelihood is flat along the ridge (statsmodels'
    default L-BFGS stops at 15067.6 / 1484.8, rel 2e-3 / 1e-2, 8e-5 nats lower), so the variances get
    rel 2e-3 and the maximized log-likelihood 1e-6 nats; D&K's published values within 0.5%."""
    sm_obs, sm_level, sm_llf = statsmodels_mle
    post, var_obs, var_level = nile.fit(y, num_steps=300)
    assert post.backend == "exact"
    assert var_obs == pytest.approx(sm_obs, rel=2e-3)
    assert var_level == pytest.approx(sm_level, rel=2e-3)
    assert post.log_evidence.value - nile.HALF_LOG_2PI >= sm_llf - 1e-6
    assert var_obs == pytest.approx(DK[0], rel=5e-3) and var_level == pytest.approx(DK[1], rel=5e-3)


def test_smoother_residuals_and_forecast_match_statsmodels(y, statsmodels_mle):
    """Fit on the series padded with 10 missing years (ppl.extend + mask): the masked steps carry no
    likelihood, so the MLE is unchanged (rel 2e-3 as above). At those variances: the posterior's smoothed
    level equals the RTS smoother (measured 4.5e-13); the auxiliary residuals equal statsmodels' smoothed
    disturbances standardized (measured 9e-14; tolerance 1e-8) and the largest state residual is the 1899
    dam; the predictive forecast (4000 draws) matches statsmodels' forecast mean within 4 Monte Carlo
    standard errors (sd / sqrt(4000) ~ 2.3-2.9) and its sd within 6% (rel. s.e. of an sd: 1 / sqrt(2n) ~ 1.1%,
    measured <= 2%)."""
    sm_obs, sm_level, _ = statsmodels_mle
    horizon, n = 10, 4000
    y_ext, mask = ppl.extend(y, steps=horizon)
    post, var_obs, var_level = nile.fit(y_ext, num_steps=300, mask=mask)
    assert var_obs == pytest.approx(sm_obs, rel=2e-3) and var_level == pytest.approx(sm_level, rel=2e-3)

    mean, var, _ = nile.smoothed_level(y, var_obs, var_level)
    smoothed = post.smoothed_means["level"][: y.shape[0], 0]
    assert torch.allclose(smoothed, mean, rtol=0, atol=1e-6)

    res = nile.statsmodels_model(y).smooth([var_obs, var_level])
    obs_res, state_res = nile.auxiliary_residuals(y, var_obs, var_level)
    sm_state = torch.as_tensor(res.smoothed_state_disturbance[0, :-1]
                               / (var_level - res.smoothed_state_disturbance_cov[0, 0, :-1]) ** 0.5)
    sm_obs_res = torch.as_tensor(res.smoothed_measurement_disturbance[0]
                                 / (var_obs - res.smoothed_measurement_disturbance_cov[0, 0]) ** 0.5)
    assert torch.allclose(state_res, sm_state, rtol=0, atol=1e-8)
    assert torch.allclose(obs_res, sm_obs_res, rtol=0, atol=1e-8)
    assert nile.FIRST_YEAR + 1 + int(state_res.argmin()) == nile.DAM_YEAR

    forecast = post.predictive(n, seed=0)["y"][:, -horizon:]
    fc = res.get_forecast(horizon)
    sm_mean = torch.as_tensor(fc.predicted_mean)
    sm_sd = torch.as_tensor(fc.var_pred_mean).sqrt()
    assert ((forecast.mean(0) - sm_mean).abs() <= 4 * sm_sd / math.sqrt(n)).all()
    assert ((forecast.std(0) / sm_sd - 1).abs() <= 0.06).all()


def test_bad_input_names_the_argument(y):
    with pytest.raises(ValueError, match="local_level: mask must be a bool tensor of y's shape"):
        ppl.compile(nile.local_level, y, mask=torch.ones(5, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"local_level: y must be a floating tensor of shape \(T,\)"):
        ppl.compile(nile.local_level, y[:, None])
    masked_first = torch.ones_like(y, dtype=torch.bool)
    masked_first[0] = False
    with pytest.raises(ValueError, match=r"needs y\[0\] observed"):
        ppl.compile(nile.local_level, y, mask=masked_first)
    with pytest.raises(ValueError, match="initial must be"):
        ppl.compile(nile.local_level, y, initial=(1000.0, -1.0))
