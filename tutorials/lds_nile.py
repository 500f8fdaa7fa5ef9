# %% [markdown]
# # The Nile at Aswan, 1871-1970: a local-level model (Kalman filter) vs statsmodels
#
# The classic first example of Durbin & Koopman, *Time Series Analysis by State Space Methods*
# (2nd ed., 2012), ch. 2: the annual flow volume of the Nile at Aswan (10^8 m^3), 100 values that ship
# with statsmodels (nothing is downloaded). The local-level model is a 1-D linear dynamical system:
#
# $$x_t = x_{t-1} + w_t,\ w_t \sim N(0, \sigma_w^2), \qquad y_t = x_t + v_t,\ v_t \sim N(0, \sigma_v^2).$$
#
# Written with `ppl.gaussian_chain` (a 1-D state, dynamics 1), the compiler routes it to the `exact`
# backend: the level path is marginalized by the Kalman filter and the two variances are fitted by
# maximizing the exact marginal likelihood. D&K report the MLE $\hat\sigma_v^2 = 15099$,
# $\hat\sigma_w^2 = 1469.1$; we compare with statsmodels' `UnobservedComponents(y, "local level")`.
#
# **Initial state.** D&K (and statsmodels with `use_exact_diffuse=True`) give $x_1$ a diffuse prior
# (variance -> infinity). The diffuse log-likelihood equals $\log p(y_2..y_n \mid y_1) - \tfrac12\log 2\pi$,
# and under a flat prior $x_1 \mid y_1 \sim N(y_1, \sigma_v^2)$. So the model below has that proper
# prior for $x_1$ and leaves $y_1$ out of the likelihood (masked): its exact log-evidence is
# $\log p(y_{2:n} \mid y_1)$ and its smoothed level equals the diffuse smoother's. With
# `initial=(mean, variance)` it uses a known prior instead (statsmodels' `initialize_known`).
#
# Run: `python tutorials/lds_nile.py [--smoke] [--out DIR] [--threads N]`.

# %%
import math
import time
import warnings
from pathlib import Path

import numpy as np
import torch

import ppl
from ppl import dist
from ppl.inference.exact.kalman import LDSPrior, kalman_smoother

FIRST_YEAR = 1871
DAM_YEAR = 1899          # the first Aswan dam: the level drops in 1899 (D&K sec. 2.12)
HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)
SITES = ("log_var_obs", "log_var_level")


def load_nile(dtype=torch.float64) -> torch.Tensor:
    """The annual Nile flow 1871-1970 as a ``(100,)`` tensor (statsmodels' bundled copy)."""
    from statsmodels.datasets import nile
    return torch.tensor(nile.load_pandas().data["volume"].to_numpy(), dtype=dtype)


def _observed(y: torch.Tensor, mask) -> torch.Tensor:
    """``mask`` checked against ``y: (T,)`` (True = observed), or all True when None."""
    if not isinstance(y, torch.Tensor) or not y.is_floating_point() or y.dim() != 1 or y.shape[0] < 3:
        got = (tuple(y.shape), y.dtype) if isinstance(y, torch.Tensor) else type(y).__name__
        raise ppl.ModelInputError(f"local_level: y must be a floating tensor of shape (T,) with T >= 3, got {got}")
    if mask is None:
        return torch.ones_like(y, dtype=torch.bool)
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or mask.shape != y.shape:
        got = (tuple(mask.shape), mask.dtype) if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise ppl.ModelInputError(f"local_level: mask must be a bool tensor of y's shape {tuple(y.shape)}, got {got}")
    return mask


def prior_center(y: torch.Tensor, mask=None) -> float:
    r"""Centre of the broad priors on the log-variances: :math:`\log(\mathrm{var}(\Delta y) / 2)` over the
    observed values (``var(y_t - y_{t-1}) = 2\sigma_v^2 + \sigma_w^2``, so this is the data's scale)."""
    obs = y[_observed(y, mask)]
    return float(torch.log((obs[1:] - obs[:-1]).var() / 2))


