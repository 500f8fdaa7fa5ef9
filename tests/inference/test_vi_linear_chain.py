"""The vi backend's linear chain (``inference/vi/linear_chain.py``): a markov_chain whose log transition is linear
in Dirichlet globals and whose Gaussian mean is linear in a Normal one (the library's factorial HMM over its joint
states), the emission scale point-estimated in the loop. Oracles: the probed maps against the Kronecker / digit
structure written out by hand; the expected tables against Monte Carlo under q; log Z and the per-chain expected
transition counts against brute-force enumeration of every path; the scale's point estimate against its closed
form; the whole fit against the exact backend's MAP on the same data."""
import itertools
import math

import pytest
import torch

import ppl
from ppl import dist
from ppl.inference.vi import linear_chain as L
from ppl.backends import UnsupportedModelError
from ppl.inference.vi.conjugacy import NotConjugate
from ppl.models import factorial_hmm as F, slds


def _structure(sim):
    plan = ppl.compile(F.model, *sim.args, **sim.kwargs)
    return plan, L.analyse(F.model, sim.args, sim.kwargs, plan.facts, plan.graph)


def _fitted(s, sweeps: int = 20):
    state, q = L.start(s, 0, torch.Generator().manual_seed(0))
    fit = L.coordinate_ascent(s, (state, q), sweeps, 0.0)
    return fit.state


def test_probe_finds_the_kronecker_incidence_and_the_additive_design():
    M, K = 2, 3
    sim = F.simulate(seed=0, N=2, T=20, M=M, K=K)
    _, s = _structure(sim)
    digits = F.chain_states(torch.arange(K ** M), M, K)               # (K^M, M)
    B = torch.zeros(K ** M, K ** M, M, K, K, dtype=torch.float64)
    J = torch.zeros(K ** M, M, K, dtype=torch.float64)
    for a, b in itertools.product(range(K ** M), repeat=2):
        for m in range(M):
            B[a, b, m, digits[a, m], digits[b, m]] = 1.0
    for a in range(K ** M):
        for m in range(M):
            J[a, m, digits[a, m]] = 1.0
    assert list(s.trans) == ["trans"] and s.means == "means" and s.scale.name == "scale"
    assert torch.allclose(s.trans["trans"][1], B.reshape(K ** (2 * M), M * K * K), atol=1e-6)
    assert torch.allclose(s.J, J.reshape(K ** M, M * K), atol=1e-6)
    assert float(s.c.abs().max()) < 1e-6 and float(s.log_trans_fixed.abs().max()) < 1e-5


def test_expected_tables_match_monte_carlo_under_q():
    sim = F.simulate(seed=1, N=2, T=30)
    _, s = _structure(sim)
    state, q = _fitted(s)
    torch.manual_seed(0)
    n = 40000
    P = torch.distributions.Dirichlet(q.alpha["trans"]).sample((n,))                       # (n, M, K, K)
    joint = (P[:, 0, :, None, :, None] * P[:, 1, None, :, None, :]).reshape(n, 4, 4)         # kron, per draw
    assert torch.allclose(L.expected_log_trans(s, q.alpha), joint.log().mean(0), atol=0.02)
    W = torch.distributions.MultivariateNormal(q.m, q.S).sample((n,))                       # (n, M K)
    mu = W @ s.J.T + s.c                                                                    # (n, K^M)
    sq = (s.y[..., None, None] - mu) ** 2                                                   # (N, T, n, K^M)
    mc, se = sq.mean(-2), sq.std(-2) / n ** 0.5
    expected_sq = (L.expected_log_lik(s, q) / s.w[..., None] + 0.5 * torch.log(2 * math.pi * q.var)) * -2 * q.var
    assert bool(((expected_sq - mc).abs() <= 5 * se + 1e-9).all())                          # within 5 MC sds


def test_log_z_and_per_chain_counts_match_brute_force_enumeration():
    M, K, T = 2, 2, 5
    sim = F.simulate(seed=2, N=None, T=T, M=M, K=K)
    _, s = _structure(sim)
    state, q = _fitted(s, 5)
    log_a, log_lik = L.expected_log_trans(s, q.alpha), L.expected_log_lik(s, q)            # (4, 4), (T, 4)
    paths = torch.tensor(list(itertools.product(range(K ** M), repeat=T)))                 # (4^T, T)
    score = s.log_init[paths[:, 0]] + log_a[paths[:, :-1], paths[:, 1:]].sum(-1) \
        + log_lik[torch.arange(T), paths].sum(-1)
    assert torch.allclose(state.log_z, torch.logsumexp(score, 0), atol=1e-9)
    p = torch.softmax(score, 0)
    digits = F.chain_states(paths, M, K)                                                    # (4^T, T, M)
    counts = torch.zeros(M, K, K, dtype=torch.float64)
    for m in range(M):
        for t in range(1, T):
            counts[m].index_put_((digits[:, t - 1, m], digits[:, t, m]), p, accumulate=True)
    B = s.trans["trans"][1]
    assert torch.allclose((B.T @ state.xi.reshape(-1)).reshape(M, K, K), counts, atol=1e-9)


