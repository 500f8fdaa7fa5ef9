"""Backend "vi" (conjugate variational Bayes) against oracles on the same input:

- models whose posterior is in the variational family (no discrete latent): the exact posterior and
  ELBO = the exact log evidence in closed form (Dirichlet-categorical, normal mean with known variance,
  gamma-Poisson, beta-Bernoulli, normal-inverse-Wishart);
- the VB-HMM local step: expected counts, marginals and entropy equal brute-force enumeration of every path
  given the same E_q[log] tables (tests/reference/brute_force.py);
- VB-GMM with NIW priors: the same fixed point as scikit-learn's BayesianGaussianMixture with the same priors;
- the ELBO never decreases on every model run here; bad input and non-conjugate models get clear errors.
"""
import math
import pickle
import subprocess
import sys

import pytest
import torch
from torch.distributions import Beta, Dirichlet, Gamma, MultivariateNormal, kl_divergence

import ppl
from ppl import dist
from ppl.analysis import analyze
from ppl.backends import UnsupportedModelError, all_backends, routing_rules
from ppl.compiler import with_backend_facts
from ppl.expfam import niw
from ppl.graph import trace_graph
from ppl.inference.vi import backend as vi_backend
from ppl.inference.vi import cavi, conjugacy, probe
from ppl.inference.vi.backend import RULES, vi_facts
from ppl.inference.vi.families import FAMILIES
from tests.ppl import models_for_tests as M
from tests.reference.brute_force import brute_force
from tests.test_posterior_roundtrip import CHILD, ROOT, assert_identical, outputs

D64 = torch.float64


def fit(model, *args, **options):
    options.setdefault("progress", False)
    return ppl.infer(model, *args, backend="vi", **options)


def assert_monotone(post):
    """The ELBO (``-history``, the objective per sweep) never decreases by more than round-off."""
    h = [-v for v in post.history]
    assert len(h) >= 1
    for a, b in zip(h, h[1:]):
        assert b >= a - 1e-9 * (abs(a) + 1), (a, b)


def structure_of(model, *args, **kwargs):
    """The probed conjugate structure (what ``run`` fits)."""
    graph, trace = trace_graph(model, args, kwargs)
    facts = analyze(graph, model, args, kwargs, trace)
    return conjugacy.analyse(model, args, kwargs, facts, graph), facts, graph


# --------------------------------------------------------------------------------------------------------------
# exact posteriors: no discrete latent, one sweep is exact and the ELBO is log p(data)

@ppl.model
def dirichlet_categorical(y, alpha):
    probs = ppl.sample("probs", dist.Dirichlet(alpha))
    with ppl.plate("data", y.shape[0]):
        ppl.sample("y", dist.Categorical(probs), obs=y)


@ppl.model
def gamma_poisson(y, a=2.0, b=0.5):
    rate = ppl.sample("rate", dist.Gamma(torch.tensor(a, dtype=D64), torch.tensor(b, dtype=D64)))
    with ppl.plate("data", y.shape[0]):
        ppl.sample("y", dist.Poisson(rate), obs=y)


@ppl.model
def beta_bernoulli(y, a=2.0, b=3.0):
    p = ppl.sample("p", dist.Beta(torch.tensor(a, dtype=D64), torch.tensor(b, dtype=D64)))
    with ppl.plate("data", y.shape[0]):
        ppl.sample("y", dist.Bernoulli(p), obs=y)


@ppl.model
def niw_gaussian(y, kappa=0.5, df=5.0):
    D = y.shape[-1]
    theta = ppl.sample("theta", ppl.NormalInverseWishart(y.new_zeros(D), kappa, torch.eye(D, dtype=y.dtype), df))
    loc, cov = ppl.NormalInverseWishart.unpack(theta)
    with ppl.plate("data", y.shape[0]):
        ppl.sample("y", dist.MultivariateNormal(loc, cov), obs=y)


def test_dirichlet_categorical_gives_the_exact_posterior_and_log_evidence():
    alpha = torch.tensor([0.5, 1.0, 2.0, 3.0], dtype=D64)
    y = torch.tensor([0, 1, 1, 3, 3, 3, 2, 1, 3, 0, 3])
    post = fit(dirichlet_categorical, y, alpha, num_samples=20000)
    counts = torch.bincount(y, minlength=4).to(D64)
    a = alpha + counts
    log_b = lambda c: torch.lgamma(c).sum() - torch.lgamma(c.sum())  # noqa: E731
    assert post.log_evidence.kind == "ELBO (lower bound)"
    assert abs(float(post.log_evidence) - float(log_b(a) - log_b(alpha))) < 1e-9
    assert torch.allclose(post.point["probs"], (a - 1) / (a.sum() - 4), atol=1e-12)   # q's mode (every a >= 1)
    assert torch.allclose(post.mean("probs"), a / a.sum(), atol=0.01)               # 20000 draws: sd < 0.001
    var = a * (a.sum() - a) / (a.sum() ** 2 * (a.sum() + 1))
    assert torch.allclose(post.draws["probs"][0].var(0), var, rtol=0.05)         # 20000 draws: sd of a var ~1.5%
    assert_monotone(post)


