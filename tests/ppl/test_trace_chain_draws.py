"""The dependency run draws a latent chain's value without provenance (``ppl.trace.PlainChainDraws``): a
``MarkovChain`` by the Gumbel-max recursion ``MarkovChain.gumbel_max_path``, other chains by their sampler on a
provenance-free copy of the distribution; same dependencies, the traced distribution untouched.

Oracles: Pyro's own ``get_dependencies`` (its provenance tracking through the chain sampler, step by step); the draw
of the same distribution with provenance-tracked parameters under the same seed; the exact initial and transition
probabilities for the frequencies of ``MarkovChain.gumbel_max_path`` (multinomial sampling error, 8000 draws).
"""
import pyro.poutine as poutine
import pytest
import torch
from pyro.infer.inspect import TrackProvenance, get_dependencies
from pyro.ops.provenance import ProvenanceTensor, get_provenance

import ppl
from ppl import dist
from ppl.chain_dists import GaussianChain, MarkovChain
from ppl.trace import PlainChainDraws, run_traced, site_dependencies, without_provenance


@ppl.model
def hmm_with_start(y, K=3):
    trans = ppl.sample("trans", dist.Dirichlet(y.new_ones(K, K)).to_event(1))
    loc = ppl.sample("loc", dist.Normal(y.new_zeros(K), 100.0).to_event(1))
    sigma = ppl.sample("sigma", dist.HalfCauchy(y.new_full((K,), 50.0)).to_event(1))
    p0 = ppl.sample("p0", dist.Dirichlet(y.new_ones(K)))
    z = ppl.markov_chain("z", num_states=K, transition=trans, initial=p0, length=y.shape[-1])
    ppl.sample("y", dist.Normal(loc[z], sigma[z]), obs=y)


@ppl.model
def local_level(y):
    q = ppl.sample("q", dist.HalfNormal(y.new_ones(())))
    x = ppl.gaussian_chain("x", dim=1, dynamics=y.new_ones(1, 1), noise_cov=(q ** 2).reshape(1, 1),
                           length=y.shape[0])
    ppl.sample("y", dist.Normal(x, 0.5).to_event(2), obs=y)


def pyro_dependencies(model, *args):
    with torch.random.fork_rng():
        torch.manual_seed(0)
        deps = get_dependencies(model, args)["prior_dependencies"]
    return {child: set(parents) - {child} for child, parents in deps.items()}


def test_dependencies_equal_pyros_tracking_through_the_sampler(monkeypatch):
    y = torch.randn(200, dtype=torch.float64) * 30 + 50
    expected = pyro_dependencies(hmm_with_start, y)

    def refuse(*args, **kwargs):
        raise AssertionError("the dependency run called the chain's sampler")

    monkeypatch.setattr(MarkovChain, "sample", refuse)       # gumbel_max_path instead
    assert site_dependencies(hmm_with_start, (y,), {}) == expected
    monkeypatch.undo()
    assert site_dependencies(hmm_with_start, (y,), {}) == pyro_dependencies(hmm_with_start, y)
    assert site_dependencies(hmm_with_start, (y,), {})["z"] == {"trans", "p0"}
    level = torch.randn(50, 1, dtype=torch.float64).cumsum(0)
    assert site_dependencies(local_level, (level,), {}) == pyro_dependencies(local_level, level)


