"""Structured blocks: shapes, sampling, scoring against independent oracles, bad input."""
import itertools

import pyro.poutine as poutine
import pytest
import torch

import ppl
from ppl import dist
from ppl.chain_dists import MarkovChain


def dense_lds_moments(m0, P0, A, Q, b, T):
    """Mean (T*D,) and covariance (T*D, T*D) of the LDS path by the moment recursion."""
    D = m0.shape[0]
    means, covs = [m0], [P0]
    for t in range(1, T):
        means.append(A @ means[-1] + b[t - 1])
        covs.append(A @ covs[-1] @ A.T + Q)
    full = torch.zeros(T * D, T * D, dtype=m0.dtype)
    for s in range(T):
        for t in range(s, T):
            block = torch.linalg.matrix_power(A, t - s) @ covs[s]
            full[t * D:(t + 1) * D, s * D:(s + 1) * D] = block
            full[s * D:(s + 1) * D, t * D:(t + 1) * D] = block.T
    return torch.cat(means), full


def test_markov_chain_log_prob_matches_product_of_factors():
    torch.manual_seed(1)
    K, T = 3, 4
    init = torch.softmax(torch.randn(K, dtype=torch.float64), -1)
    trans = torch.softmax(torch.randn(K, K, dtype=torch.float64), -1)
    d = MarkovChain(init.log(), trans.log(), T)
    total = 0.0
    for path in itertools.product(range(K), repeat=T):
        p = init[path[0]] * torch.prod(torch.stack([trans[path[t - 1], path[t]] for t in range(1, T)]))
        lp = d.log_prob(torch.tensor(path))
        assert torch.isclose(lp.exp(), p, rtol=1e-10)
        total += float(p)
    assert abs(total - 1.0) < 1e-10  # the chain is a normalized distribution over K^T paths


def test_markov_chain_sampling_frequencies_match_probabilities():
    torch.manual_seed(2)
    init = torch.tensor([0.7, 0.3])
    trans = torch.tensor([[0.9, 0.1], [0.2, 0.8]])
    d = MarkovChain(init.log(), trans.log(), 3)
    samples = d.sample((20000,))
    assert samples.shape == (20000, 3)
    freq = (samples == torch.tensor([0, 0, 1])).all(-1).float().mean()
    assert abs(float(freq) - 0.7 * 0.9 * 0.1) < 0.01  # 0.063 +- 4 standard errors


def test_markov_chain_block_shapes_inside_plate_and_with_inputs():
    K, T, N = 3, 6, 4

    def model():
        trans = torch.full((K, K), 1.0 / K)
        with ppl.plate("seq", N):
            z = ppl.markov_chain("z", K, trans, length=T)
        inputs = torch.randn(T, 2)
        w = torch.randn(2, K, K)
        z2 = ppl.markov_chain("z2", K, lambda u: torch.softmax(torch.einsum("ti,ijk->tjk", u, w), -1),
                              length=T, inputs=inputs)
        return z, z2

    z, z2 = model()
    assert z.shape == (N, T) and z.dtype == torch.long and int(z.max()) < K
    assert z2.shape == (T,)
    tr = poutine.trace(model).get_trace()
    assert tr.nodes["z2"]["fn"].time_varying and tr.nodes["z2"]["fn"].log_trans.shape == (T - 1, K, K)


def test_gaussian_chain_log_prob_matches_dense_gaussian():
    torch.manual_seed(3)
    D, T = 2, 5
    A = torch.tensor([[0.9, 0.2], [-0.1, 0.8]], dtype=torch.float64)
    Q = torch.tensor([[0.3, 0.05], [0.05, 0.2]], dtype=torch.float64)
    m0 = torch.tensor([1.0, -1.0], dtype=torch.float64)
    P0 = torch.eye(2, dtype=torch.float64) * 0.5
    B = torch.tensor([[1.0], [0.5]], dtype=torch.float64)
    u = torch.randn(T, 1, dtype=torch.float64)

    def model():
        return ppl.gaussian_chain("x", D, A, Q, m0, P0, length=T, inputs=u, input_matrix=B)

    x = model()
    assert x.shape == (T, D)
    fn = poutine.trace(model).get_trace().nodes["x"]["fn"]
    mean, cov = dense_lds_moments(m0, P0, A, Q, (u[1:] @ B.T), T)
    oracle = torch.distributions.MultivariateNormal(mean, cov).log_prob(x.reshape(-1))
    assert torch.isclose(fn.log_prob(x), oracle, rtol=1e-10)
    draws = fn.rsample((20000,)).reshape(20000, -1)
    assert torch.allclose(draws.mean(0), mean, atol=0.05)  # ~5 standard errors
    assert torch.allclose(torch.cov(draws.T), cov, atol=0.1)


