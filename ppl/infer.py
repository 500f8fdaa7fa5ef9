"""``ppl.infer``: compile a model, run the chosen (or requested) backend, return a Posterior."""
from __future__ import annotations

import contextlib
import inspect
from typing import Callable

import torch

import pyro

from .backends import get_backend
from .compiler import compile as compile_model
from .posterior import Posterior
from .primitives import copy_modules
from .validate import check_device, check_options, check_plan, check_traced


def _to_device(value, device):
    return value.to(device) if isinstance(value, torch.Tensor) else value


def _backend_options(backend, options: dict) -> dict:
    """Keep the options the backend's ``run`` accepts; reject the rest by name."""
    accepted = inspect.signature(backend.run).parameters
    unknown = [k for k in options if k not in accepted]
    if unknown:
        names = [p for p in accepted if p not in ("model", "args", "kwargs", "plan", "unused")]
        raise TypeError(f"backend '{backend.name}' does not take option(s) {', '.join(unknown)}; "
                        f"it takes: {', '.join(names)}")
    return options


@contextlib.contextmanager
def isolated(seed: int):
    """Seeded RNG and a fresh Pyro parameter store; both restored on exit (no global leakage)."""
    with torch.random.fork_rng(), pyro.get_param_store().scope():
        torch.manual_seed(seed)
        yield


def infer(model: Callable, *args, backend: str = "auto", num_steps: int | None = None,
          num_samples: int | None = None, device: str | torch.device | None = None, seed: int = 0,
          progress: bool = True, model_kwargs: dict | None = None, **options) -> Posterior:
    """Fit ``model(*args, **model_kwargs)`` and return its Posterior.

    Args:
        model: a model function.
        *args: the data (tensors are moved to ``device``).
        backend: "auto" (the compiler's rules decide) or a backend name ("exact", "svae", "svi", "mcmc").
        num_steps: optimization steps (svi, exact); num_samples: posterior draws (all backends).
        device: e.g. "cuda"; tensors the model creates without a device land there too.
        seed: random seed (the global RNG state is restored afterwards).
        progress: show a progress bar.
        model_kwargs: keyword arguments of the model.
        **options: backend-specific options (e.g. ``lr``, ``guide``, ``num_chains``, ``warmup_steps``).

    Networks (``torch.nn.Module``) in ``args``, ``model_kwargs`` and the options are fitted as deep copies:
    the caller's modules are left untouched; the trained ones are in ``post.args``, ``post.kwargs`` (and the
    recognition networks in ``post.networks``).
    """
    check_options(num_steps, num_samples, seed, model_kwargs)
    device = check_device(device)
    memo: dict = {}  # networks are fitted as copies: the caller's modules stay untouched (trained: post.kwargs)
    args, model_kwargs = copy_modules(args, memo), copy_modules(dict(model_kwargs or {}), memo)
    options = copy_modules(options, memo)
    args = tuple(_to_device(a, device) for a in args) if device else args
    model_kwargs = {k: _to_device(v, device) for k, v in model_kwargs.items()} if device else model_kwargs
    with (torch.device(device) if device else contextlib.nullcontext()):
        plan = compile_model(model, *args, backend=backend, **model_kwargs)
        check_plan(plan, options)
        check_traced(model, args, model_kwargs, options)
        runner = get_backend(plan.backend)
        if num_steps is not None:
            options["num_steps"] = num_steps
        if num_samples is not None:
            options["num_samples"] = num_samples
        if "seed" in inspect.signature(runner.run).parameters:
            options.setdefault("seed", seed)
        options = _backend_options(runner, dict(options, progress=progress))
        with isolated(seed):
            return runner.run(model, args, model_kwargs, plan.with_options(**options), **options)
