"""Simulation-based calibration of our NUTS (tests/reference/sbc.py) on normal-normal, eight schools
(non-centered) and a 2-state HMM with Dirichlet transition priors and the chain collapsed (forward algorithm).

Each replication is one chain with its own data set; all replications run as one batch of chains (the
potential is batched over chains, as a compiled density is). The ranks of R = 100 (HMM: 80) replications
among L = 20 draws (100 draws after 100 warmup steps, thinned by 5; tree depth at most 5, which slows
mixing but leaves the stationary distribution exact) are tested for uniformity by a chi-square over 7 bins
at level 0.001 per parameter.

Power, honestly: with 100 replications the test detects gross miscalibration only. A posterior too narrow
by a factor of ~2 in sd (likelihood counted 4 times: U-shaped ranks) fails it (checked below). A posterior
too wide by a factor of ~1.55 (likelihood tempered by 0.3) was NOT detected on one of two seeds (p = 0.93 and
0.011); errors of a few percent in the spread or the tails go unseen. These tests guard the sampler's core
(proposal selection, U-turn checks, warmup) against a grossly wrong stationary distribution; the Gaussian
tests of test_nuts.py check the moments more tightly.
"""
import math

import pytest
import torch

from ppl.inference.mcmc import nuts
from tests.reference import sbc

R, WARMUP, DRAWS, THIN, BINS, LEVEL, DEPTH = 100, 100, 100, 5, 7, 1e-3, 5
L = DRAWS // THIN


def batched(log_density):
    """potential_and_grad over chains from a batched log density ``z (C, D) -> (C,)`` (autograd)."""

    def potential_and_grad(z):
        with torch.enable_grad():
            z = z.detach().requires_grad_(True)
            u = -log_density(z)
            (grad,) = torch.autograd.grad(u.sum(), z)
        return u.detach(), grad

    return nuts.AllChains(potential_and_grad)


def thinned(run) -> torch.Tensor:
    """(R, L, D) draws of one chain per replication, every THIN-th."""
    return run.draws[:, THIN - 1::THIN]


def normal(x, loc, scale):
    return -0.5 * ((x - loc) / scale) ** 2 - torch.log(scale * math.sqrt(2 * math.pi)) if torch.is_tensor(scale) \
        else -0.5 * ((x - loc) / scale) ** 2 - math.log(scale * math.sqrt(2 * math.pi))


# ---------------------------------------------------------------- normal-normal

N_OBS = 5


def normal_normal_fit(temper: float = 1.0):
    def fit(y):
        def log_density(z):
            mu = z[:, 0]
            return normal(mu, 0.0, 1.0) + temper * normal(y, mu[:, None], 1.0).sum(-1)

        run = nuts.sample(batched(log_density), torch.zeros(y.shape[0], 1, dtype=y.dtype), DRAWS, WARMUP, seed=1,
                          max_tree_depth=DEPTH)
        return {"mu": thinned(run)[..., 0]}

    return fit


def normal_normal_prior(n, g):
    return {"mu": torch.randn(n, generator=g, dtype=torch.float64)}


def normal_normal_data(theta, g):
    return theta["mu"][:, None] + torch.randn(theta["mu"].shape[0], N_OBS, generator=g, dtype=torch.float64)


def test_sbc_normal_normal():
    rank = sbc.run_sbc(normal_normal_prior, normal_normal_data, normal_normal_fit(), R, seed=0)
    assert sbc.uniformity_pvalue(rank["mu"], L, BINS) > LEVEL


def test_sbc_detects_a_too_narrow_posterior():
    """The power claimed above: the same test on a wrong posterior (likelihood counted 4 times, sd ~2x too narrow)
    fails."""
    rank = sbc.run_sbc(normal_normal_prior, normal_normal_data, normal_normal_fit(temper=4.0), R, seed=0)
    assert sbc.uniformity_pvalue(rank["mu"], L, BINS) < LEVEL


# ---------------------------------------------------------------- eight schools, non-centered

SIGMA = torch.tensor([15.0, 10.0, 16.0, 11.0, 9.0, 11.0, 10.0, 18.0], dtype=torch.float64)


def schools_log_density(y):
    """log p(mu, log tau, theta~ | y) + log tau (Jacobian): mu ~ N(0, 5), tau ~ HalfCauchy(5),
    theta~_j ~ N(0, 1), y_j ~ N(mu + tau theta~_j, sigma_j). z = (mu, log tau, theta~_1..8), y (C, 8)."""
    def log_density(z):
        mu, log_tau, tt = z[:, 0], z[:, 1], z[:, 2:]
        tau = log_tau.exp()
        prior = normal(mu, 0.0, 5.0) + math.log(2 / (math.pi * 5)) - torch.log1p((tau / 5) ** 2) + log_tau
        return prior + normal(tt, 0.0, 1.0).sum(-1) + normal(y, mu[:, None] + tau[:, None] * tt, SIGMA).sum(-1)

    return log_density


