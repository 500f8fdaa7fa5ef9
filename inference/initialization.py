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

Each restart uses another k-means++ seed; the backend keeps the fit with the best objective. Restarts are made
cheap: each new labelling is relabelled to agree best with the first one (``align_labels``), a labelling equal
to an earlier one is dropped (its start would be the same), and its complete-data MAP starts from the first
start's values (the same components in the same order), so one round of at most 30 evaluations gets it close
(within 0.03 nats on the sunspot and El Nino HMMs) instead of the first fit's ~60-120 from the prior mean (iris
GMM 63, yearly sunspots HMM 93; from the median of 15 prior draws the GMM took 163: a component mean's draws under
a N(0, 10^2) prior have a median far from 0).
"""
from __future__ import annotations

from typing import Callable

import pyro
import pyro.poutine as poutine
import torch
from pyro.poutine.messenger import Messenger

from ppl.blocks import block_kind
from ppl.compiler import compile as compile_model
from ppl.primitives import condition

from . import chains, training

LLOYD_ITERATIONS = 10
START_STEPS = 150  # L-BFGS evaluations a round of the first complete-data MAP (the later ones: one round of a fifth)


def squared_distances(x: torch.Tensor, centers: torch.Tensor) -> torch.Tensor:
    r"""``(n, K)``: :math:`\|x_i - c_k\|^2` for rows ``x: (n, F)`` and ``centers: (K, F)``, by broadcasting
    (exact, no cancellation; ``torch.cdist`` was far slower on the small inputs k-means sees here: 309 x 1 rows,
    3 centers, 44 ms vs 18 us, on the shared 2-core machine)."""
    return ((x[:, None, :] - centers[None, :, :]) ** 2).sum(-1)


def kmeans_labels(x: torch.Tensor, K: int, generator: torch.Generator) -> torch.Tensor:
    """k-means++ seeding then ``LLOYD_ITERATIONS`` Lloyd steps on the rows of ``x: (n, F)`` (features
    standardized, non-finite entries set to the column mean): labels ``(n,)`` in ``[0, K)``."""
    x = x.double()
    finite = torch.isfinite(x)
    col_mean = torch.where(finite, x, 0).sum(0) / finite.sum(0).clamp_min(1)
    x = torch.where(finite, x, col_mean)
    x = (x - x.mean(0)) / x.std(0).clamp_min(1e-12) if x.shape[0] > 1 else x
    return lloyd_kmeans(x, K, generator)[0]


def lloyd_kmeans(x: torch.Tensor, K: int, generator: torch.Generator, iterations: int = LLOYD_ITERATIONS
                 ) -> tuple[torch.Tensor, float]:
    r"""k-means++ seeding then up to ``iterations`` Lloyd steps on the rows of ``x: (n, F)`` as given (finite):
    labels ``(n,)`` in ``[0, K)`` (on ``x``'s device) and the inertia :math:`\sum_i \|x_i - c_{z_i}\|^2`. The
    seeding draws from ``generator`` on its own device, whatever ``x``'s is."""
    where = generator.device   # draws are made where the generator lives (a CPU one: the same start on any device)
    centers = x[torch.randint(x.shape[0], (1,), generator=generator, device=where).to(x.device)]
    for _ in range(1, K):
        d2 = squared_distances(x, centers).min(-1).values
        pick = torch.multinomial((d2 / d2.sum()).to(where), 1, generator=generator) if float(d2.sum()) > 0 else \
            torch.randint(x.shape[0], (1,), generator=generator, device=where)
        centers = torch.cat([centers, x[pick.to(x.device)]])
    labels = squared_distances(x, centers).argmin(-1)
    for _ in range(iterations):
        onehot = torch.nn.functional.one_hot(labels, K).to(x.dtype)
        counts = onehot.sum(0)
        centers = torch.where(counts[:, None] > 0, onehot.T @ x / counts.clamp_min(1)[:, None], centers)
        new = squared_distances(x, centers).argmin(-1)
        if torch.equal(new, labels):
            break
        labels = new
    return labels, float(squared_distances(x, centers).gather(-1, labels[:, None]).sum())


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


class FirstStatePaths(Messenger):
    """Give every latent ``markov_chain`` site the path that stays in state 0 (int64, the site's value shape)
    instead of a draw: ``discrete_features`` reads only observed values off its trace, and the chain sampler steps
    through time in Python (~20-40 ms for 309 steps, as long as the rest of the trace)."""

    def _pyro_sample(self, msg):
        if msg["is_observed"] or msg["value"] is not None or msg["done"] or block_kind(msg) != "markov_chain":
            return
        fn = msg["fn"]
        shape = tuple(fn.batch_shape) + tuple(fn.event_shape)
        msg["value"] = torch.zeros(shape, dtype=torch.long, device=_device(fn))
        msg["done"] = True


def _device(fn) -> torch.device:
    """The device of the first tensor among the attributes of ``fn`` and its ``base_dist`` wrappers (CPU if none)."""
    while fn is not None:
        for value in vars(fn).values():
            if isinstance(value, torch.Tensor):
                return value.device
        fn = getattr(fn, "base_dist", None)
    return torch.device("cpu")


def discrete_features(model: Callable, args: tuple, kwargs: dict, plan) -> dict[str, tuple[torch.Tensor, int]]:
    """site -> (rows ``(prod(z_shape), F)`` of an observed child, K) for every finite discrete latent with K states
    that has a usable observed child with at least K rows; the model is traced once, its latent chains given the
    all-zeros path (``FirstStatePaths``: only observed values are read), and ``data_driven_starts`` reads the rows
    once for all its restarts."""
    facts, graph = plan.facts, plan.graph
    discrete = {s: tuple(graph.children_of(s)) for s in facts.enumerable}
    discrete.update(facts.collapse_spec().discrete)
    if not discrete:
        return {}
    with torch.no_grad(), pyro.get_param_store().scope(), FirstStatePaths():
        trace = poutine.trace(model).get_trace(*args, **kwargs)
    out = {}
    for site, children in discrete.items():
        rows = _features(trace, graph, site, children)
        K = graph.site(site).discrete_size
        if rows is not None and K is not None and rows.shape[0] >= K:
            out[site] = (rows.to(trace.nodes[site]["value"].device), K)
    return out


def hard_assignments(model: Callable, args: tuple, kwargs: dict, plan, generator: torch.Generator,
                     features: dict | None = None) -> dict:
    """site -> labels (its value shape) for every finite discrete latent that has a usable observed child: k-means
    of its rows (``features``: ``discrete_features``' output, computed here when None)."""
    features = discrete_features(model, args, kwargs, plan) if features is None else features
    return {site: kmeans_labels(rows, K, generator).to(rows.device).reshape(plan.graph.site(site).value_shape)
            for site, (rows, K) in features.items()}


def complete_data_plan(model: Callable, args: tuple, kwargs: dict, labels: dict):
    """The plan of ``model`` with the discrete latents fixed at ``labels`` (its structure does not depend on
    the labels' values, so one plan serves every restart); None if it cannot be compiled."""
    try:
        plan = compile_model(condition(model, labels), *args, backend="svi", **kwargs)
    except (ValueError, RuntimeError):
        return None
    return plan if plan.facts.continuous else None


def complete_data_map(model: Callable, args: tuple, kwargs: dict, labels: dict, plan, num_steps: int,
                      init: dict | None = None, rounds: int = 3) -> dict:
    """MAP of the globals with the discrete latents fixed at ``labels`` (chains still collapsed where exact;
    ``plan`` from ``complete_data_plan``), started at ``init`` (site -> value; None: the prior mean where it is
    finite, else the prior median, ``training.init_to_prior_mean``): site ->
    value, detached. L-BFGS runs at most ``num_steps`` evaluations; a fit that used them all without converging
    (e.g. stalled at a start far from the data's scale, its line searches leaving the domain) is resumed from its
    best point with fresh curvature memory, at most ``rounds`` rounds in all. Fails soft: {} if the fit fails."""
    fixed = condition(model, labels)
    point = init
    try:
        for _ in range(rounds):
            with pyro.get_param_store().scope():
                guide, _, history = training.fit_guide(chains.fit_model(fixed, plan.facts), args, kwargs, plan,
                                                       "delta", num_steps, 0.0, False, init=point, desc="init",
                                                       optimizer="lbfgs", warn=False,
                                                       init_fallback=training.init_to_prior_mean)
                if history.interrupted:  # Ctrl-C while finding starts: nothing fitted yet, stop here
                    raise KeyboardInterrupt("interrupted while computing data-driven starts")
                with torch.no_grad():
                    point = {k: v.detach() for k, v in guide.median(*args, **kwargs).items()}
            if len(history) < num_steps:
                break
        return point or {}
    except (ValueError, RuntimeError, FloatingPointError):
        return {}


def align_labels(labels: torch.Tensor, reference: torch.Tensor, K: int) -> torch.Tensor:
    """``labels`` relabelled by a permutation of ``[0, K)`` that matches them with ``reference`` (same shape):
    on the ``(K, K)`` contingency table, the pair (label, reference label) sharing the most entries is matched
    first, then the largest among the remaining rows and columns, and so on (greedy assignment: exact when
    each label has one clear counterpart, which is what deduplicating k-means restarts needs)."""
    table = torch.zeros(K, K, dtype=torch.float64)
    table.index_put_((labels.reshape(-1).cpu(), reference.reshape(-1).cpu()),
                     torch.ones(labels.numel(), dtype=torch.float64), accumulate=True)
    mapping = torch.empty(K, dtype=torch.long)
    for _ in range(K):
        flat = int(table.argmax())
        row, col = divmod(flat, K)
        mapping[row] = col
        table[row, :] = -1.0
        table[:, col] = -1.0
    return mapping.to(labels.device)[labels]


def data_driven_starts(model: Callable, args: tuple, kwargs: dict, plan, restarts: int, seed: int,
                       num_steps: int = START_STEPS) -> list[dict]:
    """Up to ``restarts`` distinct starting points (site -> value) from k-means hard assignments (module
    docstring): labellings equal to an earlier one after relabelling are dropped; fewer (possibly none) when the
    model has no finite discrete latent with a usable observed child. The first complete-data MAP runs rounds of
    at most ``num_steps`` evaluations from the prior mean (``complete_data_map``), the later ones one round of at most
    ``num_steps // 5`` from the first start: a start, not an optimum, which the screening rounds of the real fit
    refine (on the sunspot and El Nino HMMs these fits were within 0.03 nats of their optimum after 30 evaluations
    and took 32-45 to meet the stopping rule)."""
    starts, fixed_plan, seen = [], None, []
    features = discrete_features(model, args, kwargs, plan)
    for r in range(restarts):
        generator = torch.Generator().manual_seed(seed * 1009 + r)
        labels = hard_assignments(model, args, kwargs, plan, generator, features)
        if not labels:
            break
        if seen:
            labels = {site: align_labels(z, seen[0][site], plan.graph.site(site).discrete_size)
                      for site, z in labels.items()}
            if any(all(torch.equal(z, old[site]) for site, z in labels.items()) for old in seen):
                continue
        seen.append(labels)
        fixed_plan = fixed_plan or complete_data_plan(model, args, kwargs, labels)
        if fixed_plan is None:
            break
        warm = starts[0] if starts else None
        start = (complete_data_map(model, args, kwargs, labels, fixed_plan, num_steps) if warm is None else
                 complete_data_map(model, args, kwargs, labels, fixed_plan, max(num_steps // 5, 1), warm, rounds=1))
        if start:
            starts.append(start)
    return starts
