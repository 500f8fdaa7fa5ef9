"""A warning for observed data whose scale the model's priors cannot reach.

Priors, initial values and optimizer step sizes are O(1) in most models; a fit on data of scale 1e8 then
stops far from the truth (HMM state means of ~5 for data at 4e8) without any error. Before fitting,
``ppl.infer`` compares, at each observed continuous site, the scale of the data with the scale of what the
model predicts there under one draw from its priors, and warns (``DataScaleWarning``, naming the site and
both scales) when the data are ``SCALE_RATIO`` times larger than that and than 1.

Scale of a tensor: the 90th percentile of its absolute finite entries (robust to outliers and to a few
huge values; up to ``MAX_ENTRIES`` entries are looked at, evenly strided).
"""
from __future__ import annotations

import warnings
from typing import Callable

import pyro
import torch

from .primitives import model_name
from .trace import run_traced

SCALE_RATIO = 1e4
MAX_ENTRIES = 10_000


class DataScaleWarning(UserWarning):
    """Observed data far larger than the model's prior scale: standardize them or widen the priors."""


def magnitude(x: torch.Tensor) -> float:
    """90th percentile of ``|x|`` over its finite entries (0.0 when there are none)."""
    flat = x.detach().reshape(-1)
    flat = flat[:: max(1, flat.numel() // MAX_ENTRIES)].double().abs()
    flat = flat[torch.isfinite(flat)]
    return float(torch.quantile(flat, 0.9)) if flat.numel() else 0.0


def _continuous_observed(site: dict) -> bool:
    if site["type"] != "sample" or not site["is_observed"]:
        return False
    value = site["value"]
    return (isinstance(value, torch.Tensor)
            and value.is_floating_point() and not getattr(site["fn"].support, "is_discrete", False))


def scale_mismatches(model: Callable, args: tuple, kwargs: dict,
                     trace: pyro.poutine.Trace | None = None) -> list[tuple[str, float, float]]:
    """``(site, data scale, model scale)`` for each observed continuous site whose data scale exceeds
    ``SCALE_RATIO * max(model scale, 1)``; the model scale is that of one draw of the site's distribution
    after one draw of every latent from its prior (``trace``: a trace of the model, made here if None)."""
    with pyro.get_param_store().scope(), torch.no_grad(), torch.random.fork_rng():
        torch.manual_seed(0)
        trace = run_traced(model, args, kwargs) if trace is None else trace
        fixed = getattr(model, "fixed_sites", frozenset())  # given by ppl.condition: not data
        out = []
        for name, site in trace.nodes.items():
            if name in fixed or not _continuous_observed(site):
                continue
            data = magnitude(site["value"])
            if data <= SCALE_RATIO:  # cheap exit: O(1)..1e4 data never warn
                continue
            predicted = magnitude(site["fn"].sample())
            if data > SCALE_RATIO * max(predicted, 1.0):
                out.append((name, data, predicted))
    return out


def warn_on_data_scale(model: Callable, args: tuple, kwargs: dict, trace: pyro.poutine.Trace | None = None) -> None:
    """Warn ``DataScaleWarning`` for each site of ``scale_mismatches``, saying how to fix it."""
    for name, data, predicted in scale_mismatches(model, args, kwargs, trace):
        warnings.warn(
            f"model '{model_name(model)}', site '{name}': the observed data have scale {data:.3g} (90th percentile "
            f"of |value|) but the model predicts values of scale {predicted:.3g} there under its priors; the fit "
            f"starts at O(1) values and may stop far from the truth. Standardize the data (e.g. "
            f"(y - y.mean()) / y.std()) or give priors of the data's scale", DataScaleWarning, stacklevel=4)
