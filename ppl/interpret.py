"""Two interpreters of a model besides inference: *simulate* (ancestral sampling of every
site, observed ones included) and *score* (the log joint of given values, with the latents that
have no value summed out exactly where the model's structure allows)."""
from __future__ import annotations

import warnings
from typing import Callable

import pyro
import pyro.poutine as poutine
import torch
from pyro.poutine.util import site_is_subsample

from .backends import UnsupportedModelError, get_backend
from .compiler import compile as compile_model
from .primitives import Model, ModelInputError, model_name, without_data
from .validate import GivenValues, check_count, check_model, sample_sites

SUMMED_OUT = ("finite discrete latents (Categorical, Bernoulli, ...), markov_chains whose children use their "
              "value elementwise, and gaussian_chains with linear-Gaussian children")
"""What ``log_joint`` sums out when no value is given (what the exact backend marginalizes)."""


def simulate(model: Callable, *args, num_samples: int = 1, seed: int = 0, **kwargs) -> dict[str, torch.Tensor]:
    """Draw ``num_samples`` joint samples of every site from the prior, observed sites resampled (sites fixed
    by ``ppl.condition`` keep their values).

    Returns site -> ``(num_samples, *value_shape)``. The global RNG state is left unchanged.
    """
    check_model(model, "ppl.simulate")
    check_count("num_samples", num_samples, "ppl.simulate")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"ppl.simulate: seed must be an integer, got {seed!r}")
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
    r"""log p(values, data) of ``model(*args, **kwargs)``: a 0-dim tensor.

    With a value for every latent sample site, the sum of every site's log-density at its value (differentiable,
    in the model's dtype). Latent sites left out of ``values`` are summed out exactly,

    .. math:: \log p(v, y) = \log \sum_z p(v, z, y)\quad\text{(an integral for a gaussian_chain)},

    when they are finite discrete latents (enumerated), ``markov_chain``\ s whose children use their value
    elementwise (forward algorithm) or ``gaussian_chain``\ s with linear-Gaussian children (Kalman filter): the
    exact backend's kernels compute it, as its ``log_evidence``. That result is a float64 tensor on the data's
    device, detached (no gradient). Any other latent left out (a continuous latent outside a chain, a switching
    chain, a chain with a nonlinear child) raises ``ModelInputError`` naming it; so does a model with learnable
    ``ppl.param`` / ``ppl.module`` parameters when something must be summed out. A value is checked at its site
    as the model runs (its shape, dtype and support); a name that is no sample site of the model is an error. The
    global RNG state is left unchanged.
    """
    check_model(model, "ppl.log_joint")
    if not isinstance(values, dict):
        raise TypeError(f"ppl.log_joint: values must be a dict site -> value, got {type(values).__name__}")
    checker = GivenValues(values, "the value given to log_joint")
    with torch.random.fork_rng():
        with checker:
            trace = poutine.trace(poutine.condition(model, data=values)).get_trace(*args, **kwargs)
        if checker.unknown():
            raise ModelInputError(f"log_joint of model '{model_name(model)}': values name site(s) {checker.unknown()} "
                                  f"that the model does not sample; its sample sites are {sample_sites(trace)}")
        missing = [n for n, s in trace.nodes.items()
                   if s["type"] == "sample" and not s["is_observed"] and not site_is_subsample(s)]  # plates: no value
        if not missing:
            return trace.log_prob_sum()
        params = [n for n, s in trace.nodes.items() if s["type"] == "param"]
        return _summed_out_log_joint(model, values, args, kwargs, missing, params)


def _refusal(model: Callable, missing: list[str], why: str) -> ModelInputError:
    """The error of a ``log_joint`` that cannot sum out the latents ``missing``: which, why, and what to do."""
    return ModelInputError(f"log_joint of model '{model_name(model)}': no value given for latent site(s) {missing}; "
                           f"{why}. Give their values in `values` (log_joint sums out only {SUMMED_OUT})")


def _data_device(args: tuple, kwargs: dict) -> torch.device:
    """The device of the first tensor among the data (CPU if none)."""
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor):
            return value.device
    return torch.device("cpu")


def _summed_out_log_joint(model: Callable, values: dict, args: tuple, kwargs: dict, missing: list[str],
                          params: list[str]) -> torch.Tensor:
    """log p(values, data) with the ``missing`` latents summed out by the exact backend (see ``log_joint``):
    the model with ``values`` observed has nothing left to fit, so the backend's exact ``log_evidence`` is the
    answer; refusals name the site or fact that stops it."""
    given = Model(poutine.condition(model, data=values))  # observed, not ppl.condition's fixed: in the joint
    given.name = model_name(model)
    try:
        plan = compile_model(given, *args, backend="exact", **kwargs)
    except UnsupportedModelError as exc:
        raise _refusal(model, missing, f"they cannot all be summed out exactly: {exc}") from None
    if plan.facts.continuous:
        raise _refusal(model, missing, f"the continuous latent(s) {list(plan.facts.continuous)} outside any chain "
                                       "cannot be summed out exactly")
    if params:
        raise _refusal(model, missing, f"summing them out runs the exact backend, which would fit the model's "
                                       f"learnable parameters {params} (ppl.param / ppl.module); for "
                                       "log p(data | fitted parameters) use ppl.infer(model, ..., "
                                       "backend='exact').log_evidence")
    options = {"num_samples": 1, "progress": False}
    with pyro.get_param_store().scope(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # about the posterior at `values` (e.g. an empty component): not asked for
        post = get_backend("exact").run(given, args, kwargs, plan.with_options(**options), **options)
    return torch.tensor(float(post.log_evidence), dtype=torch.float64, device=_data_device(args, kwargs))