def test_normal_mean_with_known_variance_gives_the_exact_posterior_and_log_evidence():
    y = torch.tensor([0.3, 1.7, 2.2, -0.4, 1.1], dtype=D64)
    m0, s0, s = 1.0, 2.0, 1.5
    post = fit(M.normal_normal, y.double(), num_samples=20000)
    prec = 1 / s0 ** 2 + len(y) / s ** 2
    mean = (m0 / s0 ** 2 + y.sum() / s ** 2) / prec
    cov = s0 ** 2 * torch.ones(5, 5, dtype=D64) + s ** 2 * torch.eye(5, dtype=D64)
    exact = MultivariateNormal(torch.full((5,), m0, dtype=D64), cov).log_prob(y)
    assert abs(float(post.log_evidence) - float(exact)) < 1e-9
    assert abs(float(post.point["mu"]) - float(mean)) < 1e-12
    assert abs(float(post.draws["mu"].var()) - 1 / prec) < 0.05 / prec
    assert_monotone(post)


def test_gamma_poisson_and_beta_bernoulli_log_evidence_are_exact():
    y = torch.tensor([3.0, 0.0, 5.0, 2.0, 4.0], dtype=D64)
    post = fit(gamma_poisson, y)
    a, b, n, s = 2.0, 0.5, len(y), float(y.sum())
    exact = (a * math.log(b) - math.lgamma(a) + math.lgamma(a + s) - (a + s) * math.log(b + n)
             - float(torch.lgamma(y + 1).sum()))
    assert abs(float(post.log_evidence) - exact) < 1e-9
    assert abs(float(post.point["rate"]) - (a + s - 1) / (b + n)) < 1e-12          # q's mode
    x = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0, 0.0, 0.0], dtype=D64)
    post = fit(beta_bernoulli, x)
    a, b, k, n = 2.0, 3.0, 3.0, 7.0
    lbeta = lambda p, q: math.lgamma(p) + math.lgamma(q) - math.lgamma(p + q)  # noqa: E731
    assert abs(float(post.log_evidence) - (lbeta(a + k, b + n - k) - lbeta(a, b))) < 1e-9
    assert abs(float(post.point["p"]) - (a + k - 1) / (a + b + n - 2)) < 1e-12      # q's mode


def test_normal_inverse_wishart_gaussian_log_evidence_is_exact():
    y = torch.randn(20, 2, dtype=D64) @ torch.tensor([[1.0, 0.3], [0.0, 0.7]], dtype=D64) + 0.5
    post = fit(niw_gaussian, y)
    prior = niw.natural_from_standard(torch.zeros(2, dtype=D64), 0.5, torch.eye(2, dtype=D64), 5.0)
    posterior = niw.conjugate_update(prior, niw.data_stats(y))
    exact = niw.log_partition(posterior) - niw.log_partition(prior) - 20 * math.log(2 * math.pi)
    assert abs(float(post.log_evidence) - float(exact)) < 1e-8
    assert post.draws["theta"].shape == (1, 1000, 2, 3)
    std = niw.standard_from_natural(posterior)                    # the joint mode: [Psi / (nu + D + 2) | mu_0]
    assert torch.allclose(post.point["theta"], torch.cat([std.scale / (std.df + 4), std.loc[:, None]], -1),
                          atol=1e-12)
    assert_monotone(post)


# --------------------------------------------------------------------------------------------------------------
# VB-HMM local step against brute force, given the same E_q[log] tables

@ppl.model
def poisson_hmm(y, K=2):
    trans = ppl.sample("trans", dist.Dirichlet(y.new_ones(K, K)).to_event(1))
    init = ppl.sample("init", dist.Dirichlet(y.new_ones(K)))
    rate = ppl.sample("rate", dist.Gamma(y.new_full((K,), 2.0), 0.5).to_event(1))
    z = ppl.markov_chain("z", K, trans, init, length=y.shape[-1])
    ppl.sample("y", dist.Poisson(rate[z]).to_event(1), obs=y)


def test_vb_hmm_expected_counts_equal_brute_force_enumeration():
    y = torch.tensor([0.0, 1.0, 7.0, 9.0, 2.0], dtype=D64)
    structure, _, _ = structure_of(poisson_hmm, y)
    labels = torch.tensor([0, 0, 1, 1, 0])
    fitted = cavi.coordinate_ascent(structure, cavi.hard_local(structure, labels), 3, 0.0)
    q = fitted.q
    tables = cavi.child_tables(structure, q)
    state = cavi.local_step(structure, q, tables)
    logs = cavi.local_logs(structure, q)
    log_lik = tables["y"].movedim(0, -1)
    bf = brute_force(logs["initial"], logs["transition"], log_lik)
    assert torch.allclose(state.r.movedim(0, -1), bf.marginals, atol=1e-12)
    assert torch.allclose(state.counts["transition"], bf.pairwise, atol=1e-12)
    assert torch.allclose(state.counts["initial"], bf.marginals[0], atol=1e-12)
    # entropy of q(z) = the path distribution's entropy
    p = bf.path_probs
    assert abs(float(state.entropy) + float((p * p.clamp_min(1e-300).log()).sum())) < 1e-10
    # the sub-normalized tables: E_q[log A] rows sum to less than one
    assert bool((logs["transition"].exp().sum(-1) < 1).all())


