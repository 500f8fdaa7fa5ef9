"""What ``ppl.infer`` checks before it fits anything, so that a bad input fails in a second with an error that
names it, not after a whole fit or deep inside a backend.

- options: ``model`` (a callable), ``num_steps`` / ``num_samples`` (integers >= 1), ``seed`` (an integer),
  ``device`` (one torch knows, that holds values and is available), ``model_kwargs`` (a dict); the backend
  options several backends share: ``lr`` (a number > 0), ``natgrad_step`` (in (0, 1]), ``num_iters`` (an
  integer >= 1), ``recognition`` (a dict site -> ``torch.nn.Module``), ``init`` (a dict);
- values given by ``ppl.condition`` (and ``ppl.log_joint``'s values): each names a sample site of the model and
  has a shape, dtype and support its distribution takes (checked as the model runs, site by site);
- the plan: ``init=`` naming no latent site; an enumerated site in a plate of size 1 (Pyro's exact marginals
  cannot contract it);
- one trace of the model: ``init=`` values of the site's shape and in its support, networks whose dtype differs
  from the data's (they cannot be promoted), and data far larger than the model's prior scale
  (``ppl.data_scale``, a warning).
"""
from __future__ import annotations

import math
from typing import Any, Callable

import pyro
import pyro.poutine as poutine
import torch
from pyro.poutine.messenger import Messenger
from pyro.poutine.util import site_is_subsample

from .data_scale import warn_on_data_scale
from .primitives import ModelInputError, model_name
from .trace import _check_observed_value, _family, run_traced


def check_count(name: str, value: Any, caller: str = "ppl.infer") -> None:
    """ValueError unless ``value`` is None or an integer >= 1 (bools refused)."""
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{caller}: {name} must be an integer >= 1, got {value!r}")


def check_model(model: Any, caller: str = "ppl.infer") -> None:
    """TypeError unless ``model`` is callable (a model function)."""
    if not callable(model):
        raise TypeError(f"{caller}: model must be a model function (a callable, e.g. one decorated with @ppl.model), "
                        f"got {type(model).__name__}")


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


def _number(value: Any) -> bool:
    """A real, finite Python or 0-dim tensor number (bools refused)."""
    if isinstance(value, torch.Tensor) and value.dim() == 0 and not value.is_complex():
        value = value.item()
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_backend_options(options: dict) -> None:
    """ValueError / TypeError naming a bad value of an option several backends share, before anything runs:
    ``lr`` > 0; ``natgrad_step`` in (0, 1] (a convex step from the conjugate q toward its optimum: above 1 it
    overshoots, at 0 it never moves); ``num_iters`` an integer >= 1; ``recognition`` a dict site -> nn.Module;
    ``init`` a dict site -> value."""
    if "lr" in options and not (_number(options["lr"]) and float(options["lr"]) > 0):
        raise ValueError(f"ppl.infer: lr (the learning rate) must be a finite number > 0, got {options['lr']!r}")
    step = options.get("natgrad_step", 0.5)
    if not (_number(step) and 0 < float(step) <= 1):
        raise ValueError(f"ppl.infer: natgrad_step must be a number in (0, 1] (the natural-gradient step of the "
                         f"conjugate globals' q toward its optimum), got {step!r}")
    if "num_iters" in options:
        iters = options["num_iters"]
        if isinstance(iters, bool) or not isinstance(iters, int) or iters < 1:
            raise ValueError(f"ppl.infer: num_iters (mean-field iterations) must be an integer >= 1, got {iters!r}")
    recognition = options.get("recognition")
    if recognition is not None:
        if not isinstance(recognition, dict):
            raise TypeError(f"ppl.infer: recognition= must be a dict site -> torch.nn.Module, "
                            f"got {type(recognition).__name__}")
        for site, net in recognition.items():
            if not isinstance(net, torch.nn.Module):
                raise TypeError(f"ppl.infer: recognition['{site}'] must be a torch.nn.Module (a network emitting the "
                                f"site's potentials), got {type(net).__name__}")
    init = options.get("init")
    if init is not None and not isinstance(init, dict):
        raise TypeError(f"ppl.infer: init= must be a dict site -> initial value, got {type(init).__name__}")


