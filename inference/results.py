"""``make_posterior``: the one place a backend's results become a ``ppl.Posterior``.

Every backend calls it with what it computed; it adds what all share: the learned parameters
(from the Pyro parameter store the fit ran in), the chains' exact posteriors at the point
estimate when the backend hands over their tables (marginals, Viterbi paths, smoothed means,
and exact draws as a ``StateFunction`` of the tables), the model and data for the predictive,
and a ``DegenerateFit`` warning when a discrete latent ends with an empty state. The result
holds only data, so it pickles.
"""
from __future__ import annotations

import warnings
from typing import Any, Callable

import pyro
import torch

from ppl.posterior import LogEvidence, MCMCStats, Posterior, StateFunction

from .chains import chain_results, sample_chains


class DegenerateFit(UserWarning):
    """A fit ended with a state of a discrete latent that no data point uses (an empty component)."""


def warn_if_degenerate(discrete: dict[str, torch.Tensor], backend: str) -> None:
    """Warn ``DegenerateFit`` for each discrete latent with a state whose expected count
    ``sum over entries of q(z = k)`` is below one half (of ``n`` entries, ``n >= K``): an empty mixture component
    or a never-visited chain state. ``discrete``: site -> probabilities ``(..., K)``."""
    for site, probs in discrete.items():
        _, counts, n = _state_counts(probs)
        K = counts.shape[-1]
        if K > 1 and n >= K and float(counts.min()) < 0.5:
            k = int(counts.argmin())
            warnings.warn(f"{backend}: state {k} of '{site}' has an expected count of {float(counts[k]):.3g} of {n} "
                          f"entries: the fit uses fewer than its {K} states (an empty component). Try fewer states, "
                          "more restarts= or another init=", DegenerateFit, stacklevel=4)


FEW_ENTRIES = 2.0  # a state holding fewer expected entries than this (but at least 0.5) is nearly empty
SAME_STATE = 1e-3  # two states whose q(z = k) differ by less than this at every entry coincide


def warn_if_nearly_empty(discrete: dict[str, torch.Tensor], backend: str) -> None:
    r"""Warn ``DegenerateFit`` for each discrete latent (site -> probabilities ``(..., K)``, ``n`` entries) with

    - a state whose expected count :math:`\sum_n q(z_n = k)` lies in ``[0.5, FEW_ENTRIES)`` when ``n >= 4 K`` (below
      0.5 ``warn_if_degenerate`` already warns an empty state): a component fitted to one or two points,
      whose scale can collapse onto them (the likelihood is unbounded there; only the prior holds it);
    - two states whose probabilities differ by less than ``SAME_STATE`` at every entry (``n >= 2``): coinciding
      components (e.g. a fit stuck at the symmetric point where every state has the same parameters), so the fit
      uses fewer distinct states than it has.
    """
    for site, probs in discrete.items():
        flat, counts, n = _state_counts(probs)
        K = flat.shape[-1]
        low = (counts >= 0.5) & (counts < FEW_ENTRIES)
        if K > 1 and n >= 4 * K and bool(low.any()):
            k = int(torch.nonzero(low)[0])
            warnings.warn(f"{backend}: state {k} of '{site}' holds an expected {float(counts[k]):.3g} of {n} entries: a "
                          "component fitted to one or two points, whose scale can collapse onto them (a degenerate "
                          "fit). Try fewer states, more restarts= or another init=", DegenerateFit, stacklevel=4)
        if K > 1 and n >= 2:
            gap = (flat[:, :, None] - flat[:, None, :]).abs().amax(0)
            same = torch.nonzero(torch.triu(gap < SAME_STATE, diagonal=1) & (counts >= 0.5)[:, None])
            if same.numel():
                i, j = (int(v) for v in same[0])
                warnings.warn(f"{backend}: states {i} and {j} of '{site}' have the same probabilities at all {n} entries "
                              "(coinciding components: a degenerate fit using fewer distinct states than it has). "
                              "Try more restarts= or another init=", DegenerateFit, stacklevel=4)


def _state_counts(probs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """``(q (n, K), expected counts (K,), n)`` of a discrete latent's probabilities ``(..., K)``."""
    flat = probs.detach().reshape(-1, probs.shape[-1])
    return flat, flat.sum(0), flat.shape[0]


def _param_snapshot() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(constrained values, constraints) of the current Pyro parameter store, detached copies."""
    store = pyro.get_param_store()
    return {k: v.detach().clone() for k, v in store.items()}, dict(store.get_state()["constraints"])


def make_posterior(plan, model: Callable, args: tuple, kwargs: dict, *, draws: dict[str, torch.Tensor],
                   log_evidence: LogEvidence, point: dict[str, torch.Tensor] | None = None,
                   tables: dict | None = None, discrete: dict | None = None, smoothed_means: dict | None = None,
                   history: list[float] | None = None, mcmc: MCMCStats | None = None,
                   elbo_terms: dict | None = None, networks: dict | None = None,
                   local_sampler: StateFunction | None = None, encoder: StateFunction | None = None) -> Posterior:
    """Assemble the Posterior of a fit.

    draws: site -> ``(chains, draws, *value_shape)``. tables: the collapsed chains' tables at the point
    estimate (``chains.chain_tables``); their marginals, Viterbi paths and smoothed means are added to
    ``discrete``, ``map_paths`` and ``smoothed_means``, and exact chain draws become the local sampler
    unless the backend gives its own. ``discrete`` entries the backend computed win over table marginals.
    """
    tables = tables or {}
    marg, paths, means = chain_results(tables)
    marg.update(discrete or {})
    warn_if_degenerate(marg, plan.backend)
    means.update(smoothed_means or {})
    if local_sampler is None and tables:
        local_sampler = StateFunction(sample_chains, tables)
    params, constraints = _param_snapshot()
    return Posterior(plan=plan, draws=draws, log_evidence=log_evidence, discrete=marg, map_paths=paths,
                     point=dict(point or {}), smoothed_means=means, history=list(history or []), params=params,
                     param_constraints=constraints, mcmc=mcmc, elbo_terms=dict(elbo_terms or {}),
                     networks=dict(networks or {}), model=model, args=tuple(args), kwargs=dict(kwargs),
                     local_sampler=local_sampler, encoder=encoder,
                     interrupted=bool(getattr(history, "interrupted", False)))