def test_vb_hmm_fits_a_batch_and_the_posterior_over_transitions_is_dirichlet():
    gen = torch.Generator().manual_seed(1)
    z = [0]
    for _ in range(299):
        z.append(z[-1] if torch.rand((), generator=gen) < 0.9 else 1 - z[-1])
    y = torch.poisson(torch.tensor([2.0, 12.0], dtype=D64)[torch.tensor(z)], generator=gen).reshape(3, 100)
    post = fit(poisson_hmm, y[0])
    assert_monotone(post)
    assert post.draws["trans"].shape == (1, 1000, 2, 2)
    sd = post.draws["trans"][0].std(0)
    assert bool((sd > 0.005).all()) and bool((sd < 0.2).all())               # a posterior, not a point
    rates = post.point["rate"].sort().values
    assert abs(float(rates[0]) - 2.0) < 1.0 and abs(float(rates[1]) - 12.0) < 2.0
    assert post.marginals("z").shape == (100, 2) and post.viterbi("z").shape == (100,)
    assert set(post.elbo_terms) >= {"E log p(y)", "E log p(z)", "entropy(z)", "-KL(trans)", "-KL(rate)"}
    total = sum(v[-1] for v in post.elbo_terms.values())
    assert abs(total - float(post.log_evidence)) < 1e-8 * abs(total)


def test_vb_hmm_point_is_the_em_update_of_the_final_expected_counts():
    """``post.point`` is q's mode: with Dirichlet(1) rows the normalized expected counts of the last sweep (the
    EM M-step, no shrinkage towards uniform), with Gamma(2, 0.5) rates (1 + sum r y) / (0.5 + sum r) (MAP's
    M-step); the final sweep's counts are recomputed here by brute-force enumeration of every path (oracle)."""
    gen = torch.Generator().manual_seed(3)
    y = torch.poisson(torch.tensor([1.0, 9.0], dtype=D64)[torch.tensor([0, 0, 1, 1, 1, 0, 1, 1])], generator=gen)
    post = fit(poisson_hmm, y, restarts=1, tol=1e-14, num_steps=5000)
    structure, _, _ = structure_of(poisson_hmm, y)
    # q at the fixed point rebuilt from the point: Dirichlet(1 + counts) / Gamma(2 + sum r y, 0.5 + sum r); the
    # counts must be what brute force gives for the tables E_q[log] of that q (the fixed-point condition). The
    # marginals r are one E-step after the last global step: equal at convergence up to ~1e-8 relative.
    r = post.marginals("z")                                                             # (T, K)
    a_rate, b_rate = 2.0 + (r * y[:, None]).sum(0), 0.5 + r.sum(0)
    torch.testing.assert_close(post.point["rate"], (a_rate - 1) / b_rate, rtol=1e-6, atol=0)
    torch.testing.assert_close(post.point["init"], r[0], rtol=1e-6, atol=1e-9)           # Dirichlet(1 + r_0)'s mode
    # the transition counts at the final q by brute force over the 2^8 paths, from the q the point came from
    trans_alpha = 1.0 + _pairwise_counts_from_point(post)
    q = {"trans": (trans_alpha,), "init": (1.0 + r[0],), "rate": (a_rate, b_rate)}
    tables = cavi.child_tables(structure, q)
    logs = cavi.local_logs(structure, q)
    bf = brute_force(logs["initial"], logs["transition"], sum(tables.values()).movedim(0, -1))
    counts = bf.pairwise
    torch.testing.assert_close(post.point["trans"], counts / counts.sum(-1, keepdim=True), rtol=1e-6, atol=1e-9)
    # q's mean is shrunk towards uniform: (n_ij + 1) / (n_i + K)
    mean = (counts + 1) / (counts.sum(-1, keepdim=True) + 2)
    assert float((post.point["trans"] - 0.5).abs().max()) > float((mean - 0.5).abs().max()) + 0.01


def _pairwise_counts_from_point(post) -> torch.Tensor:
    """The expected transition counts n_ij behind a Dirichlet(1) row's mode ``n_ij / n_i``: rows scaled by
    n_i = E[number of steps leaving state i] = sum of the marginals over t < T."""
    leaving = post.marginals("z")[:-1].sum(0)
    return post.point["trans"] * leaving[:, None]


