r"""Data-driven starting points for fitting the globals of a model with finite discrete latents.

A mixture or HMM fit started from the prior (e.g. component means at the prior mean 0 when the data sit
near 80) can settle in a poor local optimum. The classic cure is to start from a clustering of the data
(k-means++ for mixtures, k-means on the emissions for chains); here it is done generically, through the
model itself:

1. for each finite discrete latent (an enumerated site or a collapsed ``markov_chain``) with K states,
   take an observed child whose value is indexed like the latent (``(*z_shape, features...)``), cluster
   its entries into K groups by k-means++ and a few Lloyd iterations, and read the labels as a
   hard assignment ``z``;
2. fix the latents at those assignments (``ppl.condition``) and fit the globals by MAP on that
   complete-data model, a cheap and well-posed problem;
3. those MAP values are the starting point of the real fit (``init``).

Each restart uses another k-means++ seed; the backend keeps the fit with the best objective.
"""
from __future__ import annotations

from typing import Callable

import pyro
import pyro.poutine as poutine
import torch

from ppl.compiler import compile as compile_model
from ppl.primitives import condition

from . import chains, training

LLOYD_ITERATIONS = 10


def kmeans_labels(x: torch.Tensor, K: int, generator: torch.Generator) -> torch.Tensor:
    """k-means++ seeding then ``LLOYD_ITERATIONS`` Lloyd steps on the rows of ``x: (n, F)`` (features
    standardized, non-finite entries set to the column mean): labels ``(n,)`` in ``[0, K)``."""
    x = x.double()
    finite = torch.isfinite(x)
    col_mean = torch.where(finite, x, 0).sum(0) / finite.sum(0).clamp_min(1)
    x = torch.where(finite, x, col_mean)
    x = (x - x.mean(0)) / x.std(0).clamp_min(1e-12) if x.shape[0] > 1 else x
    centers = x[torch.randint(x.shape[0], (1,), generator=generator)]
    for _ in range(1, K):
        d2 = torch.cdist(x, centers).min(-1).values ** 2
        pick = torch.multinomial(d2 / d2.sum(), 1, generator=generator) if float(d2.sum()) > 0 else \
            torch.randint(x.shape[0], (1,), generator=generator)
        centers = torch.cat([centers, x[pick]])
    labels = torch.cdist(x, centers).argmin(-1)
    for _ in range(LLOYD_ITERATIONS):
        for k in range(K):
            if bool((labels == k).any()):
                centers[k] = x[labels == k].mean(0)
        labels = torch.cdist(x, centers).argmin(-1)
    return labels


def _features(trace, graph, site: str, children: tuple[str, ...]) -> torch.Tensor | None:
    """An observed child's values as rows indexed like ``site``'s value: ``(prod(z_shape), F)``, or None."""
    shape = graph.site(site).value_shape
    for child in children:
        node = trace.nodes.get(child)
        if node is None or not node["is_observed"] or not graph.site(child).value_shape[:len(shape)] == shape:
            continue
        value = node["value"].detach()
        if not value.is_floating_point():
            value = value.double()
        mask = node.get("mask")
        if isinstance(mask, torch.Tensor):
            value = torch.where(mask.reshape(mask.shape + (1,) * (value.dim() - mask.dim())), value,
                                torch.full_like(value, float("nan")))
        return value.reshape(int(torch.Size(shape).numel()), -1)
    return None


def hard_assignments(model: Callable, args: tuple, kwargs: dict, plan, generator: torch.Generator) -> dict:
    """site -> labels (its value shape) for every finite discrete latent that has a usable observed child."""
    facts, graph = plan.facts, plan.graph
    discrete = {s: tuple(graph.children_of(s)) for s in facts.enumerable}
    discrete.update(facts.collapse_spec().discrete)
    if not discrete:
        return {}
    with torch.no_grad(), pyro.get_param_store().scope():
        trace = poutine.trace(model).get_trace(*args, **kwargs)
    out = {}
    for site, children in discrete.items():
        rows = _features(trace, graph, site, children)
        K = graph.site(site).discrete_size
        if rows is None or K is None or rows.shape[0] < K:
            continue
        labels = kmeans_labels(rows, K, generator).to(trace.nodes[site]["value"].device)
        out[site] = labels.reshape(graph.site(site).value_shape)
    return out


def complete_data_plan(model: Callable, args: tuple, kwargs: dict, labels: dict):
    """The plan of ``model`` with the discrete latents fixed at ``labels`` (its structure does not depend on
    the labels' values, so one plan serves every restart); None if it cannot be compiled."""
    try:
        plan = compile_model(condition(model, labels), *args, backend="svi", **kwargs)
    except (ValueError, RuntimeError):
        return None
    return plan if plan.facts.continuous else None


def complete_data_map(model: Callable, args: tuple, kwargs: dict, labels: dict, plan, num_steps: int) -> dict:
    """MAP of the globals with the discrete latents fixed at ``labels`` (chains still collapsed where exact;
    ``plan`` from ``complete_data_plan``): site -> value, detached. Fails soft: {} if the fit fails."""
    fixed = condition(model, labels)
    try:
        with pyro.get_param_store().scope():
            guide, _, history = training.fit_guide(chains.fit_model(fixed, plan.facts), args, kwargs, plan,
                                                   "delta", num_steps, 0.0, False, desc="init", optimizer="lbfgs",
                                                   warn=False)
            if history.interrupted:  # Ctrl-C while finding starts: nothing fitted yet, stop here
                raise KeyboardInterrupt("interrupted while computing data-driven starts")
            with torch.no_grad():
                return {k: v.detach() for k, v in guide.median(*args, **kwargs).items()}
    except (ValueError, RuntimeError, FloatingPointError):
        return {}


def data_driven_starts(model: Callable, args: tuple, kwargs: dict, plan, restarts: int, seed: int,
                       num_steps: int = 150) -> list[dict]:
    """Up to ``restarts`` starting points (site -> value) from k-means hard assignments (module docstring);
    fewer (possibly none) when the model has no finite discrete latent with a usable observed child."""
    starts, fixed_plan = [], None
    for r in range(restarts):
        generator = torch.Generator().manual_seed(seed * 1009 + r)
        labels = hard_assignments(model, args, kwargs, plan, generator)
        if not labels:
            break
        fixed_plan = fixed_plan or complete_data_plan(model, args, kwargs, labels)
        if fixed_plan is None:
            break
        start = complete_data_map(model, args, kwargs, labels, fixed_plan, num_steps)
        if start:
            starts.append(start)
    return starts
