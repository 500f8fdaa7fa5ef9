"""Batched NUTS (ppl.inference.mcmc.nuts) on potentials with known answers.

Oracles: Gaussian targets whose mean and covariance are known in closed form (tolerances from the effective
sample size, so they are Monte Carlo error bounds, not tuned constants), Stan's warmup schedule as published,
and the sampler itself run chain by chain (the batch must not change a chain's draws).
"""
import math
import warnings

import pytest
import torch
from pyro.ops.stats import effective_sample_size

from ppl.inference.mcmc import nuts
from ppl.inference.training import Interrupted


def gaussian(cov: torch.Tensor, mean: torch.Tensor | None = None):
    """potential_and_grad of N(mean, cov): U = (z - m)' P (z - m) / 2, batched over rows of z."""
    prec = torch.linalg.inv(cov)
    mean = torch.zeros(cov.shape[0], dtype=cov.dtype) if mean is None else mean

    def potential_and_grad(z):
        g = (z - mean) @ prec
        return 0.5 * (g * (z - mean)).sum(-1), g

    return potential_and_grad


def correlated_cov(dim: int, rho: float = 0.9, seed: int = 0) -> torch.Tensor:
    """A covariance with correlation rho between all pairs and scales spread over a factor of 10."""
    g = torch.Generator().manual_seed(seed)
    scales = torch.logspace(-0.5, 0.5, dim, dtype=torch.float64)[torch.randperm(dim, generator=g)]
    corr = (1 - rho) * torch.eye(dim, dtype=torch.float64) + rho * torch.ones(dim, dim, dtype=torch.float64)
    return scales[:, None] * corr * scales[None, :]


def min_ess(draws: torch.Tensor) -> float:
    """Smallest ESS over dimensions of draws (C, N, D)."""
    return float(effective_sample_size(draws, chain_dim=0, sample_dim=1).min())


def assert_moments(draws: torch.Tensor, mean: torch.Tensor, cov: torch.Tensor) -> None:
    """Mean within 4.5 Monte Carlo standard errors sd/sqrt(ESS) per dimension; variances within
    4.5 sqrt(2/ESS) relative (the sd of a variance estimate from ESS independent Gaussian draws)."""
    ess = effective_sample_size(draws, chain_dim=0, sample_dim=1)
    flat = draws.reshape(-1, draws.shape[-1])
    sd = cov.diagonal().sqrt()
    assert bool(((flat.mean(0) - mean).abs() < 4.5 * sd / ess.sqrt()).all()), (flat.mean(0), mean, ess)
    rel = (flat.var(0) / cov.diagonal() - 1).abs()
    assert bool((rel < 4.5 * (2 / ess).sqrt()).all()), (rel, ess)


def test_standard_normal_moments_and_stats():
    D = 4
    run = nuts.sample(gaussian(torch.eye(D, dtype=torch.float64)), torch.zeros(3, D, dtype=torch.float64),
                      num_samples=150, warmup_steps=100, seed=0)
    assert run.draws.shape == (3, 150, D)
    assert set(run.stats) == set(nuts.STAT_NAMES) and all(v.shape == (3, 150) for v in run.stats.values())
    assert_moments(run.draws, torch.zeros(D, dtype=torch.float64), torch.eye(D, dtype=torch.float64))
    assert int(run.stats["diverging"].sum()) == 0
    assert bool((run.stats["n_steps"] <= 2 ** run.stats["tree_depth"] - 1).all())
    # the step size is fixed after warmup, one per chain
    assert bool((run.stats["step_size"] == run.stats["step_size"][:, :1]).all())


def test_correlated_2d_gaussian_dense_mass():
    cov = torch.tensor([[1.0, 0.95 * 3], [0.95 * 3, 9.0]], dtype=torch.float64)
    mean = torch.tensor([1.0, -2.0], dtype=torch.float64)
    run = nuts.sample(gaussian(cov, mean), torch.zeros(2, 2, dtype=torch.float64), num_samples=200,
                      warmup_steps=200, seed=1, dense_mass=True)
    assert_moments(run.draws, mean, cov)
    flat = run.draws.reshape(-1, 2)
    corr = float(torch.corrcoef(flat.T)[0, 1])
    assert abs(corr - 0.95) < 0.03
    # the adapted dense inverse mass matrix (from the 75 draws of the one slow window) has the correlation
    est = run.state.inv_mass
    assert est.shape == (2, 2, 2)
    est_corr = est[:, 0, 1] / (est[:, 0, 0] * est[:, 1, 1]).sqrt()
    assert bool(((est_corr - 0.95).abs() < 0.05).all()), est


