"""What ``ppl.infer`` checks before it fits anything, so that a bad input fails in a second with an error that
names it, not after a whole fit or deep inside a backend.

- options: ``num_steps`` / ``num_samples`` (integers >= 1), ``seed`` (an integer), ``device`` (one torch
  knows, that holds values and is available), ``model_kwargs`` (a dict);
- the plan: ``init=`` naming no latent site; an enumerated site in a plate of size 1 (Pyro's exact marginals
  cannot contract it);
- one trace of the model: networks whose dtype differs from the data's (they cannot be promoted), and data
  far larger than the model's prior scale (``ppl.data_scale``, a warning).
"""
from __future__ import annotations

from typing import Any, Callable

import pyro
import torch

from .data_scale import warn_on_data_scale
from .primitives import ModelInputError, model_name
from .trace import run_traced


def check_count(name: str, value: Any) -> None:
    """ValueError unless ``value`` is None or an integer >= 1 (bools refused)."""
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"ppl.infer: {name} must be an integer >= 1, got {value!r}")


def check_options(num_steps: Any, num_samples: Any, seed: Any, model_kwargs: Any) -> None:
    """ValueError / TypeError naming the first bad option of ``ppl.infer``."""
    check_count("num_steps", num_steps)
    check_count("num_samples", num_samples)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"ppl.infer: seed must be an integer, got {seed!r}")
    if model_kwargs is not None and not isinstance(model_kwargs, dict):
        raise TypeError(f"ppl.infer: model_kwargs must be a dict of keyword arguments, "
                        f"got {type(model_kwargs).__name__}")


def check_device(device: Any) -> torch.device | None:
    """``device`` as a ``torch.device`` (None stays None); ValueError for a name torch does not know, for
    ``"meta"`` (shapes without values), and for CUDA when none is available."""
    if device is None:
        return None
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"ppl.infer: device={device!r} is not a torch device ({exc}); use 'cpu' or 'cuda'") from None
    if dev.type == "meta":
        raise ValueError("ppl.infer: device='meta' holds shapes but no values, so nothing can be fitted there; "
                         "use 'cpu' or 'cuda'")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"ppl.infer: device={device!r} but no CUDA device is available "
                         "(torch.cuda.is_available() is False); use 'cpu'")
    return dev


def check_plan(plan, options: dict) -> None:
    """ValueError for an ``init=`` naming no latent site; ModelInputError for an enumerated site inside a plate
    of size 1 (outside the svae backend): Pyro's exact marginals (TraceEnum_ELBO.compute_marginals) fail there
    with an internal KeyError."""
    init = options.get("init")
    if isinstance(init, dict):
        latent = [s.name for s in plan.graph.latent()]
        unknown = sorted(set(init) - set(latent))
        if unknown:
            raise ValueError(f"init names unknown site(s) {unknown}; latent sites are {latent}")
    if plan.backend == "svae":
        return
    for name in plan.facts.enumerable:
        for plate, size in plan.graph.site(name).plates:
            if size == 1:
                raise ModelInputError(
                    f"site '{name}': a finite discrete latent summed out by enumeration sits in plate '{plate}' of "
                    f"size 1, which exact marginalization cannot handle; give at least 2 data points (or fix "
                    f"'{name}' with ppl.condition)")


def _module_dtypes(trace: pyro.poutine.Trace, options: dict) -> dict[torch.dtype, str]:
    """floating dtype -> the first network (``ppl.module`` in the trace, or a module in the options) with it."""
    out: dict[torch.dtype, str] = {}
    for name, site in trace.nodes.items():
        if site["type"] == "param" and "$$$" in name and site["value"].is_floating_point():
            out.setdefault(site["value"].dtype, f"ppl.module '{name.split('$$$')[0]}'")
    for key, value in options.items():
        values = value.items() if isinstance(value, dict) else [(key, value)]
        for sub, module in values:
            if isinstance(module, torch.nn.Module):
                for p in module.parameters():
                    out.setdefault(p.dtype, f"network {key}[{sub!r}]" if isinstance(value, dict) else f"network {key}")
    return out


def check_network_dtypes(model: Callable, trace: pyro.poutine.Trace, options: dict) -> None:
    """ModelInputError naming a data site and a network when the observed data's floating dtype is not the
    networks' (a float64 batch through float32 weights fails inside torch, during the fit)."""
    fixed = getattr(model, "fixed_sites", frozenset())
    data = {}
    for name, site in trace.nodes.items():
        value = site.get("value")
        if (site["type"] == "sample" and site["is_observed"] and name not in fixed and isinstance(value, torch.Tensor)
                and value.is_floating_point()):
            data.setdefault(value.dtype, name)
    for dtype, network in _module_dtypes(trace, options).items():
        for data_dtype, site in data.items():
            if data_dtype != dtype:
                raise ModelInputError(
                    f"model '{model_name(model)}': mixed floating-point dtypes: site '{site}' (observed data) is "
                    f"{data_dtype} but {network} has {dtype} parameters; convert one of them (y.to({dtype}) or "
                    f"net.to({data_dtype}))")


def check_traced(model: Callable, args: tuple, kwargs: dict, options: dict) -> None:
    """Trace the model once (prior draws, no parameters left behind) and run the checks that need values."""
    with pyro.get_param_store().scope(), torch.no_grad():
        trace = run_traced(model, args, kwargs)
        check_network_dtypes(model, trace, options)
        warn_on_data_scale(model, args, kwargs, trace)
