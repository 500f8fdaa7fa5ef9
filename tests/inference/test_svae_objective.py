"""The SVAE objective against oracles: with recognition potentials equal to the true
linear-Gaussian likelihood, the ELBO equals log p(y) where local inference is exact (LDS,
Gaussian node) and lower-bounds it, tightly, where it is mean field (mixture, switching LDS)."""
import itertools
import math

import torch

import ppl
from ppl import dist
from ppl.analysis import analyze
from ppl.graph import trace_graph
from ppl.inference.exact.kalman import LDSPrior, log_likelihood
from ppl.inference.svae.facts import svae_facts
from ppl.inference.svae.objective import SVAEObjective
from tests.ppl.models_for_tests import ScaledIdentity

R_VAR = 0.3


Identity = ScaledIdentity  # a 'network' so that the likelihood counts as neural; y = x + noise


class TanhDecoder(Identity):
    def forward(self, x):
        return torch.tanh(self.scale * x)


def exact_potentials(y):
    """psi(x) = N(y; x, R_VAR I) up to a constant: J = I / R_VAR, h = y / R_VAR."""
    D = y.shape[-1]
    eye = torch.eye(D, dtype=y.dtype)
    return eye.expand(y.shape + (D,)) / R_VAR, y / R_VAR


def mc_elbo(model, y, num=400, seed=0):
    """Mean and standard error of the single-sample ELBO estimate over ``num`` runs."""
    graph, trace = trace_graph(model, (y,), {})
    targets = svae_facts(graph, analyze(graph, model, (y,), {}, trace)).targets
    gen = torch.Generator().manual_seed(seed)
    values = []
    for _ in range(num):
        h = SVAEObjective(targets, {n: exact_potentials(y) for n in targets}, set(), 4, gen)
        with h:
            model(y)
        values.append(float((h.recon - h.local_kl).detach()))
    v = torch.tensor(values, dtype=torch.float64)
    return float(v.mean()), float(v.std() / math.sqrt(num)), targets


A = torch.tensor([[0.9, 0.15], [-0.15, 0.9]], dtype=torch.float64)
Q = 0.2 * torch.eye(2, dtype=torch.float64)


def lds_model(y, decoder=Identity):
    dec = ppl.module("dec", decoder())
    x = ppl.gaussian_chain("x", 2, A, Q, length=y.shape[-2])
    ppl.sample("y", dist.Normal(dec(x), R_VAR ** 0.5).to_event(2), obs=y)


def test_lds_elbo_equals_kalman_log_likelihood():
    torch.manual_seed(0)
    y = torch.randn(6, 2, dtype=torch.float64)
    mean, se, targets = mc_elbo(lds_model, y)
    assert targets["x"].kind == "lds"
    prior = LDSPrior(torch.zeros(2, dtype=torch.float64), torch.eye(2, dtype=torch.float64), A, Q)
    exact = float(log_likelihood(prior, torch.eye(2, dtype=torch.float64), None, R_VAR * torch.eye(2, dtype=torch.float64), y))
    assert abs(mean - exact) < 4 * se + 1e-9


LOCS = torch.tensor([[-3.0, 0.0], [3.0, 1.0], [0.0, 4.0]], dtype=torch.float64)


def mixture_model(y, decoder=Identity):
    dec = ppl.module("dec", decoder())
    with ppl.plate("data", y.shape[0]):
        z = ppl.sample("z", dist.Categorical(torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)))
        x = ppl.sample("x", dist.MultivariateNormal(LOCS[z], 0.5 * torch.eye(2, dtype=torch.float64)))
        ppl.sample("y", dist.Normal(dec(x), R_VAR ** 0.5).to_event(1), obs=y)


def test_mixture_elbo_lower_bounds_exact_evidence_tightly():
    torch.manual_seed(1)
    z = torch.tensor([0, 1, 2, 0, 1, 2, 0, 0])
    y = LOCS[z] + (0.5 + R_VAR) ** 0.5 * torch.randn(8, 2, dtype=torch.float64)
    mean, se, targets = mc_elbo(mixture_model, y)
    assert targets["x"].kind == "mixture" and targets["x"].discrete == "z"
    weights = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    comp = dist.MultivariateNormal(LOCS, (0.5 + R_VAR) * torch.eye(2, dtype=torch.float64))
    exact = float(torch.logsumexp(weights.log() + comp.log_prob(y.unsqueeze(-2)), -1).sum())
    assert mean <= exact + 4 * se
    assert exact - mean < 0.05 * y.shape[0]  # well separated: mean field loses < 0.05 nats per point


AS = torch.stack([torch.tensor([[0.95, 0.3], [-0.3, 0.95]]), torch.tensor([[0.5, 0.0], [0.0, 0.5]])]).double()
TRANS = torch.tensor([[0.9, 0.1], [0.2, 0.8]], dtype=torch.float64)


def slds_model(y, decoder=Identity):
    dec = ppl.module("dec", decoder())
    z, x = ppl.switching_chain("s", 2, 2, TRANS, AS, Q, length=y.shape[-2])
    ppl.sample("y", dist.Normal(dec(x), R_VAR ** 0.5).to_event(2), obs=y)


def test_slds_elbo_lower_bounds_brute_force_evidence():
    torch.manual_seed(2)
    T = 4
    y = torch.randn(T, 2, dtype=torch.float64) * 2
    mean, se, targets = mc_elbo(slds_model, y)
    assert targets["s_x"].kind == "slds" and targets["s_x"].discrete == "s_z"
    terms = []
    for path in itertools.product(range(2), repeat=T):
        log_pz = math.log(0.5) + sum(math.log(TRANS[path[t - 1], path[t]]) for t in range(1, T))
        prior = LDSPrior(torch.zeros(2, dtype=torch.float64), torch.eye(2, dtype=torch.float64),
                         AS[list(path[1:])], Q.expand(T - 1, 2, 2), None, time_varying=True)
        terms.append(log_pz + float(log_likelihood(prior, torch.eye(2, dtype=torch.float64), None,
                                                   R_VAR * torch.eye(2, dtype=torch.float64), y)))
    exact = float(torch.logsumexp(torch.tensor(terms), 0))
    assert mean <= exact + 4 * se
    assert exact - mean < 1.0  # structured mean field is within 1 nat on 4 steps


def test_compile_routes_neural_structured_models_to_svae():
    y = torch.randn(5, 2, dtype=torch.float64)
    assert ppl.compile(lds_model, y).backend == "exact"  # a linear decoder is linear-Gaussian: Kalman is exact
    for model, site, message in [(lds_model, "x", "Kalman"), (mixture_model, "x", "mean field"),
                                 (slds_model, "s_x", "structured mean field")]:
        plan = ppl.compile(model, y, decoder=TanhDecoder)
        assert plan.backend == "svae" and plan.rule == "neural-structured"
        assert plan.treatment(site) == "recognition potential"
        assert message in plan.explain()
