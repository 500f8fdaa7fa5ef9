"""The training loop every optimizing backend shares: Adam on a loss, Pyro ELBOs, autoguide fits.

``optimize`` runs the loop; ``fit_guide`` fits an AutoNormal / AutoDelta guide on the model a
backend prepared (chains collapsed, discrete sites enumerated): the svi backend's whole fit, the
exact backend's MAP; ``init_fn`` is the initialization both (and the svae backend) use.
"""
from __future__ import annotations

from typing import Callable

import pyro.poutine as poutine
import torch
from pyro.infer import Trace_ELBO, TraceEnum_ELBO
from pyro.infer.autoguide import AutoDelta, AutoNormal, init_to_median, init_to_value
from tqdm.auto import tqdm

GUIDES = {"normal": AutoNormal, "delta": AutoDelta}


def max_plate_nesting(graph) -> int:
    """The most plates any site of ``graph`` sits in."""
    return max([len(s.plates) for s in graph.sites()] + [0])


def traced_loss(loss_fn: Callable[[], torch.Tensor]) -> Callable[[], tuple[torch.Tensor, list]]:
    """Wrap a loss so that it also returns the unconstrained Pyro parameters it touched."""

    def step():
        with poutine.trace(param_only=True) as tr:
            loss = loss_fn()
        return loss, [site["value"].unconstrained() for site in tr.trace.nodes.values()]

    return step


def optimize(step: Callable[[], tuple[torch.Tensor, list]], num_steps: int, lr: float, progress: bool,
             desc: str) -> list[float]:
    """Adam with gradient-norm clipping (10) on ``step() -> (loss, params)``; the parameters are
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


def make_elbo(graph, facts, num_particles: int = 1):
    """TraceEnum_ELBO when finite discrete sites are enumerated, else Trace_ELBO.

    Dims left of the plates are the model's own batch dims (``Facts.unplated``): summed, not checked.
    """
    if facts.enumerable:
        return TraceEnum_ELBO(max_plate_nesting=max_plate_nesting(graph), num_particles=num_particles)
    return Trace_ELBO(max_plate_nesting=facts.plate_nesting, num_particles=num_particles)


def init_fn(init: dict | None):
    """Initialize latents at ``init`` (site -> value) where given, else at the prior median.

    Each value is copied: an autoguide may make its parameter from the very tensor it is given, so without the
    copy a fit would write into the user's tensor, and one tensor given for two sites would tie their parameters.
    """
    fallback = init_to_median(num_samples=15)
    if not init:
        return fallback
    values = {site: torch.as_tensor(value).detach().clone() for site, value in init.items()}
    return init_to_value(values=values, fallback=fallback)


def fit_guide(fmodel: Callable, args: tuple, kwargs: dict, plan, guide_kind: str, num_steps: int, lr: float,
              progress: bool, init: dict | None = None, desc: str = "fit"):
    """Fit an autoguide (``guide_kind`` "normal" or "delta") to ``fmodel``, the model with chains collapsed and
    discrete sites marked for enumeration (``chains.fit_model``), by Adam on the ELBO.

    Returns ``(guide, elbo, history)``.
    """
    if guide_kind not in GUIDES:
        raise ValueError(f"guide must be one of {sorted(GUIDES)}, got {guide_kind!r}")
    facts, graph = plan.facts, plan.graph
    unknown = sorted(set(init or {}) - set(graph.nodes))
    if unknown:
        raise ValueError(f"init names unknown site(s) {unknown}; latent sites are {[s.name for s in graph.latent()]}")
    hidden = poutine.block(fmodel, hide=list(facts.enumerable))
    guide = GUIDES[guide_kind](hidden, init_loc_fn=init_fn(init))
    elbo = make_elbo(graph, facts)
    step = traced_loss(lambda: elbo.differentiable_loss(fmodel, guide, *args, **kwargs))
    history = optimize(step, num_steps, lr, progress, f"{desc} ({guide_kind})")
    return guide, elbo, history