@pytest.mark.parametrize("family, params", [
    ("Dirichlet", (torch.tensor([[2.0, 3.0, 5.0], [1.0, 2.5, 4.0], [0.5, 2.0, 3.0], [1.0, 1.0, 1.0]], dtype=D64),)),
    ("Gamma", (torch.tensor([3.0, 1.0, 0.5], dtype=D64), torch.tensor([2.0, 0.5, 1.5], dtype=D64))),
    ("Beta", (torch.tensor([3.0, 1.0, 0.5, 1.0], dtype=D64), torch.tensor([2.0, 4.0, 2.0, 1.0], dtype=D64))),
])
def test_point_is_q_mode_where_it_exists_else_its_mean(family, params):
    """Oracle: no draw of q (4000 per entry) and no nearby point has a higher density than a mode; entries
    without a mode (an alpha below 1, a flat density, Gamma shape < 1) get q's mean."""
    fam = FAMILIES[family]
    point = fam.mode(params)
    dist_of = {"Dirichlet": lambda p: Dirichlet(p[0]), "Gamma": lambda p: Gamma(*p), "Beta": lambda p: Beta(*p)}
    q = dist_of[family](params)
    has_mode = {"Dirichlet": torch.tensor([True, True, False, False]), "Gamma": torch.tensor([True, True, False]),
                "Beta": torch.tensor([True, True, False, False])}[family]
    mean = fam.mean(params)
    torch.testing.assert_close(point[~has_mode], mean[~has_mode], rtol=1e-12, atol=0)
    draws = q.sample((4000,))
    at_mode = q.log_prob(point)
    assert bool((q.log_prob(draws)[:, has_mode] <= at_mode[has_mode] + 1e-9).all())
    if family != "Dirichlet":
        for step in (1e-3, -1e-3):
            moved = (point + step).clamp(1e-9, 1 - 1e-9 if family == "Beta" else float("inf"))
            assert bool((q.log_prob(moved)[has_mode] <= at_mode[has_mode] + 1e-12).all())
    expected = {"Dirichlet": lambda a: (a[0] - 1) / (a[0].sum(-1, keepdim=True) - 3),
                "Gamma": lambda p: (p[0] - 1) / p[1], "Beta": lambda p: (p[0] - 1) / (p[0] + p[1] - 2)}[family](params)
    torch.testing.assert_close(point[has_mode], expected[has_mode], rtol=1e-12, atol=0)


def test_niw_point_is_the_joint_mode_of_q():
    """The NIW point [Psi / (nu + D + 2) | mu_0] has a higher density than every one of 2000 draws of q and than
    the covariance scaled by 1 +- 1e-3 or the mean moved by 1e-3 (the joint mode in the site's parameterization)."""
    loc, kappa, scale, df = torch.tensor([0.5, -1.0], dtype=D64), 3.0, torch.tensor([[2.0, 0.3], [0.3, 1.0]],
                                                                                       dtype=D64), 7.0
    params = tuple(niw.natural_from_standard(loc, kappa, scale, df))
    point = FAMILIES["NormalInverseWishart"].mode(tuple(p.unsqueeze(0) for p in params))[0]
    q = ppl.NormalInverseWishart(loc, kappa, scale, df)
    torch.testing.assert_close(point, torch.cat([scale / (df + 4), loc[:, None]], -1), rtol=1e-12, atol=0)
    at_mode = q.log_prob(point)
    assert bool((q.log_prob(q.sample((2000,))) < at_mode).all())
    for factor in (1 + 1e-3, 1 - 1e-3):
        assert float(q.log_prob(torch.cat([point[:, :-1] * factor, point[:, -1:]], -1))) < float(at_mode)
    assert float(q.log_prob(point + torch.tensor([[0.0, 0.0, 1e-3], [0.0, 0.0, 0.0]], dtype=D64))) < float(at_mode)


# --------------------------------------------------------------------------------------------------------------
# VB-GMM against scikit-learn's BayesianGaussianMixture with the same priors

@ppl.model
def niw_gmm(x, K=3, alpha=1.0, kappa=0.1, df=4.0):
    N, D = x.shape
    weights = ppl.sample("weights", dist.Dirichlet(x.new_full((K,), alpha)))
    with ppl.plate("components", K):
        theta = ppl.sample("theta", ppl.NormalInverseWishart(x.mean(0), kappa, torch.eye(D, dtype=x.dtype), df))
    loc, cov = ppl.NormalInverseWishart.unpack(theta)
    with ppl.plate("data", N):
        z = ppl.sample("z", dist.Categorical(weights))
        ppl.sample("x", dist.MultivariateNormal(loc[z], cov[z]), obs=x)


def test_vb_gmm_reaches_scikit_learns_bayesian_gaussian_mixture_fixed_point():
    sklearn = pytest.importorskip("sklearn.mixture")
    gen = torch.Generator().manual_seed(0)
    centers = torch.tensor([[0.0, 0.0], [6.0, 0.0], [0.0, 6.0]], dtype=D64)
    x = centers.repeat_interleave(100, 0) + torch.randn(300, 2, generator=gen, dtype=D64) * torch.tensor([1.0, 0.6])
    post = fit(niw_gmm, x, num_steps=1000, tol=1e-11, restarts=1)
    assert_monotone(post)
    ref = sklearn.BayesianGaussianMixture(
        n_components=3, weight_concentration_prior_type="dirichlet_distribution", weight_concentration_prior=1.0,
        mean_precision_prior=0.1, mean_prior=x.mean(0).numpy(), degrees_of_freedom_prior=4.0,
        covariance_prior=torch.eye(2).numpy(), covariance_type="full", tol=1e-12, max_iter=2000,
        random_state=0).fit(x.numpy())
    structure, _, _ = structure_of(niw_gmm, x)
    # our q at the fixed point, read off one more global step from the final responsibilities
    r = torch.as_tensor(ref.predict_proba(x.numpy())).T
    ours_r = post.marginals("z").T
    perm = [int(torch.cdist(torch.as_tensor(ref.means_)[k:k + 1], post.point["theta"][:, :, -1]).argmin())
            for k in range(3)]
    assert torch.allclose(ours_r[perm], r, atol=1e-6)
    q = cavi.global_step(structure, cavi.LocalState(ours_r, {"weights": ours_r.T}, torch.zeros(())),
                         {g: G.prior for g, G in structure.globals.items()})
    std = niw.standard_from_natural(niw.NIWNatural(*q["theta"]))
    assert torch.allclose(q["weights"][0][perm], torch.as_tensor(ref.weight_concentration_), rtol=1e-6)
    assert torch.allclose(std.loc[perm], torch.as_tensor(ref.means_), atol=1e-6)
    assert torch.allclose(std.kappa[perm], torch.as_tensor(ref.mean_precision_), rtol=1e-6)
    assert torch.allclose(std.df[perm], torch.as_tensor(ref.degrees_of_freedom_), rtol=1e-6)
    # scikit-learn's covariances_ are the Wishart scale's inverse over the degrees of freedom: Psi_k / nu_k
    assert torch.allclose((std.scale / std.df[:, None, None])[perm], torch.as_tensor(ref.covariances_), atol=1e-6)


