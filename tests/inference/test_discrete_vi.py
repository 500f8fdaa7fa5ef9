"""Gradient estimators for binary latents against the brute-force gradient (all 2^K states enumerated), and
the discrete_vi backend end to end on a model with 12 binary latents per data point."""
import itertools
import math

import pytest
import torch

from ppl.inference.discrete_vi import estimators as E


def toy_objective(K=8, P=6, seed=0):
    """f(b) = log N(x | W b, 0.5^2) + log Bernoulli(b; 0.3) for one fixed x, smooth in relaxed b: (M, B, K) -> (M, B)."""
    gen = torch.Generator().manual_seed(seed)
    W = torch.randn(K, P, generator=gen, dtype=torch.float64)
    x = (torch.rand(K, generator=gen, dtype=torch.float64) < 0.5).double() @ W
    x = x + 0.3 * torch.randn(P, generator=gen, dtype=torch.float64)

    def f(b):
        return (torch.distributions.Normal(b @ W, 0.5).log_prob(x).sum(-1)
                + (b * math.log(0.3) + (1 - b) * math.log(0.7)).sum(-1))
    return f


def all_states(K, dtype=torch.float64):
    return torch.tensor(list(itertools.product([0.0, 1.0], repeat=K)), dtype=dtype)


def exact_gradient(f, logits):
    """sum_b q(b) f(b) (b - sigmoid(logits)) over all 2^K states: logits (1, K) -> (1, K)."""
    states = all_states(logits.shape[-1])
    q = torch.distributions.Bernoulli(logits=logits[0]).log_prob(states).sum(-1).exp()
    fb = f(states.unsqueeze(1))[:, 0]
    return ((q * fb).unsqueeze(-1) * (states - torch.sigmoid(logits[0]))).sum(0, keepdim=True)


@pytest.fixture(scope="module")
def toy():
    f = toy_objective()
    logits = torch.linspace(-1.5, 1.5, 8, dtype=torch.float64).unsqueeze(0)
    return f, logits, exact_gradient(f, logits)


def test_exact_gradient_matches_autograd_of_the_enumerated_expectation(toy):
    f, logits, exact = toy
    lg = logits.clone().requires_grad_(True)
    states = all_states(8)
    q = torch.distributions.Bernoulli(logits=lg[0]).log_prob(states).sum(-1).exp()
    (q * f(states.unsqueeze(1))[:, 0]).sum().backward()
    assert torch.allclose(lg.grad, exact, atol=1e-10)


def test_unbiased_estimators_match_the_brute_force_gradient_and_rebar_relax_beat_reinforce(toy):
    """Means within 4 standard errors of the exact gradient (reinforce, rebar, relax); variance ratios < 1."""
    f, logits, exact = toy
    gen = torch.Generator().manual_seed(0)
    n = 2000
    states = all_states(8)
    q = torch.distributions.Bernoulli(logits=logits[0]).log_prob(states).sum(-1).exp()
    baseline = float((q * f(states.unsqueeze(1))[:, 0]).sum())  # the best constant: E_q[f]
    rebar = E.ControlVariate(8).double()
    relax = E.ControlVariate(8, hidden=16).double()
    E.tune_control_variate(f, logits, rebar, steps=100, lr=0.03, generator=gen)
    E.tune_control_variate(f, logits, relax, steps=100, lr=0.03, generator=gen)
    var = {}
    for name, cv in (("reinforce", None), ("rebar", rebar), ("relax", relax)):
        g = E.gradient_samples(name, f, logits, n, cv=cv, baseline=baseline, generator=gen)[:, 0]
        err = (g.mean(0) - exact[0]).abs()
        assert bool((err < 4 * g.std(0) / n ** 0.5 + 1e-8).all()), (name, err, g.std(0) / n ** 0.5)
        var[name] = float(g.var(0).sum())
    print("variance ratio to REINFORCE+baseline:", {k: v / var["reinforce"] for k, v in var.items()})
    assert var["rebar"] / var["reinforce"] < 0.8, var
    assert var["relax"] / var["reinforce"] < 0.8, var


def test_gumbel_softmax_is_biased_and_its_bias_shrinks_with_the_temperature(toy):
    f, logits, exact = toy
    gen = torch.Generator().manual_seed(1)
    bias = {}
    for tau in (1.0, 0.1):
        g = E.gradient_samples("gumbel", f, logits, 2000, temperature=tau, generator=gen)[:, 0]
        bias[tau] = float((g.mean(0) - exact[0]).norm() / exact[0].norm())
    assert bias[1.0] > 0.05, bias        # biased at a high temperature
    assert bias[0.1] < bias[1.0], bias


def test_conditional_logistic_reproduces_the_joint():
    """z~ ~ p(z | b) from b ~ q: the pair (b, z~) has the law of (H(z), z) -- compare quantiles of z."""
    gen = torch.Generator().manual_seed(2)
    logits = torch.full((20000, 1), 0.7, dtype=torch.float64)
    u, v = E.logistic_noise(logits, gen)
    z = E.logistic(logits, u)
    b = (z > 0).double()
    u2, v2 = E.logistic_noise(logits, gen)
    zt = E.conditional_logistic(logits, (E.logistic(logits, u2) > 0).double(), v2)
    qs = torch.tensor([0.1, 0.3, 0.5, 0.7, 0.9], dtype=torch.float64)
    assert torch.allclose(torch.quantile(z[:, 0], qs), torch.quantile(zt[:, 0], qs), atol=0.08)
    assert bool(((zt > 0).double() == (E.logistic(logits, u2) > 0).double()).all())
    assert abs(float(b.mean()) - float(torch.sigmoid(torch.tensor(0.7)))) < 0.01


def test_bad_estimator_name_is_refused_naming_the_choices():
    with pytest.raises(ValueError, match="estimator must be one of .*'relax'.*got 'vimco'"):
        E.check_estimator("vimco")
