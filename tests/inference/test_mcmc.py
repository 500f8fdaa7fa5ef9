"""MCMC backend: NUTS on a normal-normal model matches the closed-form posterior; sampler statistics, seeds,
continuation (resume=, in this process and after save / load in a fresh one), Ctrl-C and bad options."""
import dataclasses
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from pyro.ops.stats import effective_sample_size
from torch.fx.experimental.proxy_tensor import make_fx

import ppl
from ppl.compiler import compile as compile_model
from ppl.inference.mcmc import backend as mcmc_backend
from ppl.inference.mcmc.nuts import AllChains, Recorded
from ppl.inference.mcmc.potential import make_potential
from ppl.inference.graph_recording import fold_and_simplify
from ppl.inference.training import Interrupted
from tests.ppl import models_for_tests as M
from tests.ppl.models_for_tests import normal_normal

ROOT = Path(__file__).resolve().parents[2]


def test_nuts_matches_conjugate_posterior():
    torch.manual_seed(1)
    y = 3.0 + 1.5 * torch.randn(20)
    post = ppl.infer(normal_normal, y, backend="auto", num_samples=200, warmup_steps=100, num_chains=2,
                     progress=False)
    assert post.plan.backend == "mcmc"
    precision = 1 / 2.0 ** 2 + 20 / 1.5 ** 2
    mean = (1.0 / 2.0 ** 2 + float(y.sum()) / 1.5 ** 2) / precision
    sd = precision ** -0.5
    draws = post.sample(400)["mu"]
    # tolerances: 4.5 Monte Carlo standard errors from the ESS (one-dimensional NUTS often stops after one
    # step at a U-turn, so the ESS is ~70 of 400 here)
    ess = float(post.mcmc.ess["mu"])
    assert abs(float(draws.mean()) - mean) < 4.5 * sd / ess ** 0.5
    assert abs(float(draws.std()) - sd) < 4.5 * sd / (2 * ess) ** 0.5
    assert post.draws["mu"].shape == (2, 200)
    assert float(post.mcmc.r_hat["mu"]) < 1.05
    assert post.mcmc.divergences == 0


def test_nuts_enumerates_a_mixture():
    """NUTS with the discrete assignment enumerated: two well separated clusters."""
    torch.manual_seed(2)
    x = torch.cat([torch.randn(30) - 3, torch.randn(30) + 3])

    @ppl.model
    def mix(x):
        loc = ppl.sample("loc", ppl.dist.Normal(torch.tensor([-1.0, 1.0]), 5.0).to_event(1))
        with ppl.plate("data", x.shape[0]):
            z = ppl.sample("z", ppl.dist.Categorical(torch.tensor([0.5, 0.5])))
            ppl.sample("x", ppl.dist.Normal(loc[z], 1.0), obs=x)

    post = ppl.infer(mix, x, backend="mcmc", num_samples=150, num_chains=1, progress=False)
    loc = post.mean("loc")
    assert abs(float(loc[0]) + 3) < 0.6 and abs(float(loc[1]) - 3) < 0.6
    z = post.marginals("z").argmax(-1)
    assert (z[:30] == 0).all() and (z[30:] == 1).all()


def test_sampler_statistics_reach_arviz_and_seed_changes_the_draws():
    """What NUTS wrote per draw (diverging, step size, acceptance) is in post.mcmc and in ArviZ's
    sample_stats; R-hat and ESS in its attributes; infer(seed=) reaches the sampler."""
    arviz = pytest.importorskip("arviz")
    y = 1.0 + torch.randn(10)
    post = ppl.infer(normal_normal, y, num_samples=30, warmup_steps=30, num_chains=2, seed=3, progress=False)
    stats = post.mcmc.per_draw
    assert set(stats) == {"diverging", "tree_depth", "n_steps", "step_size", "accept_prob", "energy"}
    assert all(v.shape == (2, 30) for v in stats.values())
    assert bool(((stats["accept_prob"] >= 0) & (stats["accept_prob"] <= 1)).all())
    assert bool((stats["step_size"] > 0).all()) and int(stats["diverging"].sum()) == post.mcmc.divergences
    # the step size is adapted during warmup only: constant per chain afterwards
    assert bool((stats["step_size"] == stats["step_size"][:, :1]).all())
    idata = post.to_arviz()
    assert isinstance(idata, arviz.InferenceData)
    assert idata.sample_stats["diverging"].shape == (2, 30) and "step_size" in idata.sample_stats
    assert idata.attrs["r_hat_mu"] == pytest.approx(float(post.mcmc.r_hat["mu"]))
    again = ppl.infer(normal_normal, y, num_samples=30, warmup_steps=30, num_chains=2, seed=3, progress=False)
    other = ppl.infer(normal_normal, y, num_samples=30, warmup_steps=30, num_chains=2, seed=4, progress=False)
    assert torch.equal(post.draws["mu"], again.draws["mu"])
    assert not torch.equal(post.draws["mu"], other.draws["mu"])


