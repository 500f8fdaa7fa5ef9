"""Trace -> ModelGraph -> Facts for GMM-, HMM-, LDS- and neural-shaped models."""
import torch

from ppl.analysis import analyze
from ppl.graph import trace_graph
from tests.ppl import models_for_tests as M


def facts_of(model, *args):
    graph, trace = trace_graph(model, args, {})
    return graph, analyze(graph, model, args, {}, trace)


def test_gmm_graph_and_facts():
    graph, facts = facts_of(M.gmm, torch.randn(10, 2))
    assert set(graph.edges()) == {("weights", "z"), ("loc", "x"), ("z", "x")}
    z = graph.site("z")
    assert z.is_discrete and z.discrete_size == 3 and z.plates == (("data", 10),) and not z.observed
    assert graph.site("x").observed and graph.site("x").event_shape == (2,)
    assert facts.enumerable == ("z",) and facts.continuous == ("weights", "loc")
    assert facts.chains == () and facts.neural == () and facts.latent_dim == 3 + 6
    assert facts.plates == {"components": 3, "data": 10}


def test_hmm_graph_and_facts():
    graph, facts = facts_of(M.hmm, torch.randn(7))
    z = graph.site("z")
    assert z.block == "markov_chain" and z.discrete_size == 3 and z.event_shape == (7,)
    assert set(graph.edges()) == {("trans", "z"), ("loc", "y"), ("z", "y")}
    assert facts.markov_chains == ("z",) and facts.chain_children == {"z": ("y",)}
    assert facts.tabulable == {"z": True} and facts.exactly_collapsible
    assert facts.collapse_spec().discrete == {"z": ("y",)}


def test_markov_chain_used_non_pointwise_is_not_tabulable():
    _, facts = facts_of(M.hmm_nonpointwise, torch.randn(6))
    assert facts.tabulable == {"z": False} and not facts.exactly_collapsible


def test_lds_graph_and_linear_gaussian_probe():
    graph, facts = facts_of(M.lds, torch.randn(6, 1))
    assert graph.site("x").block == "gaussian_chain" and graph.site("x").event_shape == (6, 2)
    assert facts.gaussian_chains == ("x",) and facts.linear_gaussian == {"x": True}
    assert facts.exactly_collapsible and facts.collapse_spec().gaussian == {"x": ("y",)}


def test_nonlinear_child_is_not_linear_gaussian():
    _, facts = facts_of(M.lds_nonlinear, torch.randn(6, 1))
    assert facts.linear_gaussian == {"x": False} and not facts.exactly_collapsible


def test_neural_likelihood_is_detected():
    graph, facts = facts_of(M.neural_lds, torch.randn(5, 3))
    assert graph.site("y").neural and not graph.site("x").neural
    assert facts.neural == ("y",) and facts.linear_gaussian == {"x": False}
