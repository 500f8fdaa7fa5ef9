"""The compiler's runs of the model share one draw of a plated finite discrete latent along its plates
(``ppl.trace.CompactDiscrete``), and backend facts are computed only when the routing reads them
(``ppl.analysis.BackendFacts``).

Oracles: a plain Pyro trace of the model with one draw per entry (what the compiler ran before) gives the same
site records and facts on every library model; Pyro's own ``get_dependencies`` gives the same dependencies. A
model that does not broadcast the shared value is traced with one draw per entry; a data error is raised from
the first run.
"""
import importlib
import pickle

import pyro.poutine as poutine
import pytest
import torch
from pyro.infer.inspect import get_dependencies

import ppl
from ppl import dist
from ppl.analysis import BackendFacts, analyze
from ppl.backends import all_backends
from ppl.compiler import with_backend_facts
from ppl.graph import build_graph
from ppl.implicit import ImplicitDependencies
from ppl.models import MODEL_MODULES, lda
from ppl.primitives import ModelInputError, model_name
from ppl.trace import _entry_draw, run_traced, site_dependencies, site_infos


def full_trace(model, args, kwargs):
    """One draw per entry: the model under a plain Pyro trace, seeded as run_traced seeds it."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return poutine.trace(model).get_trace(*args, **kwargs)


def pyro_dependencies(model, args, kwargs):
    with torch.random.fork_rng():
        torch.manual_seed(0)
        deps = get_dependencies(ImplicitDependencies()(model), args, kwargs)["prior_dependencies"]
    return {child: {p for p in parents if p != child} for child, parents in deps.items()}


def library_cases():
    for name in MODEL_MODULES:
        module = importlib.import_module(f"ppl.models.{name}")
        sim = module.simulate(seed=0)
        yield pytest.param(module.model, sim.args, sim.kwargs, id=name)


@pytest.mark.parametrize("model, args, kwargs", library_cases())
def test_site_records_facts_and_dependencies_equal_those_of_full_draws(model, args, kwargs):
    trace = run_traced(model, args, kwargs)
    full = full_trace(model, args, kwargs)
    assert site_infos(trace) == site_infos(full)
    deps = site_dependencies(model, args, kwargs)
    assert deps == pyro_dependencies(model, args, kwargs)
    graph = build_graph(site_infos(trace), deps, model_name(model))
    graph_full = build_graph(site_infos(full), pyro_dependencies(model, args, kwargs), model_name(model))
    assert analyze(graph, model, args, kwargs, trace) == analyze(graph_full, model, args, kwargs, full)


def test_lda_topic_gets_one_shared_draw():
    sim = lda.simulate(seed=0, D=30, L=12, V=500)
    trace = run_traced(lda.model, sim.args, sim.kwargs)
    z, w = trace.nodes["z"], trace.nodes["w"]
    assert tuple(z["value"].shape) == (1, 1) and tuple(z["fn"].batch_shape) == (12, 30)
    probs = w["fn"].base_dist.probs if hasattr(w["fn"], "base_dist") else w["fn"].probs
    assert probs.untyped_storage().nbytes() <= 500 * probs.element_size()     # one row of topics, broadcast


def mixture(flat_to_event: bool):
    """A mixture that uses its assignments outside their plate, flattened (not broadcastable from a shared draw):
    with ``.to_event(1)`` the shared draw fails the data's shape check, without it the site silently shrinks."""

    @ppl.model
    def model(y):
        w = ppl.sample("w", dist.Dirichlet(torch.ones(2)))
        locs = ppl.sample("locs", dist.Normal(torch.zeros(2), 5.0).to_event(1))
        with ppl.plate("n", y.shape[0]):
            z = ppl.sample("z", dist.Categorical(w))
        fn = dist.Normal(locs[z.reshape(-1)], 1.0)
        ppl.sample("y", fn.to_event(1) if flat_to_event else fn, obs=y)

    return model


@pytest.mark.parametrize("flat_to_event", [True, False])
def test_a_model_that_does_not_broadcast_the_shared_draw_is_traced_with_full_draws(flat_to_event):
    y = torch.randn(7)
    model = mixture(flat_to_event)
    trace = run_traced(model, (y,), {})
    assert tuple(trace.nodes["z"]["value"].shape) == (7,)
    assert site_infos(trace) == site_infos(full_trace(model, (y,), {}))
    assert site_dependencies(model, (y,), {}) == pyro_dependencies(model, (y,), {})


def test_a_data_error_is_raised_from_the_first_run():
    calls = []

    @ppl.model
    def my_lda(docs, n_topics, vocab):
        calls.append(1)
        D, N = docs.shape
        with ppl.plate("themes", n_topics):
            phi = ppl.sample("phi", dist.Dirichlet(torch.full((vocab,), 0.5)))
        with ppl.plate("docs", D, dim=-1):
            mix = ppl.sample("mix", dist.Dirichlet(torch.full((n_topics,), 0.5)))
            with ppl.plate("tokens", N, dim=-2):
                topic = ppl.sample("topic", dist.Categorical(mix))
                ppl.sample("token", dist.Categorical(phi[topic]), obs=docs.T)

    docs = torch.randint(0, 6, (5, 4))
    docs[2, 1] = 6                                   # vocabulary 6: word id 6 is outside the support
    with pytest.raises(ModelInputError, match="site 'token'.*outside the support"):
        run_traced(my_lda, (docs, 2, 6), {})
    assert len(calls) == 1


def test_backend_facts_are_computed_when_read_and_the_plan_keeps_those():
    calls = []
    lazy = BackendFacts({"a": lambda: calls.append("a") or 1, "b": lambda: calls.append("b") or 2})
    assert "a" in lazy and "c" not in lazy and sorted(lazy) == ["a", "b"] and len(lazy) == 2 and calls == []
    assert lazy["b"] == 2 and lazy["b"] == 2 and calls == ["b"] and lazy.computed() == {"b": 2}

    sim = lda.simulate(seed=0, D=20, L=10)
    plan = ppl.compile(lda.model, *sim.args, **sim.kwargs)
    assert plan.backend == "vi" and "vi" in plan.facts.backend_facts
    assert "svi" not in plan.facts.backend_facts                 # routed before the svi rule: its check never ran
    with pytest.raises(KeyError, match="no facts of backend 'svi'"):
        plan.facts.of("svi")
    assert pickle.loads(pickle.dumps(plan)).backend == "vi"
    forced = ppl.compile(lda.model, *sim.args, backend="svi", **sim.kwargs)
    assert "svi" in forced.facts.backend_facts and forced.density is not None

    graph = plan.graph
    facts = with_backend_facts(graph, plan.facts, all_backends())
    assert isinstance(facts.backend_facts, BackendFacts) and facts.of("vi").admixture == ("doc_topics", "z", "w",
                                                                                           "topics")


def test_the_shared_draw_is_a_prior_draw_of_the_first_entry():
    torch.manual_seed(0)
    probs = torch.tensor([[0.7, 0.2, 0.1], [0.0, 0.0, 1.0]])              # entry 0 and entry 1 differ
    fn = dist.Categorical(probs).expand((5, 2))
    index = (slice(0, 1), slice(0, 1))
    draws = torch.stack([_entry_draw(fn, index) for _ in range(4000)])
    assert draws.shape == (4000, 1, 1)
    freq = torch.bincount(draws.reshape(-1), minlength=3).double() / 4000
    torch.testing.assert_close(freq, probs[0].double(), atol=0.03, rtol=0)   # sd <= 0.008
    assert _entry_draw(dist.OneHotCategorical(probs).expand((5, 2)), index) is None   # not rebuilt: full draws
