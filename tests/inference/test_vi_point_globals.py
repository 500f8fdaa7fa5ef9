"""Backend "vi" with non-conjugate globals point-estimated inside the coordinate ascent (``point_globals``).

Oracles:
- no discrete latent, Normal mean with a Normal prior and a HalfNormal scale: q(loc) is exact given sigma, so the
  fixed point maximizes the closed-form log p(y | sigma) + log p(sigma); compared with scipy's bounded 1-D optimum;
- a tiny GMM with HalfNormal scales: the objective (ELBO + log prior) never decreases, and the reported ELBO at the
  point estimate equals the ELBO of the same q computed by enumerating every assignment of the 6 data points;
- a Gaussian HMM with LogNormal scales: the objective never decreases and the states are recovered; on 5 steps its
  ELBO at the point estimate equals log-sum-exp over all 32 paths minus the KLs (q(z) is exact given the tables);
- a non-conjugate global feeding a latent (the local's weights, another global's prior) is refused naming the site;
- plan.explain() names the point estimate; routing ("auto") does not pick vi for such models.
"""
import itertools
import math

import pytest
import torch
from scipy.optimize import minimize_scalar
from torch.distributions import Dirichlet, HalfNormal, Normal, kl_divergence

import ppl
from ppl import dist
from ppl.backends import UnsupportedModelError
from ppl.inference.vi import cavi, point_globals
from ppl.inference.vi.backend import RULES
from tests.inference.test_vi import _vi_facts_probed, assert_monotone, structure_of

D64 = torch.float64


def fit(model, *args, **options):
    options.setdefault("progress", False)
    return ppl.infer(model, *args, backend="vi", **options)


@ppl.model
def normal_unknown_scale(y, s0=3.0):
    loc = ppl.sample("loc", dist.Normal(torch.tensor(0.0, dtype=D64), s0))
    sigma = ppl.sample("sigma", dist.HalfNormal(torch.tensor(2.0, dtype=D64)))
    with ppl.plate("data", y.shape[0]):
        ppl.sample("y", dist.Normal(loc, sigma), obs=y)


def test_scale_point_estimate_maximizes_the_closed_form_marginal_likelihood_plus_log_prior():
    torch.manual_seed(0)
    y = (1.5 + 0.7 * torch.randn(12)).to(D64)
    s0, N = 3.0, y.shape[0]

    def neg(log_sigma: float) -> float:
        sigma = math.exp(log_sigma)
        cov = sigma ** 2 * torch.eye(N, dtype=D64) + s0 ** 2 * torch.ones(N, N, dtype=D64)
        lp = torch.distributions.MultivariateNormal(torch.zeros(N, dtype=D64), cov).log_prob(y)
        return -float(lp + HalfNormal(torch.tensor(2.0, dtype=D64)).log_prob(torch.tensor(sigma, dtype=D64)))

    best = minimize_scalar(neg, bounds=(-5, 3), method="bounded", options={"xatol": 1e-10})
    post = fit(normal_unknown_scale, y, tol=1e-12, num_steps=200)
    assert_monotone(post)
    sigma = float(post.point["sigma"])
    assert sigma == pytest.approx(math.exp(best.x), rel=1e-5)
    # q(loc) is exact given sigma: the ELBO at the point estimate is log p(y | sigma) (to 1e-8 relative)
    cov = sigma ** 2 * torch.eye(N, dtype=D64) + s0 ** 2 * torch.ones(N, N, dtype=D64)
    exact = float(torch.distributions.MultivariateNormal(torch.zeros(N, dtype=D64), cov).log_prob(y))
    assert post.log_evidence.value == pytest.approx(exact, rel=1e-8)
    assert bool((post.sample(50)["sigma"] == post.point["sigma"]).all())      # a point mass


@ppl.model
def tiny_gmm(x, K=2):
    w = ppl.sample("weights", dist.Dirichlet(torch.ones(K, dtype=D64)))
    with ppl.plate("components", K):
        loc = ppl.sample("loc", dist.Normal(torch.tensor(0.0, dtype=D64), 5.0))
        scale = ppl.sample("scale", dist.HalfNormal(torch.tensor(2.0, dtype=D64)))
    with ppl.plate("data", x.shape[0]):
        z = ppl.sample("z", dist.Categorical(w))
        ppl.sample("x", dist.Normal(loc[z], scale[z]), obs=x)


