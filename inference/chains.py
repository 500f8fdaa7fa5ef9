"""Chains marginalized exactly inside any model, and their posteriors: the part of inference
every Pyro-based backend (exact, svi, mcmc) shares.

``collapse`` turns a model into one where each exactly collapsible chain (``Facts.collapse_spec``)
is replaced by a factor, the log normalizer of its tables (``ppl.handlers``) computed by the
exact kernels; ``chain_tables`` / ``chain_results`` / ``sample_chains`` give the chains'
posteriors once the globals are fixed.
"""
from __future__ import annotations

from typing import Any, Callable

import pyro
import pyro.poutine as poutine
import torch
from pyro.infer import TraceEnum_ELBO, config_enumerate

from ppl.handlers import CollapseChains, CollapseSpec, DiscreteTable, GaussianTable
from ppl.plan import SiteTreatment

from .exact import ops
from .exact import tables as kernels
from .training import max_plate_nesting


def collapsed_log_normalizer(table: DiscreteTable | GaussianTable) -> torch.Tensor:
    """log p(children | globals) with the chain marginalized: a scalar (summed over sequences).

    A Gaussian chain's log normalizer and its table's constant are both of order sum_t y_t' R^-1 y_t / 2 with
    opposite signs: they are added in float64 (both come as float64 sums) and only the O(T) result is cast
    back to the table's dtype (in float32 the two ~1e9 terms of a 1e5-step random walk lost ~12 nats). The
    Gaussian sum comes from ``ops.kalman_total_log_normalizer64`` (one operator: value and gradient in one
    pass)."""
    if isinstance(table, DiscreteTable):
        return kernels.discrete_log_normalizer(table).sum()
    log_z = ops.kalman_total_log_normalizer64(kernels.lds_prior(table.prior, table.center), table.J, table.h)
    return (log_z + table.const.to(torch.float64).sum()).to(table.h.dtype)


CENTER_NATS = 0.1
"""A Gaussian chain's potentials are re-taken about its filtered means when their constant's rounding in the
dtype of the data (``|const| * eps``) would exceed this many nats (float32 data far from 0 on long chains)."""


def _needs_center(table) -> bool:
    """True for a Gaussian table about 0 whose constant (and log Z, of the same size) the table's dtype
    rounds by more than ``CENTER_NATS``."""
    if not isinstance(table, GaussianTable) or table.center is not None:
        return False
    # one bool read of a comparison (not a float read of the constant): a recorded density guards the bool,
    # which stays the same from call to call, where a guard on the constant's value would fail at every call
    return bool(table.const.detach().abs() * torch.finfo(table.h.dtype).eps > CENTER_NATS)


def _run_collapsed(model: Callable, args: tuple, kwargs: dict, spec: CollapseSpec) -> tuple[Any, dict]:
    """Run ``model`` under ``CollapseChains``: (its return value, the chains' tables). A Gaussian chain whose
    table about 0 is too large for its dtype (``_needs_center``) is tabulated again about its filtered means:
    the same exact log normalizer (centering is a change of variables), without adding and cancelling two
    terms of order sum_t y_t'R^-1 y_t / 2 (in float32 at T = 1e5 on a random walk: 12 nats). The second run
    takes the first one's value of every other sample site (a global the fit's guide or ``condition`` set is
    seen only by the first run) and is hidden from the handlers outside (a trace sees each site once); only
    the re-centered tables are taken from it."""
    handler = CollapseChains(spec)
    tracer = poutine.trace(model)
    with torch.enable_grad(), handler:  # Gaussian potentials are read off by autograd
        out = tracer(*args, **kwargs)
        tables = handler.tables()
    centers = {name: kernels.gaussian_filtered_means(t) for name, t in tables.items() if _needs_center(t)}
    if not centers:
        return out, tables
    chains = {**spec.discrete, **spec.gaussian}
    values = {name: site["value"] for name, site in tracer.trace.nodes.items()  # latent, fixed by a handler
              if site["type"] == "sample" and name not in chains}                 # outside, or data
    handler = CollapseChains(spec, centers)
    with torch.enable_grad(), poutine.block(), handler:
        poutine.condition(model, data=values)(*args, **kwargs)
        return out, {**tables, **{name: t for name, t in handler.tables().items() if name in centers}}