def test_gmm_with_known_covariance_and_hmm_with_normal_means_run_and_never_decrease():
    x = torch.cat([torch.randn(40, 2) + 4, torch.randn(40, 2) - 4, torch.randn(40, 2) + torch.tensor([4.0, -4.0])])
    post = fit(M.gmm, x)
    assert_monotone(post)
    assert sorted(int(c) for c in post.marginals("z").argmax(-1).bincount()) == [40, 40, 40]
    y = torch.cat([torch.randn(30) + 5, torch.randn(30) - 5, torch.randn(30) + 5])
    post = fit(M.hmm, y, model_kwargs={"K": 2})
    assert_monotone(post)
    assert sorted(round(float(v)) for v in post.point["loc"]) == [-5, 5]


# --------------------------------------------------------------------------------------------------------------
# routing, explain, errors

def _vi_facts_probed(model, *args, **kwargs):
    graph, trace = trace_graph(model, args, kwargs)
    facts = analyze(graph, model, args, kwargs, trace)
    facts = with_backend_facts(graph, facts, all_backends())
    return vi_facts(graph, facts, (model, args, kwargs)), facts


def test_rule_sits_between_discrete_only_and_discrete_with_globals_and_applies_to_conjugate_models():
    names = [r.name for r in routing_rules(all_backends())]
    assert names.index("discrete-only") < names.index("conjugate-exponential") < names.index("discrete-with-globals")
    (rule,) = RULES
    for model, args in ((M.gmm, (torch.randn(20, 2),)), (M.hmm, (torch.randn(8),))):
        v, facts = _vi_facts_probed(model, *args)
        assert v.probed and not v.problem
        assert rule.applies(facts.__class__(**{**facts.__dict__, "backend_facts": {**facts.backend_facts, "vi": v}}))
    assert "q(weights) = Dirichlet: closed form from expected counts of z.weights" in \
        _vi_facts_probed(M.gmm, torch.randn(20, 2))[0].updates["weights"]


def test_library_gmm_point_estimates_its_halfnormal_scales_and_lkj_factor_and_is_not_routed_to_vi():
    from ppl.models import gmm  # noqa: PLC0415 - the library model, imported where it is used
    sim = gmm.simulate(N=30)
    v, facts = _vi_facts_probed(gmm.model, *sim.args, **sim.kwargs)      # diagonal covariance: loc and scale
    assert not v.problem and v.point_estimated == ("scale",) and "HalfNormal" in v.updates["scale"]
    assert _vi_facts_probed(gmm.model, *sim.args)[0].point_estimated == ("scale", "corr_chol")   # full: LKJ too
    (rule,) = RULES
    assert not rule.applies(facts.__class__(**{**facts.__dict__, "backend_facts": {**facts.backend_facts, "vi": v}}))
    post = ppl.infer(gmm.model, sim.args[0].double(), backend="vi", model_kwargs=sim.kwargs, progress=False)
    assert_monotone(post)                                                # float64: round-off far below 1e-9


@ppl.model
def scaled_means(x, K=2):
    w = ppl.sample("weights", dist.Dirichlet(torch.ones(K)))
    loc = ppl.sample("loc", dist.Normal(torch.zeros(K), 10.0).to_event(1))
    with ppl.plate("data", x.shape[0]):
        z = ppl.sample("z", dist.Categorical(w))
        ppl.sample("x", dist.Normal(2.0 * loc[z], 1.0), obs=x)


def test_a_non_conjugate_use_of_a_global_is_refused_naming_the_site():
    with pytest.raises(UnsupportedModelError, match="site 'x'.*'loc'"):
        fit(scaled_means, torch.randn(10))
    with pytest.raises(UnsupportedModelError, match="'b' is a learnable parameter"):
        fit(M.shifted, torch.randn(10))


def test_bad_input_and_options_are_clear_errors():
    x = torch.randn(10, 2)
    x[3, 1] = float("nan")
    with pytest.raises(ValueError, match="'x'"):
        fit(M.gmm, x)
    with pytest.raises(ValueError, match="restarts must be an integer >= 1"):
        fit(M.gmm, torch.randn(10, 2), restarts=0)
    with pytest.raises(ValueError, match="tol must be a number >= 0"):
        fit(M.gmm, torch.randn(10, 2), tol=-1.0)
    with pytest.raises(TypeError, match="does not take option.*lr"):
        fit(M.gmm, torch.randn(10, 2), lr=0.1)
    with pytest.raises(ValueError, match="'x'"):
        fit(M.gmm, torch.randn(10, 3))                      # wrong shape for the model's (2,) mean prior