def test_dense_mass_beats_diagonal_on_a_correlated_gaussian():
    """Correlation 0.9 between all 6 coordinates: a diagonal metric cannot undo it, a dense one can; the dense
    run reaches a higher minimum ESS per leapfrog step (by more than 2x), and both have the right moments."""
    cov = correlated_cov(6)
    init = torch.zeros(2, 6, dtype=torch.float64)
    diag = nuts.sample(gaussian(cov), init, num_samples=120, warmup_steps=120, seed=2, max_tree_depth=6)
    dense = nuts.sample(gaussian(cov), init, num_samples=120, warmup_steps=120, seed=2, dense_mass=True,
                        max_tree_depth=6)
    for run in (diag, dense):
        assert_moments(run.draws, torch.zeros(6, dtype=torch.float64), cov)
    per_step = [min_ess(r.draws) / float(r.stats["n_steps"].sum()) for r in (diag, dense)]
    assert per_step[1] > 2 * per_step[0], per_step


def test_funnel_diverges():
    """Neal's funnel, centred (v ~ N(0, 3), x_i ~ N(0, e^{v/2})): its neck is too narrow for one step size,
    so NUTS reports divergences (a sampler that hid them would be silently wrong)."""
    def funnel(z):
        v, x = z[:, 0], z[:, 1:]
        u = v ** 2 / 18 + 0.5 * (x ** 2 * torch.exp(-v)[:, None]).sum(-1) + x.shape[1] * v / 2
        grad = torch.cat([(v / 9 - 0.5 * (x ** 2).sum(-1) * torch.exp(-v) + x.shape[1] / 2)[:, None],
                          x * torch.exp(-v)[:, None]], -1)
        return u, grad

    # 4 chains x 100 draws: a divergence is rare per draw (12-15 here; 1-2 in a 2 x 60 run, where a change of
    # rounding alone can make it 0)
    run = nuts.sample(funnel, torch.zeros(4, 6, dtype=torch.float64), num_samples=100, warmup_steps=100, seed=2,
                      max_tree_depth=6)
    assert int(run.stats["diverging"].sum()) >= 5


def test_a_chain_draws_the_same_alone_and_in_a_batch():
    """Chain c uses only its own random stream (chain_seeds(seed, C)[c]): run alone with that seed it gives the
    same draws as in the batch of 3 (float64; equal up to rounding of the batched arithmetic)."""
    cov = correlated_cov(3, rho=0.5)
    init = torch.tensor([[0.5, -0.5, 0.0], [1.0, 1.0, 1.0], [-1.0, 0.0, 2.0]], dtype=torch.float64)
    batch = nuts.sample(gaussian(cov), init, num_samples=25, warmup_steps=25, seed=5)
    seeds = nuts.chain_seeds(5, 3)
    assert seeds[:2] == nuts.chain_seeds(5, 2)
    for c in range(3):
        alone = nuts.sample(gaussian(cov), init[c:c + 1], num_samples=25, warmup_steps=25, seeds=[seeds[c]])
        torch.testing.assert_close(alone.draws[0], batch.draws[c], rtol=1e-9, atol=1e-9)
        assert torch.equal(alone.stats["n_steps"][0], batch.stats["n_steps"][c])
    other = nuts.sample(gaussian(cov), init, num_samples=25, warmup_steps=25, seed=6)
    assert not torch.allclose(other.draws, batch.draws)


def test_dual_averaging_finds_the_step_size_of_the_target():
    """On a known acceptance curve a(e) = exp(-e^2) (per chain, three chains from different starts) the averaged
    iterate converges to the step size with a(e*) = target: e* = sqrt(-log target)."""
    adapt = nuts.DualAveraging.start(torch.tensor([0.01, 1.0, 5.0], dtype=torch.float64))
    for _ in range(2000):
        adapt.update(torch.exp(-adapt.log_step.exp() ** 2), 0.8)
    torch.testing.assert_close(adapt.log_step_avg.exp(), torch.full((3,), math.sqrt(-math.log(0.8)),
                                                                   dtype=torch.float64), rtol=0.02, atol=0)


def test_step_size_adaptation_reaches_the_target_acceptance():
    """After Stan's warmup the draws' mean acceptance statistic is ~0.8 for target 0.8 (within [0.75, 0.95]: the
    final step size averages the last 50-step buffer's iterates, which start at the heuristic's 0.8 and sit
    on the asymmetric acceptance curve, so it lands at or above the target, as in Stan), above 0.93 for 0.97,
    with a smaller step size."""
    cov = correlated_cov(5, rho=0.3)
    runs = [nuts.sample(gaussian(cov), torch.zeros(2, 5, dtype=torch.float64), num_samples=100, warmup_steps=150,
                        seed=3, target_accept=target) for target in (0.8, 0.97)]
    accept = [float(r.stats["accept_prob"].mean()) for r in runs]
    assert 0.75 < accept[0] < 0.95 and accept[1] > 0.93, accept
    assert bool((runs[1].state.step_size < runs[0].state.step_size).all())
    assert 0 < float(runs[0].stats["accept_prob"].min()) and float(runs[0].stats["accept_prob"].max()) <= 1