def collapse(model: Callable, spec: CollapseSpec) -> Callable:
    """A new model in which every chain of ``spec`` is marginalized exactly (one factor per chain)."""

    def collapsed_model(*args, **kwargs):
        out, tables = _run_collapsed(model, args, kwargs, spec)
        for name, table in tables.items():
            pyro.factor(f"{name}.collapsed", collapsed_log_normalizer(table))
        return out

    collapsed_model.__name__ = getattr(model, "__name__", "model") + "_collapsed"
    return collapsed_model


def fit_model(model: Callable, facts) -> Callable:
    """The model inference runs on: exactly collapsible chains marginalized, finite discrete
    latents marked for parallel enumeration."""
    spec = facts.collapse_spec()
    out = collapse(model, spec) if spec else model
    return config_enumerate(out, default="parallel") if facts.enumerable else out


def discrete_marginals(model: Callable, args, kwargs, values: dict, graph, facts) -> dict[str, torch.Tensor]:
    """Posterior probabilities ``(*batch, K)`` of each enumerable site with the globals fixed at ``values``."""
    if not facts.enumerable:
        return {}
    elbo = TraceEnum_ELBO(max_plate_nesting=max_plate_nesting(graph))
    with torch.no_grad():
        fixed = poutine.condition(fit_model(model, facts), data=values)
        dists = elbo.compute_marginals(fixed, lambda *a, **k: None, *args, **kwargs)
    return {name: d.probs if hasattr(d, "probs") else d.logits.softmax(-1) for name, d in dists.items()
            if name in facts.enumerable}


def chain_tables(model: Callable, args, kwargs, values: dict, spec: CollapseSpec) -> dict:
    """Tables of the collapsed chains with the globals fixed at ``values`` (detached); {} if none."""
    if not spec:
        return {}
    _, tables = _run_collapsed(poutine.condition(model, data=values), args, kwargs, spec)
    return {name: type(t)(*[v.detach() if isinstance(v, torch.Tensor) else v for v in t])
            for name, t in tables.items()}


def chain_results(tables: dict) -> tuple[dict, dict, dict]:
    """(marginals ``(..., T, K)``, Viterbi paths ``(..., T)``, smoothed means ``(..., T, D)``) of the chains."""
    marg, paths, means = {}, {}, {}
    with torch.no_grad():
        for name, table in tables.items():
            if isinstance(table, DiscreteTable):
                marg[name] = kernels.discrete_posterior(table).marginals
                paths[name] = kernels.discrete_viterbi(table)
            else:
                means[name] = kernels.gaussian_posterior(table).mean
    return marg, paths, means


def sample_chains(tables: dict, n: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """``n`` exact posterior paths of every collapsed chain (given the globals the tables were built with):
    chain -> ``(n, ..., T)`` (markov_chain, FFBS) or ``(n, ..., T, D)`` (gaussian_chain)."""
    out = {}
    with torch.no_grad():
        for name, table in tables.items():
            sample = kernels.discrete_sample if isinstance(table, DiscreteTable) else kernels.gaussian_sample
            out[name] = sample(table, n, generator)
    return out


def site_treatments(graph, facts, continuous: str, continuous_detail: str) -> list[SiteTreatment]:
    """Per-site rows of ``plan.explain()`` for a backend that collapses chains and enumerates finite
    discrete latents; the remaining continuous latents get ``continuous`` (e.g. "guide")."""
    spec = facts.collapse_spec()
    rows = []
    for s in graph.sites():
        if s.observed:
            rows.append(SiteTreatment(s.name, "observed", f"{s.family}, shape {s.value_shape}"
                                      + (", neural likelihood" if s.neural else "")))
        elif s.name in spec.discrete:
            rows.append(SiteTreatment(s.name, "message passing",
                                      f"markov_chain K={s.discrete_size}: forward-backward, children tabulated"))
        elif s.name in spec.gaussian:
            rows.append(SiteTreatment(s.name, "message passing",
                                      "gaussian_chain with linear-Gaussian children: Kalman filter/smoother"))
        elif s.name in facts.enumerable:
            rows.append(SiteTreatment(s.name, "enumerate", f"finite support ({s.discrete_size} values), summed out exactly"))
        else:
            rows.append(SiteTreatment(s.name, continuous, continuous_detail))
    return rows