def test_scale_point_estimate_is_the_closed_form_maximum_and_the_objective_never_decreases():
    sim = F.simulate(seed=3, N=2, T=60)
    _, s = _structure(sim)
    state, q = L.start(s, 0, torch.Generator().manual_seed(3))
    fit = L.coordinate_ascent(s, (state, q), 200, 1e-10)
    assert all(b >= a - 1e-9 * abs(a) for a, b in zip(fit.history, fit.history[1:]))
    state, q = fit.state
    mid = L.Globals(L.trans_step(s, state), *L.means_step(s, state, q.var), q.var)
    n, R = L.residual(s, state, mid)
    # HalfNormal(s0) prior: maximize -n log sigma - R / 2 sigma^2 - sigma^2 / 2 s0^2 => v^2 / s0^2 + n v - R = 0
    s0 = float(s.scale.prior.scale)
    v = s0 ** 2 * (-n + torch.sqrt(n ** 2 + 4 * R / s0 ** 2)) / 2
    assert torch.allclose(L.scale_step(s, state, mid), v.expand(s.K), rtol=1e-10)


def test_factorial_hmm_routes_to_vi_and_matches_the_exact_backend():
    sim = F.simulate(seed=0)
    plan = ppl.compile(F.model, *sim.args, **sim.kwargs)
    assert plan.backend == "vi"
    rows = {t.site: t.treatment for t in plan.treatments}
    assert rows == {"trans": "natural gradient", "means": "natural gradient", "scale": "point estimate",
                    "z": "message passing", "y": "observed"}
    post = ppl.infer(F.model, *sim.args, model_kwargs=sim.kwargs, progress=False)
    exact = ppl.infer(F.model, *sim.args, model_kwargs=sim.kwargs, backend="exact", progress=False)
    assert all(b <= a + 1e-9 * abs(a) for a, b in zip(post.history, post.history[1:]))   # -objective
    chains, states = F.best_relabelling(post.mean("means"), exact.mean("means"))
    ours = F._relabel(post.mean("means"), chains, states, 1)
    centre = lambda w: w - w.mean(-1, keepdim=True)  # noqa: E731
    assert float((centre(ours) - centre(exact.mean("means"))).abs().max()) < 0.01
    assert abs(float(post.mean("scale")) - float(exact.mean("scale"))) < 0.005
    assert slds.segmentation_accuracy(post.viterbi("z").reshape(-1), exact.viterbi("z").reshape(-1), 4) > 0.99
    assert post.sample(2)["z"].shape == (2,) + tuple(sim.args[0].shape)


@ppl.model
def _softmax_chain(y, K: int = 2):
    """Transitions by a softmax of Normal logits: not log-linear in a Dirichlet global."""
    logits = ppl.sample("logits", dist.Normal(y.new_zeros(K, K), 1.0).to_event(2))
    loc = ppl.sample("loc", dist.Normal(y.new_zeros(K), 5.0).to_event(1))
    scale = ppl.sample("scale", dist.HalfNormal(y.new_tensor(2.0)))
    z = ppl.markov_chain("z", K, torch.softmax(logits, -1), length=y.shape[-1])
    ppl.sample("y", dist.Normal(loc[z], scale).to_event(1), obs=y)


@ppl.model
def _per_state_scales(y, K: int = 2):
    """A scale per state (HalfNormal): not the one scalar scale the linear chain point-estimates."""
    trans = ppl.sample("trans", dist.Dirichlet(y.new_ones(K, K)).to_event(1))
    loc = ppl.sample("loc", dist.Normal(y.new_zeros(K), 5.0).to_event(1))
    scale = ppl.sample("scale", dist.HalfNormal(y.new_ones(K)).to_event(1))
    z = ppl.markov_chain("z", K, trans, length=y.shape[-1])
    ppl.sample("y", dist.Normal(loc[z], scale[z]).to_event(1), obs=y)


@pytest.mark.parametrize("model, site, why", [(_softmax_chain, "z", "transition is not log-linear"),
                                              (_per_state_scales, "y", "scale depends on the latents")])
def test_structures_outside_the_linear_chain_are_refused_naming_a_site(model, site, why):
    y = torch.randn(30)
    plan = ppl.compile(model, y)
    assert plan.backend == "exact"
    with pytest.raises(NotConjugate, match=f"site '{site}': its {why}"):
        L.analyse(model, (y,), {}, plan.facts, plan.graph)
    if model is _per_state_scales:   # not a linear chain, but a VB-HMM given its scales (``point_globals``)
        post = ppl.infer(model, y, backend="vi", progress=False)
        assert plan.facts.of("vi").point_estimated == ("scale",) and post.point["scale"].shape == (2,)
        return
    with pytest.raises(UnsupportedModelError, match=f"nor is it a linear chain .*site '{site}': its {why}"):
        ppl.infer(model, y, backend="vi", progress=False)


def test_missing_values_are_masked_and_nan_data_is_an_error():
    sim = F.simulate(seed=4, N=2, T=40)
    y = sim.args[0].clone()
    y[0, 5] = float("nan")
    with pytest.raises(ValueError, match="'y'"):
        ppl.infer(F.model, y, model_kwargs=sim.kwargs, progress=False)