def test_sampler_reports_bulk_and_tail_ess_and_tree_depth():
    """ArviZ's rank-normalized bulk and tail ESS per site are in post.mcmc (they equal arviz.ess on the draws);
    tree depth, leapfrog steps and energy per draw reach ArviZ's sample_stats (BFMI computes from the energy)."""
    arviz = pytest.importorskip("arviz")
    y = 1.0 + torch.randn(10)
    post = ppl.infer(normal_normal, y, num_samples=60, warmup_steps=40, num_chains=2, seed=1, progress=False)
    idata = post.to_arviz()
    for method, got in (("bulk", post.mcmc.ess_bulk), ("tail", post.mcmc.ess_tail)):
        assert float(got["mu"]) == pytest.approx(float(arviz.ess(idata, method=method)["mu"]))
    assert idata.sample_stats["tree_depth"].shape == (2, 60)
    assert bool((post.mcmc.per_draw["tree_depth"] >= 1).all())
    assert arviz.bfmi(idata).shape == (2,)


def test_resume_continues_the_chains_exactly():
    """resume= continues from the last state with the adapted step size and mass matrix and no warmup: 20 draws
    then 15 more are the 35 draws of one run (same seed), with the statistics of the combined chains; the
    plan records the continuation (not the previous Posterior)."""
    y = 1.0 + torch.randn(12)
    first = ppl.infer(normal_normal, y, num_samples=20, warmup_steps=30, seed=1, progress=False)
    more = ppl.infer(normal_normal, y, backend="mcmc", num_samples=15, resume=first, progress=False)
    whole = ppl.infer(normal_normal, y, num_samples=35, warmup_steps=30, seed=1, progress=False)
    assert more.draws["mu"].shape == (2, 35)
    assert torch.equal(more.draws["mu"], whole.draws["mu"])
    for k, v in whole.mcmc.per_draw.items():
        assert torch.equal(more.mcmc.per_draw[k], v), k
    assert float(more.mcmc.r_hat["mu"]) == pytest.approx(float(whole.mcmc.r_hat["mu"]))
    assert float(more.mcmc.ess_bulk["mu"]) == pytest.approx(float(whole.mcmc.ess_bulk["mu"]))
    assert torch.equal(first.draws["mu"], whole.draws["mu"][:, :20])       # the first Posterior is untouched
    assert dict(more.plan.options)["resume"] == "continued after 20 draws per chain"
    again = ppl.inference.mcmc.continue_sampling(first, 15, progress=False)
    assert torch.equal(again.draws["mu"], whole.draws["mu"])


CHILD = textwrap.dedent("""
    import sys, torch
    import ppl
    from ppl.inference.mcmc import continue_sampling
    saved, result = sys.argv[1:]
    post = ppl.Posterior.load(saved)
    torch.save(continue_sampling(post, 10, progress=False).draws, result)
""")


