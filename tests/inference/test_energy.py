"""Energy-based models: AIS log Z, Gibbs marginals and CD/PCD training of an RBM against brute force
(every joint state of a tiny RBM enumerated)."""
import pytest
import torch

import ppl
from ppl.inference.energy import ais
from ppl.models import rbm as R


def random_rbm(V=6, H=6, scale=1.0, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return ais.RBMParams(scale * torch.randn(V, H, generator=gen, dtype=torch.float64),
                         0.5 * torch.randn(V, generator=gen, dtype=torch.float64),
                         0.5 * torch.randn(H, generator=gen, dtype=torch.float64))


def joint_brute_force(p):
    """(log Z, visible marginals (V,)) by summing exp(-E(v, h)) over all 2^(V+H) joint states."""
    V, H = p.weights.shape
    vs, hs = ais.all_binary(V, p.weights), ais.all_binary(H, p.weights)
    log_joint = (vs @ p.visible_bias)[:, None] + (hs @ p.hidden_bias)[None, :] + vs @ p.weights @ hs.T
    log_z = torch.logsumexp(log_joint.reshape(-1), 0)
    pv = torch.exp(torch.logsumexp(log_joint, 1) - log_z)
    return float(log_z), pv @ vs, (vs.T * pv) @ vs


@pytest.mark.parametrize("seed,scale", [(0, 1.0), (1, 2.0), (2, 0.5)])
def test_ais_log_z_within_a_tenth_of_a_nat_of_brute_force(seed, scale):
    p = random_rbm(scale=scale, seed=seed)
    exact, _, _ = joint_brute_force(p)
    est = ais.ais_log_z(p, num_betas=1000, num_chains=100, generator=torch.Generator().manual_seed(seed))
    assert abs(est.log_z - exact) < 0.1, (est.log_z, exact)
    assert abs(ais.brute_force_log_z(p) - exact) < 1e-9


def test_gibbs_sampler_matches_brute_force_marginals_and_second_moments():
    p = random_rbm(seed=3)
    _, mean, second = joint_brute_force(p)
    fn = ppl.RBM(*p)
    torch.manual_seed(0)
    v = fn.gibbs(torch.bernoulli(torch.full((4000, 6), 0.5, dtype=torch.float64)), 100)
    assert torch.allclose(v.mean(0), mean, atol=0.03), (v.mean(0), mean)
    assert torch.allclose(v.T @ v / v.shape[0], second, atol=0.03)


def test_rbm_log_prob_is_the_unnormalized_negative_free_energy():
    p = random_rbm(V=4, H=3, seed=4)
    fn = ppl.RBM(*p)
    assert fn.normalized is False
    vs = ais.all_binary(4, p.weights)
    hs = ais.all_binary(3, p.weights)
    direct = torch.logsumexp((vs @ p.visible_bias)[:, None] + (hs @ p.hidden_bias)[None, :] + vs @ p.weights @ hs.T, 1)
    assert torch.allclose(fn.log_prob(vs), direct)


@pytest.mark.parametrize("method", ["cd", "pcd"])
def test_cd_and_pcd_improve_the_exact_log_likelihood_and_ais_reports_it(method):
    sim = R.simulate(seed=0, N=300)
    v = sim.args[0]
    init = R.init_params(v, 4)
    before = R.exact_log_likelihood(init["weights"], init["visible_bias"], init["hidden_bias"], v)
    post = ppl.infer(R.model, *sim.args, model_kwargs=sim.kwargs, progress=False, method=method, num_steps=300,
                     lr=0.05, ais_betas=500)
    p = post.params
    after = R.exact_log_likelihood(p["weights"], p["visible_bias"], p["hidden_bias"], v)
    assert after > before + 0.3 * v.shape[0], (method, before / 300, after / 300)   # >= 0.3 nats per vector
    assert abs(float(post.log_evidence) - after) < 0.1 * v.shape[0]               # log Z within 0.1 nats
    assert post.log_evidence.kind.startswith("AIS estimate")


def test_compiler_routes_an_rbm_to_the_energy_backend_and_explains_it():
    sim = R.simulate(N=50)
    plan = ppl.compile(R.model, *sim.args, **sim.kwargs)
    assert plan.backend == "energy" and plan.rule == "energy-based"
    text = plan.explain()
    assert "persistent contrastive divergence" in text and "annealed importance sampling" in text


def test_bad_inputs_name_the_argument():
    p = random_rbm(V=3, H=2)
    with pytest.raises(ValueError, match=r"visible_bias must have shape \(3,\).*got \(2,\)"):
        ppl.RBM(p.weights, p.hidden_bias, p.hidden_bias)
    sim = R.simulate(N=50)
    with pytest.raises(ValueError, match="method must be one of .*'cd'.*got 'gibbs'"):
        ppl.infer(R.model, *sim.args, model_kwargs=sim.kwargs, progress=False, method="gibbs", num_steps=1)
    with pytest.raises(ValueError, match="num_betas must be >= 2"):
        ais.ais_log_z(p, num_betas=1)


def test_a_latent_site_next_to_the_rbm_is_refused_naming_it():
    @ppl.model
    def two(v):
        s = ppl.sample("s", ppl.dist.Normal(0.0, 1.0))
        W = ppl.param("W", torch.zeros(v.shape[-1], 2)) + 0 * s
        with ppl.plate("data", v.shape[0]):
            ppl.sample("v", ppl.RBM(W, torch.zeros(v.shape[-1]), torch.zeros(2)), obs=v)

    with pytest.raises(ppl.backends.UnsupportedModelError, match="site 's' is not the RBM"):
        ppl.compile(two, torch.ones(5, 3), backend="energy")


def test_facts_flag_the_unnormalized_site():
    sim = R.simulate(N=20)
    plan = ppl.compile(R.model, *sim.args, **sim.kwargs)
    assert plan.facts.unnormalized == ("v",) and plan.graph.site("v").density == "unnormalized"