def test_continuing_from_the_state_equals_the_uninterrupted_run():
    """The state after n draws (positions, step size, mass matrix, random streams) continues the chains exactly:
    sample(18) then sample(12, state) gives the draws of sample(30)."""
    pg, init = gaussian(correlated_cov(3, rho=0.5)), torch.zeros(2, 3, dtype=torch.float64)
    whole = nuts.sample(pg, init, num_samples=30, warmup_steps=30, seed=4, dense_mass=True)
    first = nuts.sample(pg, init, num_samples=18, warmup_steps=30, seed=4, dense_mass=True)
    rest = nuts.sample(pg, None, num_samples=12, warmup_steps=0, state=first.state)
    assert torch.equal(torch.cat([first.draws, rest.draws], 1), whole.draws)
    for k in nuts.STAT_NAMES:
        assert torch.equal(torch.cat([first.stats[k], rest.stats[k]], 1), whole.stats[k]), k
    assert torch.equal(rest.state.z, whole.state.z)


def test_ctrl_c_returns_the_draws_reached():
    """A KeyboardInterrupt from inside the potential during the draws stops the run: the draws so far come
    back marked interrupted (with an Interrupted warning) and the state continues them; during warmup there
    is nothing to return and the interrupt propagates."""
    base = gaussian(torch.eye(2, dtype=torch.float64))
    calls = {"n": 0, "limit": 0}

    def pg(z):
        calls["n"] += 1
        if calls["n"] == calls["limit"]:
            raise KeyboardInterrupt
        return base(z)

    init = torch.zeros(2, 2, dtype=torch.float64)
    calls["limit"] = 10 ** 9
    full = nuts.sample(pg, init, num_samples=40, warmup_steps=30, seed=0)
    per_run = calls["n"]
    calls.update(n=0, limit=per_run - 40)   # well inside the draws
    with pytest.warns(Interrupted, match="interrupted by the user"):
        cut = nuts.sample(pg, init, num_samples=40, warmup_steps=30, seed=0)
    assert cut.interrupted and 0 < cut.draws.shape[1] < 40
    n = cut.draws.shape[1]
    assert torch.equal(cut.draws, full.draws[:, :n])
    calls.update(n=0, limit=10 ** 9)
    rest = nuts.sample(pg, None, num_samples=40 - n, warmup_steps=0, state=cut.state)
    assert torch.equal(torch.cat([cut.draws, rest.draws], 1), full.draws)
    calls.update(n=0, limit=5)
    with pytest.raises(KeyboardInterrupt):
        nuts.sample(pg, init, num_samples=40, warmup_steps=30, seed=0)


def test_stan_warmup_windows():
    """Stan's schedule for 1000 warmup iterations (75 / 25 doubling / 50) and the 15/75/10% split of a short one."""
    assert nuts.slow_windows(1000) == [(75, 100), (100, 150), (150, 250), (250, 450), (450, 950)]
    assert nuts.slow_windows(100) == [(15, 90)]
    assert nuts.slow_windows(10) == []


def test_checkpoint_indices_follow_the_binary_counter():
    """Leaf n closes the subtrees given by its trailing ones: leaf 1 closes one (checkpoint 0), leaf 3 two
    (checkpoints 0..1), leaf 7 three (0..2), leaf 5 one (checkpoint 1); even leaves close none."""
    assert nuts._checkpoints(1) == (0, 0)
    assert nuts._checkpoints(3) == (0, 1)
    assert nuts._checkpoints(7) == (0, 2)
    assert nuts._checkpoints(5) == (1, 1)
    first, last = nuts._checkpoints(6)
    assert first > last


@pytest.mark.parametrize("kwargs, words", [
    (dict(num_samples=0), "num_samples must be an integer >= 1, got 0"),
    (dict(num_samples=2.5), "num_samples must be an integer >= 1, got 2.5"),
    (dict(warmup_steps=-1), "warmup_steps must be an integer >= 0, got -1"),
    (dict(max_tree_depth=0), "max_tree_depth must be an integer >= 1, got 0"),
    (dict(target_accept=1.0), "target_accept must be a number in (0, 1), got 1.0"),
    (dict(init=torch.zeros(3)), "init must be a (chains, dim) tensor, got (3,)"),
    (dict(seeds=[1]), "seeds has 1 entries for 2 chains"),
    (dict(init=torch.full((2, 2), math.inf)), "not finite at the initial point of chain(s) [0, 1]"),
])
def test_bad_options_are_named(kwargs, words):
    options = dict(init=torch.zeros(2, 2), num_samples=5, warmup_steps=5)
    options.update(kwargs)
    with pytest.raises(ValueError) as info:
        nuts.sample(gaussian(torch.eye(2)), **options)
    assert words in str(info.value)


def test_continuing_refuses_warmup():
    run = nuts.sample(gaussian(torch.eye(2)), torch.zeros(1, 2), num_samples=3, warmup_steps=3)
    with pytest.raises(ValueError, match="runs no warmup, got warmup_steps=5"):
        nuts.sample(gaussian(torch.eye(2)), None, num_samples=3, warmup_steps=5, state=run.state)


def test_float32_potential_keeps_its_dtype():
    run = nuts.sample(gaussian(torch.eye(2)), torch.zeros(2, 2), num_samples=20, warmup_steps=20)
    assert run.draws.dtype == torch.float32 and run.stats["energy"].dtype == torch.float32
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert bool(torch.isfinite(run.draws).all())
