"""``compile(model, *args, **kwargs) -> Plan``: trace, build the graph, gather facts, apply rules.

No inference runs here. Every registered backend (``ppl.backends``) adds its own facts and
rules; the rules are tried in order and the first whose backend supports the model wins (a backend's
facts are computed when a rule first reads them, so the backends after the winner cost nothing). The
plan names the backend, how each site is treated, and why; ``backend=`` overrides the rules,
and a backend that cannot run the model raises an error naming the fact that stops it.
"""
from __future__ import annotations

import inspect
from dataclasses import replace
from typing import Callable

import pyro

from .analysis import BackendFacts, Facts, analyze
from .backends import Backend, UnsupportedModelError, all_backends, get_backend, routing_rules
from .graph import ModelGraph, trace_graph
from .plan import Plan, RuleOutcome
from .primitives import model_name


def _check_structure(facts: Facts) -> None:
    """Raise for model structures no backend can fit."""
    if facts.unenumerable:
        raise UnsupportedModelError(
            f"site '{facts.unenumerable[0]}' is a latent discrete variable with infinite support; graphppl "
            "marginalizes only finite discrete latents (Categorical, Bernoulli, markov_chain): "
            "bound its support or make it continuous")


def with_backend_facts(graph: ModelGraph, facts: Facts, backends: tuple[Backend, ...],
                       probe: tuple | None = None) -> Facts:
    """``facts`` with each backend's own facts attached (``facts.of(name)``), each computed when first read
    (``BackendFacts``). A hook that takes more than ``(graph, facts)`` also gets ``probe = (model, args,
    kwargs)``: it may run the model to look closer (``Backend.facts``)."""
    hooks = {b.name: _bound_hook(b.facts, graph, facts, probe) for b in backends if b.facts is not None}
    return replace(facts, backend_facts=BackendFacts(hooks))


def _bound_hook(hook, graph: ModelGraph, facts: Facts, probe: tuple | None) -> Callable[[], object]:
    """``hook`` with its arguments bound: ``(graph, facts)``, plus the probe when it takes one."""
    if probe and _takes_probe(hook):
        return lambda: hook(graph, facts, *probe)
    return lambda: hook(graph, facts)


def consulted(facts: Facts) -> Facts:
    """``facts`` keeping, as a plain dict, the backend facts that were read (what a ``Plan`` holds: no hook
    keeps the model and its data alive, and the plan pickles)."""
    lazy = facts.backend_facts
    return replace(facts, backend_facts=lazy.computed()) if isinstance(lazy, BackendFacts) else facts


def _takes_probe(hook) -> bool:
    """Does a facts hook accept ``(graph, facts, model, args, kwargs)``?"""
    params = inspect.signature(hook).parameters.values()
    if any(p.kind is inspect.Parameter.VAR_POSITIONAL for p in params):
        return True
    return sum(p.kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
               for p in params) >= 5


def default_options(backend: Backend) -> tuple[tuple[str, object], ...]:
    """The options ``backend.run`` takes and their defaults, sorted by name (what ``plan.explain()`` shows
    before ``ppl.infer`` merges the user's)."""
    skip = {"model", "args", "kwargs", "plan", "progress"}
    params = inspect.signature(backend.run).parameters.values()
    return tuple(sorted((p.name, p.default) for p in params
                        if p.name not in skip and p.default is not inspect.Parameter.empty))


def route(facts: Facts, backends: tuple[Backend, ...]) -> tuple[Backend, str, str, tuple[RuleOutcome, ...]]:
    """Try the rules in order: (backend, rule name, reason, outcome of every rule tried)."""
    by_name = {b.name: b for b in backends}
    tried = []
    for rule in routing_rules(backends):
        if not rule.applies(facts):
            tried.append(RuleOutcome(rule.name, rule.backend, "does not apply"))
            continue
        verdict = by_name[rule.backend].supports(facts)
        if verdict.ok:
            tried.append(RuleOutcome(rule.name, rule.backend, "chosen"))
            return by_name[rule.backend], rule.name, rule.reason, tuple(tried)
        tried.append(RuleOutcome(rule.name, rule.backend, f"applies, but {verdict.reason}"))
    raise UnsupportedModelError("no backend can run this model: " + "; ".join(
        f"{t.rule} -> {t.backend}: {t.outcome}" for t in tried))


def compile(model: Callable, *args, backend: str = "auto", **kwargs) -> Plan:  # noqa: A001
    """Analyze ``model(*args, **kwargs)`` and decide how to infer it.

    Args:
        model: a model function (``@ppl.model`` or plain).
        *args, **kwargs: the data and options the model is called with.
        backend: "auto" (rules decide) or a backend name (``ppl.backends.backend_names()``).
    Returns:
        a frozen ``Plan``; ``print(plan.explain())`` shows it.
    """
    if backend != "auto":
        get_backend(backend)  # unknown names fail before tracing
    backends = all_backends()
    # tracing and the backends' facts (computed as the rules read them) must not leave parameters behind
    with pyro.get_param_store().scope():
        graph, trace = trace_graph(model, args, kwargs)
        facts = with_backend_facts(graph, analyze(graph, model, args, kwargs, trace), backends, (model, args, kwargs))
        del trace
        _check_structure(facts)
        if backend == "auto":
            chosen, rule, reason, tried = route(facts, backends)
        else:
            chosen = get_backend(backend)
            verdict = chosen.supports(facts)
            if not verdict.ok:
                raise UnsupportedModelError(f"backend '{backend}' cannot run model '{model_name(model)}': "
                                            f"{verdict.reason}")
            rule, reason, tried = "user override", f"backend='{backend}' requested", ()
        treatments = tuple(chosen.treatments(graph, facts))
        density = None
        if chosen.name in COMPILED_DENSITY_BACKENDS and "svi" in facts.backend_facts:
            density = facts.of("svi").get("density_refusal") or ""
    return Plan(model_name(model), chosen.name, rule, reason, treatments, consulted(facts),
                options=default_options(chosen), rules_tried=tried, graph=graph, density=density)


COMPILED_DENSITY_BACKENDS = ("svi", "exact", "mcmc")
"""Backends whose objective is the compiled log density, with Pyro's ELBO / potential as the fallback
(``plan.density`` says which one a model gets: the svi backend's facts hook runs the check,
``compiled.refusal``)."""