@ppl.model
def local_level(y: torch.Tensor, mask: torch.Tensor | None = None, initial: tuple[float, float] | None = None,
                prior_sd: float = 100.0):
    r"""Local-level model on ``y: (T,)``; latent level ``"level": (T, 1)`` (a 1-D ``gaussian_chain``).

    .. math::
        \log\sigma_v^2, \log\sigma_w^2 \sim N(c, \text{prior\_sd}^2), \quad
        x_t = x_{t-1} + w_t,\ w_t \sim N(0, \sigma_w^2), \quad y_t \sim N(x_t, \sigma_v^2)

    with :math:`c` = ``prior_center(y)``. The prior sd 100 on the log-variances is flat on the scale of
    the likelihood (its gradient at the MLE is ~1e-4 nats per unit of log-variance), so MAP = MLE.
    ``initial=None``: diffuse-equivalent start :math:`x_1 \sim N(y_1, \sigma_v^2)` with ``y_1`` left out
    (log-evidence = :math:`\log p(y_{2:T} \mid y_1)`; ``y_1`` must be observed); ``initial=(m, P)``:
    :math:`x_1 \sim N(m, P)` and every observed ``y_t`` is scored. ``mask: (T,)`` bool, False = missing
    (marginalized; ``y`` may be NaN there), e.g. the future steps of ``ppl.extend``.
    """
    observed = _observed(y, mask)
    T = y.shape[0]
    center = y.new_tensor(prior_center(y, observed))
    var_obs = ppl.sample("log_var_obs", dist.Normal(center, prior_sd)).exp()
    var_level = ppl.sample("log_var_level", dist.Normal(center, prior_sd)).exp()
    one = torch.ones(1, 1, dtype=y.dtype, device=y.device)
    if initial is None:
        if not bool(observed[0]):
            raise ppl.ModelInputError("local_level: the diffuse-equivalent start (initial=None) needs y[0] observed; "
                             "pass initial=(mean, variance) instead")
        loc0, cov0 = y[:1], var_obs * one
        observed = observed.clone()
        observed[0] = False          # y_1 is used by x_1's prior, not scored again
    else:
        if len(initial) != 2 or not float(initial[1]) > 0:
            raise ppl.ModelInputError(f"local_level: initial must be (mean, variance > 0), got {initial!r}")
        loc0, cov0 = y.new_tensor([float(initial[0])]), float(initial[1]) * one
    x = ppl.gaussian_chain("level", 1, one, var_level * one, loc0, cov0, length=T)
    filled = torch.where(observed, y, torch.zeros_like(y))      # finite placeholder where y is missing
    ppl.sample("y", dist.Normal(x[..., 0], var_obs.sqrt()).mask(observed).to_event(1), obs=filled)


def init_values(y: torch.Tensor, mask=None) -> dict[str, torch.Tensor]:
    """Start of the optimizer: both log-variances at the prior centre (``init=`` of ``ppl.infer``)."""
    c = prior_center(y, mask)
    return {name: y.new_tensor(c) for name in SITES}   # separate tensors: the optimizer updates them in place


def fixed_variances(var_obs: float, var_level: float, like: torch.Tensor) -> dict[str, torch.Tensor]:
    """Site values for ``ppl.condition`` that fix the two variances."""
    return {"log_var_obs": like.new_tensor(math.log(var_obs)), "log_var_level": like.new_tensor(math.log(var_level))}


def fit(y: torch.Tensor, num_steps: int = 300, lr: float = 0.1, **model_kwargs):
    """Exact-marginal-likelihood fit; returns ``(post, var_obs, var_level)``."""
    post = ppl.infer(local_level, y, model_kwargs=model_kwargs, progress=False, num_steps=num_steps, lr=lr,
                     init=init_values(y, model_kwargs.get("mask")))
    point = post.point
    return post, float(point["log_var_obs"].exp()), float(point["log_var_level"].exp())


def statsmodels_model(y: torch.Tensor, initial: tuple[float, float] | None = None):
    """statsmodels' local-level model: exact diffuse start, or ``initialize_known(m, P)`` with every
    observation scored (statsmodels otherwise burns the first one, as for its approximate diffuse start)."""
    import statsmodels.api as sm
    mod = sm.tsa.UnobservedComponents(y.cpu().numpy(), "local level", use_exact_diffuse=initial is None)
    if initial is not None:
        mod.ssm.initialize_known(np.array([float(initial[0])]), np.array([[float(initial[1])]]))
        mod.loglikelihood_burn = mod.ssm.loglikelihood_burn = 0
    return mod