def _brute_force_elbo(x, r, qw, qloc, scale):
    """ELBO of q(z) = prod_n Cat(r_n) x Dir(qw) x N(qloc) with the scales fixed, summing over every z."""
    N, K = r.shape
    elog_w = torch.digamma(qw) - torch.digamma(qw.sum())
    m, v = qloc
    total = 0.0
    for z in itertools.product(range(K), repeat=N):
        z = torch.tensor(z)
        qz = float(r[torch.arange(N), z].prod())
        if qz == 0.0:
            continue
        s2 = scale[z] ** 2
        ell = (-0.5 * torch.log(2 * math.pi * s2) - ((x - m[z]) ** 2 + v[z]) / (2 * s2)).sum()
        total += qz * float(elog_w[z].sum() + ell - math.log(qz))
    kl_w = kl_divergence(Dirichlet(qw), Dirichlet(torch.ones(K, dtype=D64)))
    kl_loc = kl_divergence(Normal(m, v.sqrt()), Normal(torch.zeros(K, dtype=D64), 5.0)).sum()
    return total - float(kl_w) - float(kl_loc)


def test_tiny_gmm_objective_never_decreases_and_its_elbo_equals_brute_force_enumeration():
    x = torch.tensor([-3.1, -2.6, -3.4, 2.0, 2.9, 2.2], dtype=D64)
    post = fit(tiny_gmm, x, tol=1e-10, num_steps=300, restarts=1)
    assert_monotone(post)
    assert len(post.history) >= 2
    r = post.marginals("z")                                            # (N, K)
    # q(weights) and q(loc) are the closed-form updates from r (a fixed point): rebuild them from r
    scale = post.point["scale"].to(D64)
    counts = r.sum(0)
    qw = 1.0 + counts
    prec = 1 / 25.0 + (r / scale ** 2).sum(0)
    m = (r * x[:, None] / scale ** 2).sum(0) / prec
    elbo = _brute_force_elbo(x, r, qw, (m, 1 / prec), scale)
    assert post.log_evidence.value == pytest.approx(elbo, rel=1e-7, abs=1e-7)
    assert sorted(float(s) for s in scale) == pytest.approx(sorted(
        [float(x[:3].std(unbiased=False)), float(x[3:].std(unbiased=False))]), rel=0.3)


@ppl.model
def gaussian_hmm(y, K=2):
    trans = ppl.sample("trans", dist.Dirichlet(torch.ones(K, K, dtype=D64)).to_event(1))
    with ppl.plate("states", K):
        loc = ppl.sample("loc", dist.Normal(torch.tensor(0.0, dtype=D64), 10.0))
        scale = ppl.sample("scale", dist.LogNormal(torch.tensor(0.0, dtype=D64), 1.0))
    z = ppl.markov_chain("z", K, trans, length=y.shape[0])
    ppl.sample("y", dist.Normal(loc[z], scale[z]), obs=y)


def test_gaussian_hmm_with_lognormal_scales_never_decreases_and_recovers_the_states():
    gen = torch.Generator().manual_seed(1)
    states = torch.tensor([0] * 25 + [1] * 25 + [0] * 25)
    y = torch.where(states == 0, -4.0 + 0.5 * torch.randn(75, generator=gen, dtype=D64),
                    4.0 + 2.0 * torch.randn(75, generator=gen, dtype=D64))
    post = fit(gaussian_hmm, y, num_steps=200)
    assert_monotone(post)
    order = post.point["loc"].argsort()
    assert post.point["loc"][order].tolist() == pytest.approx([-4.0, 4.0], abs=0.8)
    assert post.point["scale"][order].tolist() == pytest.approx([0.5, 2.0], rel=0.35)
    assert (post.marginals("z").argmax(-1) == order[states]).double().mean() > 0.95


