"""Pieces shared by the Pyro-based backends: seeding, the fit loop, plug-in posteriors of
discrete latents and chains, treatments, and the posterior predictive."""
from __future__ import annotations

import contextlib
from typing import Callable

import pyro
import pyro.poutine as poutine
import torch
from pyro.infer import Predictive, TraceEnum_ELBO, config_enumerate
from tqdm.auto import tqdm

from ppl.handlers import CollapseSpec, collapse, tabulate
from ppl.plan import SiteTreatment

from .exact import tables as kernels


@contextlib.contextmanager
def isolated(seed: int):
    """Seeded RNG and a fresh Pyro parameter store; both restored on exit (no global leakage)."""
    with torch.random.fork_rng(), pyro.get_param_store().scope():
        torch.manual_seed(seed)
        yield


def max_plate_nesting(graph) -> int:
    return max([len(s.plates) for s in graph.sites()] + [0])


def fit_model(model: Callable, facts) -> Callable:
    """The model inference runs on: exactly collapsible chains marginalized, finite discrete
    latents marked for parallel enumeration."""
    spec = facts.collapse_spec()
    out = collapse(model, spec) if spec else model
    return config_enumerate(out, default="parallel") if facts.enumerable else out


def traced_loss(loss_fn: Callable[[], torch.Tensor]) -> Callable[[], tuple[torch.Tensor, list]]:
    """Wrap a loss so that it also returns the unconstrained Pyro parameters it touched."""

    def step():
        with poutine.trace(param_only=True) as tr:
            loss = loss_fn()
        return loss, [site["value"].unconstrained() for site in tr.trace.nodes.values()]

    return step


def optimize(step: Callable[[], tuple[torch.Tensor, list]], num_steps: int, lr: float, progress: bool,
             desc: str) -> list[float]:
    """Adam with gradient-norm clipping on ``step() -> (loss, params)``; the parameters are
    those of the first step (guides create theirs lazily). Returns the loss per step."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    history: list[float] = []
    optim, params = None, None
    bar = tqdm(range(num_steps), desc=desc, disable=not progress, leave=False, mininterval=0.5)
    for _ in bar:
        loss, touched = step()
        if optim is None:
            params = list({id(p): p for p in touched}.values())
            optim = torch.optim.Adam(params, lr=lr)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"{desc}: the objective became {float(loss)} at step {len(history) + 1}; "
                                     "lower lr= or check the model's parameters")
        optim.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 10.0)
        optim.step()
        history.append(float(loss.detach()))
        bar.set_postfix(loss=f"{history[-1]:.4g}", refresh=False)
    return history


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
    """Tables of the collapsed chains with the globals fixed at ``values`` (detached)."""
    tables = tabulate(poutine.condition(model, data=values), args, kwargs, spec)
    return {name: type(t)(*[v.detach() if isinstance(v, torch.Tensor) else v for v in t])
            for name, t in tables.items()}


def chain_results(tables: dict) -> tuple[dict, dict, dict]:
    """(marginals, viterbi paths, smoothed means) of every collapsed chain."""
    marg, paths, means = {}, {}, {}
    with torch.no_grad():
        _fill_chain_results(tables, marg, paths, means)
    return marg, paths, means


def _fill_chain_results(tables, marg, paths, means):
    for name, table in tables.items():
        if hasattr(table, "log_lik"):
            marg[name] = kernels.discrete_posterior(table).marginals
            paths[name] = kernels.discrete_viterbi(table)
        else:
            means[name] = kernels.gaussian_posterior(table).mean


def chain_sampler(tables: dict) -> Callable[[int, torch.Generator], dict[str, torch.Tensor]]:
    """Exact posterior draws of the collapsed chains (given the globals the tables were built with)."""

    def draw(n: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
        out = {}
        with torch.no_grad():
            for name, table in tables.items():
                sample = kernels.discrete_sample if hasattr(table, "log_lik") else kernels.gaussian_sample
                out[name] = sample(table, n, generator)
        return out

    return draw


def predictive(model: Callable, args, kwargs, latent_sites: tuple[str, ...]) -> Callable:
    """samples (site -> (n, ...)) -> replicated data: every site of the model, latents given by ``samples``
    where provided, the rest drawn from the model."""

    def run(samples: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        given = {k: v for k, v in samples.items() if k in latent_sites}
        n = next(iter(samples.values())).shape[0] if samples else 1
        pred = Predictive(_unobserved(model), posterior_samples=given, num_samples=n, parallel=False)
        with torch.no_grad():
            return pred(*args, **kwargs)

    return run


def _unobserved(model: Callable) -> Callable:
    """The model with its observed sites resampled (replicated data)."""
    return poutine.uncondition(model)


def treatments(graph, facts, continuous: str, continuous_detail: str) -> list[SiteTreatment]:
    """Per-site treatment rows shared by the Pyro-based backends."""
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