def test_a_decreasing_elbo_is_reported(monkeypatch):
    y = torch.tensor([0.0, 1.0, 7.0, 9.0, 2.0], dtype=D64)
    structure, _, _ = structure_of(poisson_hmm, y)
    start = cavi.hard_local(structure, torch.tensor([0, 0, 1, 1, 0]))
    honest = cavi.global_step
    calls = []

    def broken(structure, state, q):  # the third global step moves q(rate) away from its optimum
        out = honest(structure, state, q)
        calls.append(1)
        if len(calls) == 3:
            a, b = out["rate"]
            out["rate"] = (a * 5, b)
        return out

    monkeypatch.setattr(cavi, "global_step", broken)
    with pytest.warns(cavi.ELBODecreased, match="decreased"):
        cavi.coordinate_ascent(structure, start, 4, 0.0)


def test_library_hmm_with_poisson_emissions_and_missing_entries_recovers_its_parameters():
    from ppl.models import hmm  # noqa: PLC0415 - the library model, imported where it is used
    sim = hmm.simulate(seed=0, T=100, emission="poisson")
    (y,), kwargs = sim.args, sim.kwargs
    mask = torch.rand(y.shape, generator=torch.Generator().manual_seed(0)) > 0.2
    post = fit(hmm.model, torch.where(mask, y, torch.full_like(y, float("nan"))), model_kwargs={**kwargs, "mask": mask})
    assert_monotone(post)
    for key, err in hmm.recovery_errors(post, sim).items():
        assert err < hmm.TOLERANCES_BY_EMISSION["poisson"][key], (key, err)
    assert post.marginals("z").shape == (4, 100, 3)


def test_a_model_that_does_not_use_the_local_elementwise_is_refused():
    with pytest.raises(UnsupportedModelError, match="markov_chain 'z'"):
        fit(M.hmm_nonpointwise, torch.randn(6))


@ppl.model
def bernoulli_mixture(x, K=2):
    w = ppl.sample("weights", dist.Dirichlet(x.new_ones(K)))
    with ppl.plate("components", K):
        probs = ppl.sample("probs", dist.Beta(x.new_full((x.shape[1],), 2.0), 3.0).to_event(1))
    with ppl.plate("data", x.shape[0]):
        z = ppl.sample("z", dist.Categorical(w))
        ppl.sample("x", dist.Bernoulli(probs[z]).to_event(1), obs=x)


def test_one_sweep_of_a_bernoulli_mixture_equals_the_dense_update_computed_by_hand():
    gen = torch.Generator().manual_seed(3)
    x = (torch.rand(40, 5, generator=gen, dtype=D64) < torch.linspace(0.1, 0.9, 5, dtype=D64)).to(D64)
    structure, _, _ = structure_of(bernoulli_mixture, x)
    labels = (torch.arange(40) % 2)
    fitted = cavi.coordinate_ascent(structure, cavi.hard_local(structure, labels), 1, 0.0)
    # by hand: q from the hard start, then responsibilities, then q again
    r0 = torch.nn.functional.one_hot(labels, 2).to(D64)                        # (N, K)
    alpha, a, b = 1 + r0.sum(0), 2 + r0.T @ x, 3 + r0.T @ (1 - x)
    elog_w = torch.digamma(alpha) - torch.digamma(alpha.sum())
    elog_p, elog_q = torch.digamma(a) - torch.digamma(a + b), torch.digamma(b) - torch.digamma(a + b)
    logits = elog_w + x @ elog_p.T + (1 - x) @ elog_q.T                        # (N, K)
    r = logits.softmax(-1)
    assert torch.allclose(fitted.state.r.T, r, atol=1e-12)
    assert torch.allclose(fitted.q["probs"][0], 2 + r.T @ x, atol=1e-10)
    assert torch.allclose(fitted.q["probs"][1], 3 + r.T @ (1 - x), atol=1e-10)
    assert torch.allclose(fitted.q["weights"][0], 1 + r.sum(0), atol=1e-10)
    # the ELBO after the sweep, by hand: E log p(x, z | q) + H(q(z)) - KL terms
    a, b, alpha = 2 + r.T @ x, 3 + r.T @ (1 - x), 1 + r.sum(0)
    elog_w = torch.digamma(alpha) - torch.digamma(alpha.sum())
    elog_p, elog_q = torch.digamma(a) - torch.digamma(a + b), torch.digamma(b) - torch.digamma(a + b)
    expected = (r * (elog_w + x @ elog_p.T + (1 - x) @ elog_q.T)).sum() - (r * r.log()).sum()
    kl = kl_divergence(Dirichlet(alpha), Dirichlet(torch.ones(2, dtype=D64))) + kl_divergence(
        Beta(a, b), Beta(torch.full_like(a, 2.0), torch.full_like(b, 3.0))).sum()
    assert abs(fitted.history[0] - float(expected - kl)) < 1e-9