def test_explain_names_the_point_estimate_and_auto_routing_does_not_pick_vi():
    x = torch.tensor([-3.1, -2.6, -3.4, 2.0, 2.9, 2.2], dtype=D64)
    v, facts = _vi_facts_probed(tiny_gmm, x)
    assert v.probed and not v.problem and v.point_estimated == ("scale",)
    assert v.updates["scale"].startswith("point estimate (L-BFGS on the expected log joint")
    assert "HalfNormal" in v.updates["scale"]
    (rule,) = RULES
    assert not rule.applies(facts.__class__(**{**facts.__dict__, "backend_facts": {**facts.backend_facts, "vi": v}}))
    assert ppl.compile(tiny_gmm, x).backend != "vi"
    assert "point estimate" in ppl.compile(tiny_gmm, x, backend="vi").explain()


@ppl.model
def lognormal_weights(x, K=2):
    w = ppl.sample("w", dist.LogNormal(torch.zeros(K, dtype=D64), 1.0).to_event(1))
    loc = ppl.sample("loc", dist.Normal(torch.zeros(K, dtype=D64), 5.0).to_event(1))
    with ppl.plate("data", x.shape[0]):
        z = ppl.sample("z", dist.Categorical(w / w.sum()))
        ppl.sample("x", dist.Normal(loc[z], 1.0), obs=x)


@ppl.model
def hierarchical_scale(x, K=2):
    w = ppl.sample("weights", dist.Dirichlet(torch.ones(K, dtype=D64)))
    tau = ppl.sample("tau", dist.HalfNormal(torch.tensor(5.0, dtype=D64)))
    loc = ppl.sample("loc", dist.Normal(torch.zeros(K, dtype=D64), tau).to_event(1))
    with ppl.plate("data", x.shape[0]):
        z = ppl.sample("z", dist.Categorical(w))
        ppl.sample("x", dist.Normal(loc[z], 1.0), obs=x)


def test_a_non_conjugate_global_feeding_a_latent_is_refused_naming_it():
    x = torch.randn(10, dtype=D64)
    with pytest.raises(UnsupportedModelError, match="site 'w'.*LogNormal.*latent site 'z'"):
        fit(lognormal_weights, x)
    with pytest.raises(UnsupportedModelError, match="site 'tau'.*HalfNormal.*latent site 'loc'"):
        fit(hierarchical_scale, x)


def test_tiny_hmm_elbo_at_the_point_estimate_equals_brute_force_over_every_path():
    """T = 5, K = 2: q(z) is the exact posterior of the chain given the expected log tables, so the ELBO is
    log sum over the 32 paths of exp(E log p(z) + E log p(y | z)) minus the KLs of q(trans), q(loc)."""
    y = torch.tensor([-2.1, -1.7, 2.4, 1.9, -2.0], dtype=D64)
    structure = structure_of(gaussian_hmm, y)[0]
    assert tuple(structure.points.values) == ("scale",)
    fit = point_globals.coordinate_ascent(structure, cavi.hard_local(structure, torch.tensor([0, 0, 1, 1, 0])), 500,
                                          1e-13)
    h = fit.history
    assert all(b >= a - 1e-10 * (abs(a) + 1) for a, b in zip(h, h[1:]))
    (alpha,), (m, v), scale = fit.q["trans"], fit.q["loc"], fit.theta["scale"]
    elog_a = torch.digamma(alpha) - torch.digamma(alpha.sum(-1, keepdim=True))
    table = -0.5 * torch.log(2 * math.pi * scale ** 2) - ((y[:, None] - m) ** 2 + v) / (2 * scale ** 2)   # (T, K)
    paths = []
    for z in itertools.product(range(2), repeat=5):
        paths.append(math.log(0.5) + sum(float(elog_a[a, b]) for a, b in zip(z, z[1:]))
                     + sum(float(table[t, k]) for t, k in enumerate(z)))
    kl = float(kl_divergence(Dirichlet(alpha), Dirichlet(torch.ones(2, 2, dtype=D64))).sum()
               + kl_divergence(Normal(m, v.sqrt()), Normal(torch.zeros(2, dtype=D64), 10.0)).sum())
    brute = float(torch.logsumexp(torch.tensor(paths, dtype=D64), 0)) - kl
    assert h[-1] - fit.log_prior == pytest.approx(brute, rel=1e-9, abs=1e-9)