def test_the_draw_is_the_tracked_draw_and_the_distribution_is_untouched():
    g = torch.Generator().manual_seed(0)
    log_init = torch.randn(3, generator=g, dtype=torch.float64).log_softmax(-1)
    log_trans = torch.randn(3, 3, generator=g, dtype=torch.float64).log_softmax(-1)
    tracked = MarkovChain(ProvenanceTensor(log_init, frozenset({"p0"})),
                          ProvenanceTensor(log_trans, frozenset({"trans"})), 50)
    plain = without_provenance(tracked)
    assert get_provenance(plain.log_init) == frozenset() and get_provenance(plain.log_trans) == frozenset()
    assert get_provenance(tracked.log_trans) == frozenset({"trans"})   # the original keeps its provenance
    with torch.random.fork_rng():
        torch.manual_seed(1)
        expected = tracked.sample()
        torch.manual_seed(1)
        got = plain.sample()
    assert torch.equal(got, expected)
    chain = GaussianChain(torch.zeros(1, dtype=torch.float64), torch.eye(1, dtype=torch.float64),
                          ProvenanceTensor(torch.ones(1, 1, dtype=torch.float64), frozenset({"a"})),
                          torch.eye(1, dtype=torch.float64), 20)
    gaussian = torch.distributions.Independent(chain.expand((2,)), 1)  # a wrapper: its base_dist is copied too
    copy = without_provenance(gaussian)
    assert get_provenance(copy.base_dist.dynamics) == frozenset()
    assert get_provenance(gaussian.base_dist.dynamics) == frozenset({"a"})


@pytest.mark.parametrize("time_varying", [False, True])
def test_gumbel_max_path_has_the_chains_law(time_varying):
    """8000 draws of a 3-step chain (a batch of 2000 x 4 draws): the frequency of z_0 within 0.02 of the initial
    probabilities and of (z_1 | z_0), (z_2 | z_1) within 0.04 of their transition rows (a few multinomial sds at
    >= ~600 counts a row); shape and dtype of the value."""
    init = torch.tensor([0.2, 0.3, 0.5], dtype=torch.float64)
    trans = torch.tensor([[0.8, 0.15, 0.05], [0.1, 0.7, 0.2], [0.3, 0.3, 0.4]], dtype=torch.float64)
    log_trans = (torch.stack([trans, trans.flip(-1)]) if time_varying else trans).log()
    chain = MarkovChain(init.log().expand(2000, 4, 3), log_trans, 3, time_varying=time_varying)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        z = chain.gumbel_max_path().reshape(-1, 3)
    assert z.dtype == torch.long and tuple(chain.gumbel_max_path().shape) == (2000, 4, 3)
    assert torch.allclose(torch.bincount(z[:, 0], minlength=3).double() / len(z), init, atol=0.02)
    for t in (1, 2):
        rows = trans.flip(-1) if time_varying and t == 2 else trans
        for i in range(3):
            hits = z[z[:, t - 1] == i, t]
            assert torch.allclose(torch.bincount(hits, minlength=3).double() / len(hits), rows[i], atol=0.04)


def test_only_latent_chain_sites_are_drawn_by_the_handler():
    """An observed chain keeps its data; other latents are drawn by Pyro as before (their values carry the
    site's own provenance either way)."""
    y = torch.randn(30, dtype=torch.float64)
    path = torch.randint(3, (30,))

    @ppl.model
    def observed_chain(y):
        trans = ppl.sample("trans", dist.Dirichlet(y.new_ones(3, 3)).to_event(1))
        ppl.markov_chain("z", num_states=3, transition=trans, length=30, obs=path)

    with TrackProvenance(), PlainChainDraws():
        trace = poutine.trace(observed_chain).get_trace(y)
    assert torch.equal(trace.nodes["z"]["value"], path)


def test_the_compilers_trace_draws_the_chain_without_its_sampler(monkeypatch):
    """``run_traced`` (the compiler's run) gives a latent chain a ``MarkovChain.gumbel_max_path`` path: states in
    [0, K), int64, the chain's shape; a chain fixed by ``ppl.condition`` keeps its value."""
    y = torch.randn(50, dtype=torch.float64)

    def refuse(*args, **kwargs):
        raise AssertionError("the compiler's run called the chain's sampler")

    monkeypatch.setattr(MarkovChain, "sample", refuse)
    z = run_traced(hmm_with_start, (y,), {}).nodes["z"]["value"]
    assert z.dtype == torch.long and z.shape == (50,) and 0 <= int(z.min()) and int(z.max()) < 3
    fixed = torch.arange(50) % 3
    conditioned = ppl.condition(hmm_with_start, {"z": fixed})
    assert torch.equal(run_traced(conditioned, (y,), {}).nodes["z"]["value"], fixed)
