"""ModelGraph: the compiler's IR, a networkx DiGraph with one node per sample site.

Node attributes are the fields of ``ppl.trace.SiteInfo``; an edge ``parent -> child`` means
the child's distribution depends on the parent's value. The graph is built once at compile
time; no backend walks it on a hot path.
"""
from __future__ import annotations

from dataclasses import asdict
from typing import Callable

import networkx as nx

from .primitives import model_name
from .trace import SiteInfo, run_traced, site_dependencies, site_infos


class ModelGraph(nx.DiGraph):
    """Sites of one model on one data set. ``graph.graph['name']`` is the model's name."""

    def site(self, name: str) -> SiteInfo:
        """The ``SiteInfo`` of site ``name``."""
        return self.nodes[name]["info"]

    def sites(self) -> list[SiteInfo]:
        """All sites in execution order."""
        return [self.nodes[n]["info"] for n in self.graph["order"]]

    def latent(self) -> list[SiteInfo]:
        """Unobserved sites in execution order."""
        return [s for s in self.sites() if not s.observed]

    def observed(self) -> list[SiteInfo]:
        """Observed sites in execution order."""
        return [s for s in self.sites() if s.observed]

    def children_of(self, name: str) -> list[str]:
        """Direct children of ``name`` in execution order."""
        kids = set(self.successors(name))
        return [n for n in self.graph["order"] if n in kids]

    def parents_of(self, name: str) -> list[str]:
        """Direct parents of ``name`` in execution order."""
        ups = set(self.predecessors(name))
        return [n for n in self.graph["order"] if n in ups]


def build_graph(sites: list[SiteInfo], deps: dict[str, set[str]], name: str = "model") -> ModelGraph:
    """Assemble the IR from traced sites and provenance dependencies (child -> parents)."""
    graph = ModelGraph(name=name, order=[s.name for s in sites])
    for s in sites:
        graph.add_node(s.name, info=s, **asdict(s))
    for child, parents in deps.items():
        for parent in parents:
            if child in graph and parent in graph:
                graph.add_edge(parent, child)
    return graph


def trace_graph(model: Callable, args: tuple = (), kwargs: dict | None = None):
    """Trace ``model`` on its data and return ``(ModelGraph, trace)``."""
    kwargs = kwargs or {}
    trace = run_traced(model, args, kwargs)
    graph = build_graph(site_infos(trace), site_dependencies(model, args, kwargs), model_name(model))
    return graph, trace
