"""``compile(model, *args, **kwargs) -> Plan``: trace, build the graph, gather facts, apply rules.

No inference runs here. The plan names the backend, how each site is treated, and why;
``backend=`` overrides the rules, and a backend that cannot run the model raises an error
naming the fact that stops it.
"""
from __future__ import annotations

from typing import Callable

import pyro

from ppl.inference.base import UnsupportedModelError, get_backend

from .analysis import analyze
from .graph import trace_graph
from .plan import Plan
from .primitives import model_name
from .rules import RULES


def _check_structure(facts) -> None:
    """Raise for model structures no backend can fit."""
    if facts.unenumerable:
        raise UnsupportedModelError(
            f"site '{facts.unenumerable[0]}' is a latent discrete variable with infinite support; graphppl "
            "marginalizes only finite discrete latents (Categorical, Bernoulli, markov_chain): "
            "bound its support or make it continuous")


def choose_backend(facts) -> tuple[str, str, str, tuple[str, ...]]:
    """First rule that applies and whose backend supports the model: (backend, rule, reason, skipped)."""
    skipped = []
    for rule in RULES:
        if not rule.applies(facts):
            continue
        verdict = get_backend(rule.backend).supports(facts)
        if verdict.ok:
            return rule.backend, rule.name, rule.reason, tuple(skipped)
        skipped.append(f"{rule.name} -> {rule.backend}: {verdict.reason}")
    raise UnsupportedModelError("no backend can run this model: " + "; ".join(skipped))


def compile(model: Callable, *args, backend: str = "auto", **kwargs) -> Plan:  # noqa: A001
    """Analyze ``model(*args, **kwargs)`` and decide how to infer it.

    Args:
        model: a model function (``@ppl.model`` or plain).
        *args, **kwargs: the data and options the model is called with.
        backend: "auto" (rules decide) or a backend name ("exact", "svi", "mcmc").
    Returns:
        a frozen ``Plan``; ``print(plan.explain())`` shows it.
    """
    if backend != "auto":
        get_backend(backend)  # unknown names fail before tracing
    with pyro.get_param_store().scope():  # tracing must not leave parameters behind
        graph, trace = trace_graph(model, args, kwargs)
        facts = analyze(graph, model, args, kwargs, trace)
    _check_structure(facts)
    if backend == "auto":
        name, rule, reason, skipped = choose_backend(facts)
    else:
        verdict = get_backend(backend).supports(facts)
        if not verdict.ok:
            raise UnsupportedModelError(f"backend '{backend}' cannot run model '{model_name(model)}': {verdict.reason}")
        name, rule, reason, skipped = backend, "user override", f"backend='{backend}' requested", ()
    treatments = tuple(get_backend(name).treatments(graph, facts))
    return Plan(model_name(model), name, rule, reason, treatments, facts, considered=skipped, graph=graph)