def test_a_vi_posterior_round_trips_into_a_fresh_process(tmp_path):
    y = torch.cat([torch.randn(10) - 3, torch.randn(10) + 3])
    post = ppl.infer(M.hmm, y, model_kwargs={"K": 2}, progress=False, num_samples=50)
    assert post.backend == "vi" and post.plan.rule == "conjugate-exponential"
    expected = outputs(post, ())
    post.save(tmp_path / "post.pt")
    (tmp_path / "post.pkl").write_bytes(pickle.dumps(post))
    torch.save((), tmp_path / "new.pt")
    paths = [str(tmp_path / n) for n in ("post.pt", "post.pkl", "new.pt", "result.pt")]
    run = subprocess.run([sys.executable, "-c", CHILD, *paths], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    for got in torch.load(paths[-1], weights_only=False):
        assert_identical(expected, got)


def test_run_reuses_the_compile_time_probe_only_on_the_same_unmodified_data(monkeypatch):
    """ppl.infer compiles and runs on the same objects: the probe runs once (at compile); a plan run on other
    data, on data modified in place, or after pickling probes again, with the same result."""
    backend = vi_backend
    x = torch.cat([torch.randn(30, 2, dtype=D64) + 4, torch.randn(30, 2, dtype=D64) - 4])
    calls = []
    real = backend.analyse
    monkeypatch.setattr(backend, "analyse", lambda *a: calls.append(1) or real(*a))
    plan = ppl.compile(niw_gmm, x, K=2, backend="vi")
    assert plan.facts.of("vi").probe_result is not None and len(calls) == 1      # the compile-time probe
    post = ppl.infer(niw_gmm, x, model_kwargs={"K": 2}, progress=False, num_samples=5)
    assert len(calls) == 2 and post.backend == "vi"                              # its compile only
    assert post.plan.facts.of("vi").probe_result is None               # the Posterior does not keep the data twice
    run = backend.BACKEND.run
    same = run(niw_gmm, (x,), {"K": 2}, plan, progress=False, num_samples=5)
    assert len(calls) == 2 and same.log_evidence.value == post.log_evidence.value
    other = x.clone()
    again = run(niw_gmm, (other,), {"K": 2}, plan, progress=False, num_samples=5)
    assert len(calls) == 3 and again.log_evidence.value == pytest.approx(post.log_evidence.value, rel=1e-12)
    moved = run(niw_gmm, (other.add_(1.0),), {"K": 2}, plan, progress=False, num_samples=5)   # in place
    assert len(calls) == 4 and moved.point["theta"][:, :, -1].sum() == pytest.approx(
        float(post.point["theta"][:, :, -1].sum()) + 4.0, rel=1e-6)   # 2 means x 2 coordinates
    loaded = pickle.loads(pickle.dumps(plan))
    assert loaded.facts.of("vi").probe_result is None and loaded.facts.of("vi").updates == plan.facts.of("vi").updates
    run(niw_gmm, (x,), {"K": 2}, loaded, progress=False, num_samples=5)
    assert len(calls) == 5


@ppl.model
def fixed_niw_gmm(x, K=3):
    """niw_gmm with priors that do not depend on the data (so a model on a subset of rows has the same priors)."""
    weights = ppl.sample("weights", dist.Dirichlet(x.new_ones(K)))
    with ppl.plate("components", K):
        theta = ppl.sample("theta", ppl.NormalInverseWishart(x.new_zeros(2), 0.1, torch.eye(2, dtype=x.dtype), 4.0))
    loc, cov = ppl.NormalInverseWishart.unpack(theta)
    with ppl.plate("data", x.shape[0]):
        z = ppl.sample("z", dist.Categorical(weights))
        ppl.sample("x", dist.MultivariateNormal(loc[z], cov[z]), obs=x)


@ppl.model
def normal_mixture_with_side_labels(x, s, c, K=3):
    """Normal children with known per-row scales ``s (N,)`` and a categorical child ``c`` whose probabilities depend
    on z but on no global (a "fixed" child)."""
    weights = ppl.sample("weights", dist.Dirichlet(x.new_ones(K)))
    loc = ppl.sample("loc", dist.Normal(x.new_zeros(K), 10.0).to_event(1))
    side = torch.tensor([[0.8, 0.2], [0.3, 0.7], [0.5, 0.5]], dtype=x.dtype)
    with ppl.plate("data", x.shape[0]):
        z = ppl.sample("z", dist.Categorical(weights))
        ppl.sample("x", dist.Normal(loc[z], s), obs=x)
        ppl.sample("c", dist.Categorical(side[z]), obs=c)


def _three_blobs(n: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    centers = torch.tensor([[0.0, 0.0], [5.0, 0.0], [0.0, 5.0]], dtype=D64)
    return centers[torch.arange(n) % 3] + torch.randn(n, 2, generator=gen, dtype=D64)


def test_a_subsampled_structure_is_the_structure_of_the_model_on_those_rows():
    """``cavi.subsample(structure(x), rows)`` fits exactly as the model probed on ``x[rows]`` (same sweeps from
    the same labels, ELBO to 1e-9) for Gaussian-mean, NIW, elementwise Bernoulli, Normal (known per-row scales)
    and "fixed" children; a chain has none."""
    x = _three_blobs(60)
    rows = torch.tensor([0, 4, 5, 9, 13, 20, 21, 33, 40, 41, 47, 52, 58, 59])
    labels = torch.arange(len(rows)) % 3
    xb = (x > 0.5).to(D64)
    s, c = 0.5 + torch.arange(60, dtype=D64) / 60, torch.arange(60) % 2
    for model, data, kwargs in ((fixed_niw_gmm, x, {}), (M.gmm, x, {}), (bernoulli_mixture, xb, {"K": 2}),
                                (normal_mixture_with_side_labels, x[:, 0], {"s": s, "c": c})):
        sub = cavi.subsample(structure_of(model, data, **kwargs)[0], rows)
        direct = structure_of(model, data[rows], **{k: v[rows] if k in "sc" else v for k, v in kwargs.items()})[0]
        k = 2 if model is bernoulli_mixture else 3
        a = cavi.coordinate_ascent(sub, cavi.hard_local(sub, labels % k), 5, 0.0)
        b = cavi.coordinate_ascent(direct, cavi.hard_local(direct, labels % k), 5, 0.0)
        assert sub.local.zshape == (len(rows),)
        assert a.history == pytest.approx(b.history, rel=1e-9, abs=1e-9), model
    assert cavi.subsample(structure_of(M.hmm, torch.randn(12))[0], torch.arange(4)) is None


def test_restarts_on_many_rows_are_screened_on_a_subsample_and_reach_the_best_full_fit(monkeypatch):
    """With more than 2 x SCREEN_ROWS rows the starts are ranked by fits on SCREEN_ROWS rows (to a relative change of
    SCREEN_TOL) and only the best is fitted on all rows: the same optimum (ELBO to 1e-8 relative) as the best of
    every start fitted to convergence on all rows (the oracle, computed here)."""
    x = _three_blobs(900, seed=1)
    options = dict(model_kwargs={"K": 3}, restarts=4, tol=1e-10, num_samples=5)
    structure = structure_of(fixed_niw_gmm, x, K=3)[0]
    oracle = max(cavi.coordinate_ascent(structure, cavi.hard_local(structure, labels), 2000, 1e-10).elbo
                 for labels in vi_backend._start_labels(structure, 4, 0))
    calls = []
    real = cavi.coordinate_ascent
    monkeypatch.setattr(cavi, "coordinate_ascent", lambda s, *a, **k: calls.append(s.local.zshape) or real(s, *a, **k))
    on_all_rows = fit(fixed_niw_gmm, x, **options)
    assert calls == [(900,)] * 4                   # 900 <= 2 x SCREEN_ROWS: every start fitted on all rows
    monkeypatch.setattr(vi_backend, "SCREEN_ROWS", 100)
    calls.clear()
    screened = fit(fixed_niw_gmm, x, **options)
    assert calls == [(100,)] * 4 + [(900,)]        # four screening fits on 100 rows, one fit on all 900
    for post in (on_all_rows, screened):
        assert_monotone(post)
        assert post.log_evidence.value == pytest.approx(oracle, rel=1e-8)


@ppl.model
def unplated_mixture(x, K=2):
    """The child outside the data plate, one event of N values: unexpanded, its layout would differ."""
    weights = ppl.sample("weights", dist.Dirichlet(torch.ones(K)))
    loc = ppl.sample("loc", dist.Normal(torch.zeros(K), 10.0).to_event(1))
    with ppl.plate("data", x.shape[0]):
        z = ppl.sample("z", dist.Categorical(weights))
    ppl.sample("x", dist.Normal(loc[z], 1.0).to_event(1), obs=x)


def test_the_second_probe_run_takes_the_local_unexpanded_only_where_the_layout_is_the_same(monkeypatch):
    """The cheap second probe run (local ``(K, 1)``, plates broadcasting) gives the same Structure as two expanded
    runs: the same coordinate ascent to the bit; a model whose layout would change gets an expanded second run."""
    x = _three_blobs(60)
    s, c = 0.5 + torch.arange(60, dtype=D64) / 60, torch.arange(60) % 2
    cases = ((fixed_niw_gmm, x, {}), (M.gmm, x, {}), (bernoulli_mixture, (x > 0.5).to(D64), {"K": 2}),
             (normal_mixture_with_side_labels, x[:, 0], {"s": s, "c": c}))
    labels = torch.arange(60) % 2
    expanded = lambda model, a, k, local, expand=True, held=None: [  # noqa: E731 - the previous probe: both expanded
        probe._run(model, a, k, local, expand, seed, held or {}) for seed in probe.PROBE_SEEDS]
    for model, data, kwargs in cases:
        runs = probe.probe_runs(model, (data,), kwargs, "z")
        assert runs[0].sites["z"]["value"].shape == (runs[1].sites["z"]["value"].shape[0], 60)
        assert runs[1].sites["z"]["value"].shape[1:] == (1,), model                  # the cheap run was kept
        cheap = structure_of(model, data, **kwargs)[0]
        with monkeypatch.context() as m:
            m.setattr(conjugacy, "probe_runs", expanded)
            full = structure_of(model, data, **kwargs)[0]
        a = cavi.coordinate_ascent(cheap, cavi.hard_local(cheap, labels), 4, 0.0)
        b = cavi.coordinate_ascent(full, cavi.hard_local(full, labels), 4, 0.0)
        assert a.history == b.history, model
    runs = probe.probe_runs(unplated_mixture, (torch.randn(7),), {}, "z")
    assert [r.sites["z"]["value"].shape for r in runs] == [(2, 7), (2, 7)]