def statsmodels_mle(y: torch.Tensor, tight: bool = True):
    """statsmodels' MLE (exact diffuse) as ``(var_obs, var_level, loglike)``. ``tight``: Nelder-Mead to
    xtol 1e-10 (the likelihood is flat: the default L-BFGS stops ~30 units of sigma_v^2 short)."""
    options = dict(method="nm", maxiter=5000, xtol=1e-10, ftol=1e-12) if tight else {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = statsmodels_model(y).fit(disp=0, **options)
    return float(res.params[0]), float(res.params[1]), float(res.llf)


def smoothed_level(y: torch.Tensor, var_obs: float, var_level: float):
    r"""Exact RTS smoother of the (diffuse-equivalent) local-level model at fixed variances, by the library's
    Kalman kernel (``ppl.inference.exact.kalman.kalman_smoother``): ``(mean (T,), var (T,), cross (T-1,))``
    with ``cross[t] = Cov(x_t, x_{t+1} | y)``."""
    one = torch.ones(1, 1, dtype=y.dtype, device=y.device)
    prior = LDSPrior(initial_loc=y[:1], initial_cov=var_obs * one, dynamics=one, noise_cov=var_level * one)
    mask = torch.ones_like(y, dtype=torch.bool)
    mask[0] = False
    sm = kalman_smoother(prior, one, None, var_obs * one, y[:, None], mask)
    return sm.mean[:, 0], sm.cov[:, 0, 0], sm.cross_cov[:, 0, 0]


def auxiliary_residuals(y: torch.Tensor, var_obs: float, var_level: float):
    r"""Standardized auxiliary residuals (D&K sec. 2.12) from the exact smoother: observation
    :math:`E[v_t|y] / \sqrt{\sigma_v^2 - \mathrm{Var}(x_t|y)}` (``v_t = y_t - x_t``, ``(T,)``) and state
    :math:`E[w_t|y] / \sqrt{\sigma_w^2 - \mathrm{Var}(w_t|y)}` (``w_t = x_t - x_{t-1}``, t = 2..T, ``(T-1,)``),
    using :math:`\mathrm{Var}(E[u|y]) = \mathrm{Var}(u) - \mathrm{Var}(u|y)`."""
    mean, var, cross = smoothed_level(y, var_obs, var_level)
    obs = (y - mean) / (var_obs - var).sqrt()
    w_var = var[1:] + var[:-1] - 2 * cross
    state = (mean[1:] - mean[:-1]) / (var_level - w_var).sqrt()
    return obs, state


# %%
def main(args, out: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps, draws, horizon = (60, 400, 10) if args.smoke else (300, 4000, 10)
    start = time.perf_counter()

    # %% [markdown]
    # ## Data and plan

    # %%
    y = load_nile()
    years = torch.arange(FIRST_YEAR, FIRST_YEAR + y.shape[0])
    print(f"Nile flow {years[0]}-{years[-1]}: {y.shape[0]} values, mean {y.mean():.0f}, sd {y.std():.0f}")
    plan = ppl.compile(local_level, y)
    print(plan.explain())
    assert plan.backend == "exact", plan.backend

    # %% [markdown]
    # ## The log-likelihood at fixed variances: graphppl's Kalman filter vs statsmodels
    # Same parameters (D&K's MLE), same initial-state treatment: exact diffuse, and a known prior N(1000, 10^4).

    # %%
    dk = (15099.0, 1469.1)
    fixed = ppl.condition(local_level, fixed_variances(*dk, y))
    ours = ppl.infer(fixed, y, progress=False).log_evidence.value - HALF_LOG_2PI
    theirs = float(statsmodels_model(y).loglike(list(dk)))
    print(f"log-lik at D&K's MLE, diffuse start:  graphppl {ours:.8f}  statsmodels {theirs:.8f}  "
          f"rel. diff {abs(ours - theirs) / abs(theirs):.1e}")
    known = (1000.0, 1e4)
    ours_k = ppl.infer(fixed, y, model_kwargs={"initial": known}, progress=False).log_evidence.value
    theirs_k = float(statsmodels_model(y, known).loglike(list(dk)))
    print(f"log-lik at D&K's MLE, x_1 ~ N(1000, 1e4): graphppl {ours_k:.8f}  statsmodels {theirs_k:.8f}  "
          f"rel. diff {abs(ours_k - theirs_k) / abs(theirs_k):.1e}")

    # %% [markdown]
    # ## Maximum likelihood: graphppl (Adam on the exact marginal likelihood) vs statsmodels

    # %%
    post, var_obs, var_level = fit(y, num_steps=steps)
    loglik = post.log_evidence.value - HALF_LOG_2PI
    sm_obs, sm_level, sm_llf = statsmodels_mle(y)
    sd_obs, sd_level, sd_llf = statsmodels_mle(y, tight=False)
    print(f"{'':34s} {'sigma_v^2':>10s} {'sigma_w^2':>10s} {'max log-lik':>14s}")
    print(f"{'graphppl (exact, ' + str(steps) + ' Adam steps)':34s} {var_obs:10.1f} {var_level:10.1f} {loglik:14.8f}")
    print(f"{'statsmodels (Nelder-Mead, tight)':34s} {sm_obs:10.1f} {sm_level:10.1f} {sm_llf:14.8f}")
    print(f"{'statsmodels (default fit)':34s} {sd_obs:10.1f} {sd_level:10.1f} {sd_llf:14.8f}")
    print(f"{'Durbin & Koopman (2012)':34s} {dk[0]:10.1f} {dk[1]:10.1f}")
    print(f"relative difference vs statsmodels (tight): sigma_v^2 {abs(var_obs - sm_obs) / sm_obs:.1e}, "
          f"sigma_w^2 {abs(var_level - sm_level) / sm_level:.1e}; log-lik {loglik - sm_llf:+.2e} nats")

    # %% [markdown]
    # ## Smoothed level with 90% bands, and auxiliary residuals: the 1899 dam
    # The bands are the exact RTS smoother's (checked against exact posterior draws of the path from
    # `post.sample`); the standardized smoothed disturbances (auxiliary residuals) come from the same
    # smoother, and a large negative state residual marks the drop in the level.

    # %%
    level = post.sample(draws, seed=args.seed)["level"][..., 0]            # exact draws (n, T)
    mean, var, _ = smoothed_level(y, var_obs, var_level)
    lo, hi = mean - 1.645 * var.sqrt(), mean + 1.645 * var.sqrt()
    mean_err = (post.smoothed_means["level"][:, 0] - mean).abs().max()
    sd_err = ((level.std(0) - var.sqrt()) / var.sqrt()).abs().max()
    print(f"smoothed level: max |E[x|y] (posterior) - RTS| {mean_err:.1e}; "
          f"max |sd of {draws} draws - RTS sd| / RTS sd {sd_err:.3f}")
    obs_res, state_res = auxiliary_residuals(y, var_obs, var_level)
    sm_res = statsmodels_model(y).smooth([var_obs, var_level])
    sm_state = torch.as_tensor(sm_res.smoothed_state_disturbance[0, :-1] /
                               (var_level - sm_res.smoothed_state_disturbance_cov[0, 0, :-1]) ** 0.5)
    sm_obs_res = torch.as_tensor(sm_res.smoothed_measurement_disturbance[0] /
                                 (var_obs - sm_res.smoothed_measurement_disturbance_cov[0, 0]) ** 0.5)
    print(f"auxiliary residuals vs statsmodels at the same variances: max abs diff state "
          f"{(state_res - sm_state).abs().max():.1e}, observation {(obs_res - sm_obs_res).abs().max():.1e}")
    k = int(state_res.argmin())
    break_year = int(years[k + 1])
    print(f"largest state residual: {state_res[k]:.2f} in {break_year} (the dam: {DAM_YEAR}); "
          f"observation residuals beyond +-2.5: "
          f"{[int(v) for v in years[obs_res.abs() > 2.5]]}")

    # %% [markdown]
    # ## Forecast 10 years past the data: `ppl.extend` + mask, then the posterior predictive
    # The fit on the padded series gives the same MLE (missing steps are marginalized, not scored);
    # compared with statsmodels' forecast at those variances (mean and sd of y_{n+h}).

    # %%
    y_ext, mask = ppl.extend(y, steps=horizon)
    post_f, fvar_obs, fvar_level = fit(y_ext, num_steps=steps, mask=mask)    # the masked steps add nothing
    fc = post_f.predictive(draws, seed=args.seed)["y"][:, -horizon:]
    sm_fc = statsmodels_model(y).smooth([fvar_obs, fvar_level]).get_forecast(horizon)
    sm_mean = torch.as_tensor(sm_fc.predicted_mean)
    sm_sd = torch.as_tensor(sm_fc.var_pred_mean).sqrt()
    print(f"forecast {int(years[-1]) + 1}-{int(years[-1]) + horizon}: mean {fc.mean(0)[0]:.1f} "
          f"(statsmodels {sm_mean[0]:.1f}), sd at h=1 {fc.std(0)[0]:.1f} (statsmodels {sm_sd[0]:.1f}), "
          f"sd at h={horizon} {fc.std(0)[-1]:.1f} (statsmodels {sm_sd[-1]:.1f}); {draws} draws")
    fyears = torch.arange(int(years[-1]) + 1, int(years[-1]) + 1 + horizon)
    flo, fhi = torch.quantile(fc, torch.tensor([0.05, 0.95], dtype=fc.dtype), dim=0)

    # %% [markdown]
    # ## Figures

    # %%
    fig, ax = plt.subplots(figsize=(10, 4.2))
    ax.plot(years, y, "k.", ms=4, label="annual flow")
    ax.plot(years, mean, "C0", label="smoothed level")
    ax.fill_between(years, lo, hi, color="C0", alpha=0.25, label="90% band (level)")
    ax.plot(fyears, fc.mean(0), "C3", label=f"{horizon}-year forecast of y")
    ax.fill_between(fyears, flo, fhi, color="C3", alpha=0.2, label="90% predictive band")
    ax.axvline(DAM_YEAR, color="gray", ls=":", label=f"Aswan dam ({DAM_YEAR})")
    ax.set_xlabel("year")
    ax.set_ylabel("flow (10^8 m^3)")
    ax.set_title(f"Nile local-level model: sigma_v^2 = {var_obs:.0f}, sigma_w^2 = {var_level:.0f} "
                 f"(statsmodels {sm_obs:.0f}, {sm_level:.0f})")
    ax.legend(fontsize=8, ncol=3, loc="upper right")
    fig.tight_layout()
    fig.savefig(out / "lds_nile_level.png", dpi=110)
    plt.close(fig)

    fig, axes = plt.subplots(2, 1, figsize=(10, 5), sharex=True)
    for ax, yr, res, name in [(axes[0], years, obs_res, "observation"), (axes[1], years[1:], state_res, "state")]:
        ax.bar(yr, res, color="C0", width=0.8)
        for s in (-1.96, 1.96):
            ax.axhline(s, color="gray", ls="--", lw=0.8)
        ax.axvline(DAM_YEAR, color="C3", ls=":")
        ax.set_ylabel(f"{name} residual")
    axes[0].set_title("standardized auxiliary residuals (D&K sec. 2.12); dashed: +-1.96")
    axes[1].set_xlabel("year")
    fig.tight_layout()
    fig.savefig(out / "lds_nile_residuals.png", dpi=110)
    plt.close(fig)
    print(f"figures in {out}; total {time.perf_counter() - start:.1f} s")


# %%
if __name__ == "__main__":
    from _common import parse_args, prepare  # tutorials/_common.py; tests import this file without it
    args = parse_args("Nile local-level model (exact Kalman) vs statsmodels", ("--smoke", "--out", "--threads", "--seed"),
                      helps={"--smoke": "few optimizer steps and draws (CI)",
                             "--threads": "torch threads (1-D Kalman algebra: 1 is fastest)"})
    main(args, prepare(args))