def test_sbc_eight_schools_noncentered():
    def prior(n, g):
        tau = 5 * torch.tan(math.pi / 2 * torch.rand(n, generator=g, dtype=torch.float64))   # HalfCauchy(5)
        return {"mu": 5 * torch.randn(n, generator=g, dtype=torch.float64), "tau": tau,
                "theta1": torch.randn(n, generator=g, dtype=torch.float64)}

    def simulate(theta, g):
        effects = theta["mu"][:, None] + theta["tau"][:, None] * torch.cat(
            [theta["theta1"][:, None], torch.randn(theta["mu"].shape[0], 7, generator=g, dtype=torch.float64)], 1)
        return effects + SIGMA * torch.randn(effects.shape, generator=g, dtype=torch.float64)

    def fit(y):
        run = nuts.sample(batched(schools_log_density(y)), torch.zeros(y.shape[0], 10, dtype=y.dtype), DRAWS,
                          WARMUP, seed=2, max_tree_depth=DEPTH)
        d = thinned(run)
        return {"mu": d[..., 0], "tau": d[..., 1].exp(), "theta1": d[..., 2]}

    rank = sbc.run_sbc(prior, simulate, fit, R, seed=1)
    for name, r in rank.items():
        assert sbc.uniformity_pvalue(r, L, BINS) > LEVEL, name


# ---------------------------------------------------------------- 2-state HMM, chain collapsed

T, LOCS = 30, torch.tensor([-1.0, 1.0], dtype=torch.float64)


def hmm_log_density(y):
    """Two states, emissions N(loc_k, 1) with loc = (-1, 1), uniform initial state, transition rows ~ Dirichlet(1, 1):
    z_k = logit P(stay in k), the row's Dirichlet(1, 1) density is constant, the Jacobian is p_k (1 - p_k).
    log p(y | P) by the forward algorithm in log space. y: (C, T)."""
    def log_density(z):
        stay = torch.sigmoid(z)                                           # (C, 2)
        trans = torch.stack([torch.stack([stay[:, 0], 1 - stay[:, 0]], -1),
                             torch.stack([1 - stay[:, 1], stay[:, 1]], -1)], 1)   # (C, 2, 2) rows: from
        log_trans = trans.log()
        emit = normal(y[..., None], LOCS, 1.0)                            # (C, T, 2)
        alpha = math.log(0.5) + emit[:, 0]
        for t in range(1, y.shape[1]):
            alpha = torch.logsumexp(alpha[..., None] + log_trans, 1) + emit[:, t]
        jacobian = (torch.nn.functional.logsigmoid(z) + torch.nn.functional.logsigmoid(-z)).sum(-1)
        return torch.logsumexp(alpha, -1) + jacobian

    return log_density


@pytest.mark.slow
def test_sbc_hmm_with_dirichlet_transitions():
    def prior(n, g):
        return {"stay0": torch.rand(n, generator=g, dtype=torch.float64),
                "stay1": torch.rand(n, generator=g, dtype=torch.float64)}

    def simulate(theta, g):
        n = theta["stay0"].shape[0]
        stay = torch.stack([theta["stay0"], theta["stay1"]], -1)
        state = (torch.rand(n, generator=g, dtype=torch.float64) < 0.5).long()
        ys = []
        for _ in range(T):
            ys.append(LOCS[state] + torch.randn(n, generator=g, dtype=torch.float64))
            moves = torch.rand(n, generator=g, dtype=torch.float64) >= stay.gather(1, state[:, None])[:, 0]
            state = torch.where(moves, 1 - state, state)
        return torch.stack(ys, 1)

    def fit(y):
        run = nuts.sample(batched(hmm_log_density(y)), torch.zeros(y.shape[0], 2, dtype=y.dtype), DRAWS, WARMUP,
                          seed=3, max_tree_depth=DEPTH)
        d = torch.sigmoid(thinned(run))
        return {"stay0": d[..., 0], "stay1": d[..., 1]}

    rank = sbc.run_sbc(prior, simulate, fit, 80, seed=2)
    for name, r in rank.items():
        assert sbc.uniformity_pvalue(r, L, BINS) > LEVEL, name


def test_uniformity_pvalue_on_known_ranks():
    """The chi-square p-value: perfectly uniform ranks give p = 1, all ranks in one bin give p ~ 0, and the
    statistic matches scipy's chi2 survival function."""
    stats = pytest.importorskip("scipy.stats")
    uniform = torch.arange(16).repeat(10)
    assert sbc.uniformity_pvalue(uniform, 15, 8) == pytest.approx(1.0)
    assert sbc.uniformity_pvalue(torch.zeros(160, dtype=torch.long), 15, 8) < 1e-12
    rank = torch.tensor([0, 1, 1, 5, 7, 9, 15, 15, 15, 3, 2, 12, 14, 8, 8, 8])
    counts = torch.bincount(rank * 8 // 16, minlength=8).double()
    x = float(((counts - 2) ** 2 / 2).sum())
    assert sbc.uniformity_pvalue(rank, 15, 8) == pytest.approx(float(stats.chi2.sf(x, 7)))
    with pytest.raises(ValueError, match="not a multiple of bins"):
        sbc.uniformity_pvalue(rank, 14, 8)