def test_switching_chain_selects_dynamics_per_step():
    torch.manual_seed(4)
    K, D, T = 2, 2, 6
    A = torch.stack([torch.eye(D), -torch.eye(D)]).double()
    Q = (0.1 * torch.eye(D)).double()
    trans = torch.tensor([[0.8, 0.2], [0.3, 0.7]], dtype=torch.float64)

    def model():
        return ppl.switching_chain("s", K, D, trans, A, Q, length=T)

    tr = poutine.trace(model).get_trace()
    z, x = tr.nodes["s_z"]["value"], tr.nodes["s_x"]["value"]
    assert z.shape == (T,) and x.shape == (T, D)
    lp = tr.nodes["s_x"]["fn"].log_prob(x)
    manual = torch.distributions.MultivariateNormal(torch.zeros(D, dtype=torch.float64), torch.eye(D, dtype=torch.float64)).log_prob(x[0])
    for t in range(1, T):
        manual = manual + torch.distributions.MultivariateNormal(A[z[t]] @ x[t - 1], Q).log_prob(x[t])
    assert torch.isclose(lp, manual, rtol=1e-10)


@pytest.mark.parametrize("transition, pattern", [
    (torch.tensor([[0.5, 0.6], [0.5, 0.5]]), r"site 'z'.*rows of transition.*sum to one"),
    (torch.full((3, 3), 1 / 3), r"site 'z'.*transition must be \(\.\.\., num_states, num_states\) = \(\.\.\., 2, 2\), got \(3, 3\)"),
    (torch.tensor([[1.5, -0.5], [0.5, 0.5]]), r"site 'z'.*non-negative"),
])
def test_markov_chain_bad_transition(transition, pattern):
    with pytest.raises(ppl.ModelInputError, match=pattern):
        ppl.markov_chain("z", 2, transition, length=4)


def test_block_bad_arguments():
    with pytest.raises(ppl.ModelInputError, match="site 'z': length must be an integer >= 1"):
        ppl.markov_chain("z", 2, torch.eye(2), length=0)
    with pytest.raises(ppl.ModelInputError, match=r"site 'z': initial must have trailing dim num_states=2"):
        ppl.markov_chain("z", 2, torch.eye(2), torch.ones(3) / 3, length=3)
    with pytest.raises(ppl.ModelInputError, match=r"site 'x': dynamics must have shape \(2, 2\), got \(3, 3\)"):
        ppl.gaussian_chain("x", 2, torch.eye(3), torch.eye(2), length=3)
    with pytest.raises(ppl.ModelInputError, match=r"site 'x': noise_cov contains NaN"):
        ppl.gaussian_chain("x", 2, torch.eye(2), torch.full((2, 2), float("nan")), length=3)
    with pytest.raises(ppl.ModelInputError, match="site 'x': inputs and input_matrix must be given together"):
        ppl.gaussian_chain("x", 2, torch.eye(2), torch.eye(2), length=3, inputs=torch.zeros(3, 1))


def test_blocks_run_under_plain_pyro_svi():
    """A gaussian_chain with a nonlinear child stays a latent site that Pyro's SVI can fit."""
    torch.manual_seed(5)
    T = 8
    y = torch.sin(torch.linspace(0, 3, T)).unsqueeze(-1) + 0.1 * torch.randn(T, 1)

    def model(y):
        a = ppl.sample("a", dist.Normal(0.0, 1.0))
        x = ppl.gaussian_chain("x", 1, a.reshape(1, 1), 0.1 * torch.eye(1), length=T)
        ppl.sample("y", dist.Normal(torch.tanh(x), 0.1).to_event(2), obs=y)

    post = ppl.infer(model, y, backend="svi", num_steps=300, num_samples=50, progress=False)
    assert post.history[-1] < post.history[0]
    assert post.sample(10)["x"].shape == (10, T, 1)


def test_simulate_and_log_joint_of_a_model_with_blocks():
    K, T = 2, 5
    trans = torch.tensor([[0.9, 0.1], [0.3, 0.7]], dtype=torch.float64)
    init = torch.tensor([0.6, 0.4], dtype=torch.float64)
    loc = torch.tensor([-1.0, 2.0], dtype=torch.float64)

    def model(y):
        z = ppl.markov_chain("z", K, trans, init, length=T)
        ppl.sample("y", dist.Normal(loc[z], 0.5).to_event(1), obs=y)

    y = torch.zeros(T, dtype=torch.float64)
    sims = ppl.simulate(model, y, num_samples=3, seed=1)
    assert sims["z"].shape == (3, T) and sims["y"].shape == (3, T)
    assert not torch.equal(sims["y"][0], y)  # observed sites are resampled
    z = sims["z"][0]
    manual = init[z[0]].log() + sum(trans[z[t - 1], z[t]].log() for t in range(1, T))
    manual = manual + dist.Normal(loc[z], 0.5).log_prob(y).sum()
    assert torch.isclose(ppl.log_joint(model, {"z": z}, y), manual, rtol=1e-12)
    # with the chain left out, log_joint sums it out exactly: brute force over every path
    paths = [torch.tensor(p) for p in itertools.product(range(K), repeat=T)]
    brute = torch.logsumexp(torch.stack([init[p[0]].log() + trans[p[:-1], p[1:]].log().sum()
                                         + dist.Normal(loc[p], 0.5).log_prob(y).sum() for p in paths]), 0)
    assert torch.isclose(ppl.log_joint(model, {}, y), brute, rtol=1e-10)
