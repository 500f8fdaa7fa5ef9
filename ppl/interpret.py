"""Two interpreters of a model besides inference: *simulate* (ancestral sampling of every
site, observed ones included) and *score* (the log joint of given values)."""
from __future__ import annotations

from typing import Callable

import pyro.poutine as poutine
import torch

from .primitives import ModelInputError, model_name, without_data


def simulate(model: Callable, *args, num_samples: int = 1, seed: int = 0, **kwargs) -> dict[str, torch.Tensor]:
    """Draw ``num_samples`` joint samples of every site from the prior, observed sites resampled (sites fixed
    by ``ppl.condition`` keep their values).

    Returns site -> ``(num_samples, *value_shape)``. The global RNG state is left unchanged.
    """
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    free = without_data(model)
    draws: dict[str, list] = {}
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        for _ in range(num_samples):
            trace = poutine.trace(free).get_trace(*args, **kwargs)
            for name, site in trace.nodes.items():
                if site["type"] == "sample" and not site["infer"].get("is_auxiliary"):
                    draws.setdefault(name, []).append(site["value"].detach())
    return {k: torch.stack(v) for k, v in draws.items()}


def log_joint(model: Callable, values: dict[str, torch.Tensor], *args, **kwargs) -> torch.Tensor:
    """log p(values, data) of the model with its latent sites set to ``values`` (a scalar).

    Every latent sample site must be given; the error names the ones that are missing.
    """
    trace = poutine.trace(poutine.condition(model, data=values)).get_trace(*args, **kwargs)
    missing = [n for n, s in trace.nodes.items() if s["type"] == "sample" and not s["is_observed"]]
    if missing:
        raise ModelInputError(f"log_joint of model '{model_name(model)}': no value given for latent site(s) "
                              f"{missing}")
    return trace.log_prob_sum()