def check_init_values(init: Any, trace: pyro.poutine.Trace) -> None:
    """ValueError / TypeError naming ``init[site]`` when it is not a tensor of the site's shape, or lies outside its
    distribution's support (it would fail inside the backend, or start it where the density is 0)."""
    if not isinstance(init, dict):
        return
    for name, value in init.items():
        site = trace.nodes.get(name)
        if site is None or site["type"] != "sample":
            continue  # check_plan names unknown sites
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"ppl.infer: init['{name}'] must be a torch.Tensor, got {type(value).__name__}")
        fn = site["fn"]
        shape = tuple(fn.batch_shape + fn.event_shape)
        if tuple(value.shape) != shape:
            raise ValueError(f"ppl.infer: init['{name}'] has shape {tuple(value.shape)}, but site '{name}' "
                             f"({_family(fn)}) takes values of shape {shape}")
        try:
            ok = fn.support.check(value.to(site["value"].dtype))
        except (RuntimeError, ValueError, TypeError, NotImplementedError):  # a support that cannot check a value
            continue
        if isinstance(ok, torch.Tensor) and not bool(ok.all()):
            where = f" ({int((~ok).sum())} of {ok.numel()} entries)" if ok.numel() > 1 else ""
            raise ValueError(f"ppl.infer: init['{name}'] lies outside the support {fn.support} of site '{name}' "
                             f"({_family(fn)}){where}")


def _shape_fits(value_shape: tuple, batch_shape: tuple, event_shape: tuple) -> bool:
    """Whether a value of ``value_shape`` is one a distribution of these shapes scores without growing: the
    event dims equal, the batch dims broadcastable to the distribution's (as Pyro validates a sample)."""
    expected = batch_shape + event_shape
    if len(value_shape) > len(expected) or value_shape[len(value_shape) - len(event_shape):] != event_shape:
        return False
    return all(a == b or a == 1 or b == 1 for a, b in zip(reversed(value_shape), reversed(expected)))


class GivenValues(Messenger):
    """While the model runs: checks each value given for a site (``values``: site -> tensor, set by
    ``ppl.condition`` or ``ppl.log_joint``) as its site completes (its shape against the distribution's batch and
    event shapes, then dtype and support), so the error names that site before the value is used further; records
    the sites seen (``unknown()``: the given names the model never sampled)."""

    def __init__(self, values: dict, what: str):
        super().__init__()
        self.values, self.what, self.seen = values, what, set()

    def _postprocess_message(self, msg):
        name = msg["name"]
        if msg["type"] != "sample" or name not in self.values:
            return
        self.seen.add(name)  # a plate's name too: ppl.simulate returns its indices with the draws
        if site_is_subsample(msg):
            return
        fn, value = msg["fn"], msg["value"]
        if isinstance(value, torch.Tensor) and not _shape_fits(tuple(value.shape), tuple(fn.batch_shape),
                                                               tuple(fn.event_shape)):
            raise ModelInputError(f"site '{name}': {self.what} has shape {tuple(value.shape)}, but its distribution "
                                  f"{_family(fn)} has batch shape {tuple(fn.batch_shape)} (plates included) and "
                                  f"event shape {tuple(fn.event_shape)}")
        if isinstance(value, torch.Tensor):
            _check_observed_value(msg, self.what)

    def unknown(self) -> list[str]:
        return [n for n in self.values if n not in self.seen]


def check_conditioned(model: Callable, args: tuple, kwargs: dict) -> None:
    """For a model with sites fixed by ``ppl.condition``: ModelInputError naming a fixed value whose shape, dtype or
    support its site does not take (Pyro failed later, in the compiler, with "Value is not broadcastable" naming no
    site), or a name that is no sample site of the model (a typo that was silently ignored). One run of the model
    (prior draws, no parameters left behind, the RNG state kept); an error of the model itself is left to the
    compiler, which reports it with its line."""
    values = getattr(model, "fixed_values", None)
    if not values:
        return
    checker = GivenValues(values, "the value given by ppl.condition")
    with torch.random.fork_rng(), pyro.get_param_store().scope(), torch.no_grad():
        try:
            with checker:
                trace = poutine.trace(model).get_trace(*args, **kwargs)
        except ModelInputError:
            raise
        except Exception:  # noqa: BLE001 - the model's own error: the compiler's trace reports it with context
            return
    unknown = checker.unknown()
    if unknown:
        raise ModelInputError(f"ppl.condition names site(s) {unknown} that model '{model_name(model)}' does not "
                              f"sample; its sample sites are {sample_sites(trace)}")


def sample_sites(trace: pyro.poutine.Trace) -> list[str]:
    """The names of a trace's sample sites, in order (plates' own subsample sites left out)."""
    return [n for n, s in trace.nodes.items() if s["type"] == "sample" and not site_is_subsample(s)]


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
        check_init_values(options.get("init"), trace)
        check_network_dtypes(model, trace, options)
        warn_on_data_scale(model, args, kwargs, trace)