def test_a_saved_run_continues_in_a_fresh_process(tmp_path):
    """The sampler state round-trips through save / load: a new process continues the chains to the same draws
    as this one."""
    y = 1.0 + torch.randn(12)
    post = ppl.infer(normal_normal, y, num_samples=15, warmup_steps=20, seed=2, progress=False)
    post.save(tmp_path / "post.pt")
    subprocess.run([sys.executable, "-c", CHILD, str(tmp_path / "post.pt"), str(tmp_path / "draws.pt")],
                   check=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    there = torch.load(tmp_path / "draws.pt")
    here = ppl.inference.mcmc.continue_sampling(post, 10, progress=False).draws
    assert set(there) == set(here) and torch.equal(there["mu"], here["mu"])


def test_ctrl_c_returns_the_draws_reached(monkeypatch):
    """A KeyboardInterrupt during the draws returns a Posterior of the draws so far, marked interrupted, with an
    Interrupted warning; resume= completes it to the uninterrupted run."""
    y = 1.0 + torch.randn(12)
    calls = {"n": 0, "limit": 10 ** 9}

    def counting(*args, **kwargs):
        potential = make_potential(*args, **kwargs)

        def potential_and_grad(z):
            calls["n"] += 1
            if calls["n"] == calls["limit"]:
                raise KeyboardInterrupt
            return potential.potential_and_grad(z)

        return dataclasses.replace(potential, potential_and_grad=potential_and_grad)

    monkeypatch.setattr(mcmc_backend, "make_potential", counting)
    whole = ppl.infer(normal_normal, y, num_samples=30, warmup_steps=20, seed=3, progress=False)
    calls.update(n=0, limit=calls["n"] - 25)
    with pytest.warns(Interrupted):
        cut = ppl.infer(normal_normal, y, num_samples=30, warmup_steps=20, seed=3, progress=False)
    n = cut.draws["mu"].shape[1]
    assert cut.interrupted and 0 < n < 30 and "interrupted" in repr(cut)
    assert torch.equal(cut.draws["mu"], whole.draws["mu"][:, :n])
    calls.update(n=0, limit=10 ** 9)
    rest = ppl.infer(normal_normal, y, backend="mcmc", num_samples=30 - n, resume=cut, progress=False)
    assert not rest.interrupted and torch.equal(rest.draws["mu"], whole.draws["mu"])


@pytest.mark.parametrize("options, words", [
    (dict(num_chains=0), "num_chains must be an integer >= 1, got 0"),
    (dict(warmup_steps=-2), "warmup_steps must be an integer >= 0, got -2"),
    (dict(dense_mass="yes"), "dense_mass must be True or False, got 'yes'"),
    (dict(target_accept=1.5), "target_accept must be a number in (0, 1), got 1.5"),
    (dict(max_tree_depth=0), "max_tree_depth must be an integer >= 1, got 0"),
    (dict(resume="post.pt"), "resume= takes a Posterior of backend 'mcmc', got str"),
])
def test_bad_options_are_named(options, words):
    with pytest.raises(ValueError) as info:
        ppl.infer(normal_normal, torch.randn(5), backend="mcmc", num_samples=5, progress=False, **options)
    assert words in str(info.value)


def test_resume_refuses_what_it_cannot_continue():
    y = torch.randn(8)
    post = ppl.infer(normal_normal, y, num_samples=5, warmup_steps=5, progress=False)
    for options, words in ((dict(num_chains=3), "continues the 2 chains of the previous run; got num_chains=3"),
                           (dict(warmup_steps=10), "continues without warmup")):
        with pytest.raises(ValueError, match=words):
            ppl.infer(normal_normal, y, backend="mcmc", num_samples=5, resume=post, progress=False, **options)
    svi = ppl.infer(normal_normal, y, backend="svi", num_steps=5, num_samples=5, progress=False)
    with pytest.raises(ValueError, match="this one is from backend 'svi'"):
        ppl.infer(normal_normal, y, backend="mcmc", num_samples=5, resume=svi, progress=False)
    with pytest.raises(ValueError, match="holds a fit of model 'normal_normal', not of 'shifted'"):
        ppl.infer(M.shifted, y, backend="mcmc", num_samples=5, resume=post, progress=False)


LOCS = torch.tensor([-1.0, 1.0], dtype=torch.float64)


@ppl.model
def sticky_hmm(y):
    trans = ppl.sample("trans", ppl.dist.Dirichlet(torch.ones(2, 2, dtype=y.dtype)).to_event(1))
    z = ppl.markov_chain("z", num_states=2, transition=trans, length=y.shape[-1])
    ppl.sample("y", ppl.dist.Normal(LOCS[z], 1.0), obs=y)


def grid_posterior_means(y: torch.Tensor, n: int = 200) -> torch.Tensor:
    """E[P(stay in 0)], E[P(stay in 1)] by quadrature on an n x n midpoint grid: uniform Dirichlet(1, 1) rows,
    likelihood by the forward algorithm (uniform initial state), all grid points at once."""
    p = (torch.arange(n, dtype=torch.float64) + 0.5) / n
    s0, s1 = torch.meshgrid(p, p, indexing="ij")
    s0, s1 = s0.reshape(-1), s1.reshape(-1)
    log_trans = torch.stack([torch.stack([s0, 1 - s0], -1), torch.stack([1 - s1, s1], -1)], 1).log()
    emit = torch.distributions.Normal(LOCS, 1.0).log_prob(y[:, None])                     # (T, 2)
    alpha = torch.log(torch.tensor(0.5, dtype=torch.float64)) + emit[0].expand(s0.shape[0], 2)
    for t in range(1, y.shape[0]):
        alpha = torch.logsumexp(alpha[..., None] + log_trans, 1) + emit[t]
    w = torch.softmax(torch.logsumexp(alpha, -1), 0)
    return torch.stack([(w * s0).sum(), (w * s1).sum()])


@pytest.mark.slow
def test_nuts_over_hmm_transitions_with_the_chain_collapsed():
    """NUTS over the transition matrix of a 2-state HMM whose path is marginalized by the forward algorithm
    (the potential of chains.fit_model): the posterior means of the stay probabilities match quadrature on a grid
    within 4.5 Monte Carlo standard errors (ESS-based). Slow (the quadrature and 2 x 250 transitions); the fast
    variants: the 3-state rows against the Dirichlet posterior of a known path (below), the collapse by
    test_exact_backend / test_hmm, constrained sites by test_nuts_constrains_a_positive_site, the sampler by
    test_nuts.py and test_sbc.py."""
    g = torch.Generator().manual_seed(0)
    states = (torch.arange(40) // 10) % 2
    y = LOCS[states] + torch.randn(40, generator=g, dtype=torch.float64)
    post = ppl.infer(sticky_hmm, y, backend="mcmc", num_samples=150, warmup_steps=100, seed=1, progress=False)
    stay = post.draws["trans"].diagonal(dim1=-2, dim2=-1)                                  # (chains, draws, 2)
    ess = effective_sample_size(stay, chain_dim=0, sample_dim=1)
    flat = stay.reshape(-1, 2)
    want = grid_posterior_means(y)
    assert bool(((flat.mean(0) - want).abs() < 4.5 * flat.std(0) / ess.sqrt()).all()), (flat.mean(0), want, ess)
    assert post.marginals("z").shape == (40, 2)


@ppl.model
def branching(y):
    mu = ppl.sample("mu", ppl.dist.Normal(torch.tensor(0.0, dtype=y.dtype), 1.0))
    noise = 1.0 if float(mu.detach()) > 0 else 3.0                      # a branch of the model on a latent value
    with ppl.plate("data", y.shape[0]):
        ppl.sample("y", ppl.dist.Normal(mu, noise), obs=y)


def _normal_potential(mu: torch.Tensor, y: torch.Tensor, noise) -> torch.Tensor:
    """-log N(mu; 0, 1) - sum log N(y; mu, noise) for mu ``(C,)``."""
    normal = torch.distributions.Normal
    return -(normal(0.0, 1.0).log_prob(mu) + normal(mu[:, None], noise[:, None]).log_prob(y).sum(-1))


def test_traced_potential_equals_the_model_everywhere_and_guards_its_branches():
    """The backend's potential is one traced graph of all chains (nuts.AllChains) and equals the closed form away
    from the starting points, on all chains at once and on a subset of rows; a model that branches on a latent
    value (float(mu) > 0, which vmap refuses) is traced one row at a time with a guard on that value: on the other
    branch the call is evaluated eagerly and still equals the closed form (a trace that baked the branch in would
    be silently wrong there)."""

    y = torch.tensor([0.5, 1.5, -0.3], dtype=torch.float64)
    torch.manual_seed(0)
    plain = make_potential(normal_normal, (y,), {}, compile_model(normal_normal, y, backend="mcmc"), 4)
    assert isinstance(plain.potential_and_grad, AllChains)
    z = torch.tensor([[-2.0], [0.1], [0.7], [3.0]], dtype=torch.float64).requires_grad_(True)
    normal = torch.distributions.Normal
    want = -(normal(1.0, 2.0).log_prob(z[:, 0]) + normal(z, 1.5).log_prob(y).sum(-1))
    (want_grad,) = torch.autograd.grad(want.sum(), z)
    u, g = plain.potential_and_grad(z.detach())
    assert torch.allclose(u, want.detach(), atol=1e-10) and torch.allclose(g, want_grad, atol=1e-10)
    u3, g3 = plain.potential_and_grad(z.detach()[:3])
    assert torch.allclose(u3, want.detach()[:3], atol=1e-10) and torch.allclose(g3, want_grad[:3], atol=1e-10)

    torch.manual_seed(1)
    guarded = make_potential(branching, (y,), {}, compile_model(branching, y, backend="mcmc"), 2)
    # vmap refuses float(mu): rows traced, one graph run per row, marked as needing no autograd
    assert isinstance(guarded.potential_and_grad, Recorded)
    assert guarded.potential_and_grad.fn.__qualname__.startswith("_traced.")
    for mu in ([0.5, 1.0], [-0.5, -1.0], [0.5, -1.0]):
        z = torch.tensor(mu, dtype=torch.float64)[:, None].requires_grad_(True)
        noise = torch.where(z[:, 0] > 0, 1.0, 3.0).to(z.dtype)
        want = _normal_potential(z[:, 0], y, noise)
        (want_grad,) = torch.autograd.grad(want.sum(), z)
        with torch.inference_mode():    # as the sampler calls it: the eager fallback leaves inference mode
            u, g = guarded.potential_and_grad(z.detach().clone())
        assert torch.allclose(u, want.detach(), atol=1e-10), (mu, u, want)
        assert torch.allclose(g, want_grad, atol=1e-10), (mu, g, want_grad)


SEPARATED = torch.tensor([-10.0, 0.0, 10.0], dtype=torch.float64)


@ppl.model
def separated_hmm(y):
    trans = ppl.sample("trans", ppl.dist.Dirichlet(torch.ones(3, 3, dtype=y.dtype)).to_event(1))
    z = ppl.markov_chain("z", num_states=3, transition=trans, length=y.shape[-1])
    ppl.sample("y", ppl.dist.Normal(SEPARATED[z], 1.0), obs=y)


def test_nuts_over_3_state_hmm_rows_matches_the_dirichlet_posterior_of_a_known_path():
    """K = 3 HMM through the backend (path collapsed by the forward algorithm, the potential traced with its
    transition-matrix checks guarded), NUTS over the Dirichlet(1) transition rows. The emission means are 10 noise
    sds apart, so the path is known up to ~T * 3e-7 of posterior mass and the rows' posterior is the conjugate
    Dirichlet(1 + transition counts of the true path), rows independent: the NUTS means of the 9 probabilities
    are within 4.5 Monte Carlo standard errors (posterior sd / sqrt(ESS)) of (1 + n_kj) / (3 + n_k) and the sds
    within 40% of the Dirichlet's."""
    g = torch.Generator().manual_seed(4)
    probs = torch.tensor([[0.8, 0.1, 0.1], [0.2, 0.6, 0.2], [0.3, 0.3, 0.4]], dtype=torch.float64)
    states = [0]
    for _ in range(29):
        states.append(int(torch.multinomial(probs[states[-1]], 1, generator=g)))
    states = torch.tensor(states)
    y = SEPARATED[states] + torch.randn(30, generator=g, dtype=torch.float64)
    counts = torch.zeros(3, 3, dtype=torch.float64).index_put_((states[:-1], states[1:]),
                                                               torch.ones(29, dtype=torch.float64), accumulate=True)
    alpha = 1 + counts
    mean = alpha / alpha.sum(-1, keepdim=True)
    sd = (mean * (1 - mean) / (alpha.sum(-1, keepdim=True) + 1)).sqrt()
    post = ppl.infer(separated_hmm, y, backend="mcmc", num_chains=2, num_samples=120, warmup_steps=120, seed=0,
                     progress=False)
    draws = post.draws["trans"]                                                          # (2, 120, 3, 3)
    ess = effective_sample_size(draws, chain_dim=0, sample_dim=1)
    flat = draws.reshape(-1, 3, 3)
    assert bool(((flat.mean(0) - mean).abs() < 4.5 * sd / ess.sqrt()).all()), (flat.mean(0), mean, ess)
    assert bool(((flat.std(0) / sd - 1).abs() < 0.4).all()), (flat.std(0), sd)


@ppl.model
def gamma_precision(y):
    tau = ppl.sample("tau", ppl.dist.Gamma(torch.tensor(2.0, dtype=y.dtype), 1.0))
    with ppl.plate("data", y.shape[0]):
        ppl.sample("y", ppl.dist.Normal(0.0, tau.rsqrt()), obs=y)


def test_nuts_constrains_a_positive_site():
    """A positive site is sampled on the log scale and its draws mapped back: the precision of a zero-mean normal,
    Gamma(2, 1) prior, has the posterior Gamma(2 + n/2, 1 + sum y^2 / 2); its mean is matched within 4.5 Monte
    Carlo standard errors and every draw is positive."""
    y = 0.5 * torch.randn(30, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    post = ppl.infer(gamma_precision, y, backend="mcmc", num_samples=100, warmup_steps=60, seed=0, progress=False)
    tau = post.draws["tau"]
    a, b = 2 + 15, 1 + float((y ** 2).sum()) / 2
    ess = float(effective_sample_size(tau, chain_dim=0, sample_dim=1))
    assert bool((tau > 0).all())
    assert abs(float(tau.mean()) - a / b) < 4.5 * (a ** 0.5 / b) / ess ** 0.5, (float(tau.mean()), a / b, ess)


def test_fold_and_simplify_drops_ops_that_compute_nothing_and_keeps_the_values():
    """A recorded graph with identities (x * 1, x + 0, x ** 1, a view to its own shape, a sum over an unsqueezed
    size-1 dimension), a shape-only op (ones_like) and a repeated subexpression (exp(x) twice) shrinks to the ops
    that compute something, and gives the same outputs as the plain recording at other inputs (1e-12)."""
    def f(x):
        a = torch.exp(x) * 1.0 + 0.0
        b = (torch.exp(x) ** 1.0).view(x.shape)
        c = (a * b).unsqueeze(-1).sum(-1)
        d = c + torch.ones_like(x) * 2.0
        return d.sum(-1), d * x, torch.zeros(0, dtype=torch.float64)

    example = torch.randn(4, 3, dtype=torch.float64)
    plain = make_fx(f)(example)
    slim = fold_and_simplify(make_fx(f)(example), example)
    ops = lambda m: sum(n.op == "call_function" for n in m.graph.nodes)   # noqa: E731
    assert ops(slim) <= ops(plain) - 7, (ops(plain), ops(slim))
    for seed in range(3):
        x = torch.randn(4, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
        for want, got in zip(plain(x), slim(x)):
            assert want.shape == got.shape and torch.allclose(want, got, rtol=1e-12, atol=0.0)


@ppl.model
def schools(y, sigma):
    mu = ppl.sample("mu", ppl.dist.Normal(torch.tensor(0.0, dtype=y.dtype), 5.0))
    tau = ppl.sample("tau", ppl.dist.HalfCauchy(torch.tensor(5.0, dtype=y.dtype)))
    with ppl.plate("school", y.shape[0]):
        theta_tilde = ppl.sample("theta_tilde", ppl.dist.Normal(torch.zeros_like(y), 1.0))
        ppl.sample("y", ppl.dist.Normal(mu + tau * theta_tilde, sigma), obs=y)


def schools_potential(site: dict, y: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """-log p(mu, log tau, theta~ | y) + const in closed form (tau = exp(log tau), its log-Jacobian included)."""
    d = torch.distributions
    mu, log_tau, tt = site["mu"], site["tau"], site["theta_tilde"]
    tau, zero, five = log_tau.exp(), torch.zeros((), dtype=y.dtype), torch.tensor(5.0, dtype=y.dtype)
    return -(d.Normal(zero, five).log_prob(mu) + d.HalfCauchy(five).log_prob(tau) + log_tau
             + d.Normal(zero, 1.0).log_prob(tt).sum() + d.Normal(mu + tau * tt, sigma).log_prob(y).sum())


def test_the_eight_schools_potential_graph_is_simplified_and_exact():
    """The backend's traced eight-schools potential (4 chains, its graph shrunk by fold_and_simplify) equals the
    closed-form potential and its autograd gradient at random points (1e-10), called as the sampler calls it."""
    y = torch.tensor([28.0, 8.0, -3.0, 7.0, -1.0, 1.0, 18.0, 12.0], dtype=torch.float64)
    sigma = torch.tensor([15.0, 10.0, 16.0, 11.0, 9.0, 11.0, 10.0, 18.0], dtype=torch.float64)
    torch.manual_seed(0)
    potential = make_potential(schools, (y, sigma), {}, compile_model(schools, y, sigma, backend="mcmc"), 4)
    assert isinstance(potential.potential_and_grad, AllChains) and not potential.potential_and_grad.needs_autograd
    z = torch.randn(4, potential.layout.dim, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        u, g = potential.potential_and_grad(z.clone())
    for c in range(4):
        row = z[c].clone().requires_grad_(True)
        want = schools_potential(potential.layout.unravel(row), y, sigma)
        (want_grad,) = torch.autograd.grad(want, row)
        assert torch.allclose(u[c], want.detach(), rtol=1e-10), (u[c], want)
        assert torch.allclose(g[c], want_grad, rtol=1e-10), (g[c], want_grad)
