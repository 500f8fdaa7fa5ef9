"""Run a model once under an interpreter and record its sites (the compiler's first pass).

Each sample site becomes a ``SiteInfo``: distribution family, support, discrete support
size, batch/event shape, plates, observed or latent, block kind, and whether its
distribution depends on the parameters of a registered ``nn.Module`` (neural).
Dependencies between sites come from Pyro's provenance tracking.
"""
from __future__ import annotations

import traceback
from dataclasses import dataclass
from typing import Any, Callable

import pyro
import pyro.poutine as poutine
import torch
from pyro.infer.inspect import get_dependencies
from pyro.poutine.util import site_is_subsample

from .blocks import block_kind
from .primitives import ModelInputError, model_name


class ModelTraceError(RuntimeError):
    """The model function raised while graphppl was tracing it."""


@dataclass(frozen=True)
class SiteInfo:
    """What the compiler knows about one sample site.

    value_shape = batch_shape + event_shape (plates included).
    """

    name: str
    family: str
    support: str
    discrete_size: int | None        # number of values for finite discrete support, else None
    is_discrete: bool
    batch_shape: tuple[int, ...]
    event_shape: tuple[int, ...]
    plates: tuple[tuple[str, int], ...]
    observed: bool
    block: str | None                # "markov_chain", "gaussian_chain" or None
    neural: bool                     # distribution depends on nn.Module parameters

    @property
    def value_shape(self) -> tuple[int, ...]:
        return self.batch_shape + self.event_shape


def _where(exc: BaseException, fn: Callable) -> str:
    """'file:line in function' of the innermost frame in the model's own file, else the innermost frame."""
    frames = traceback.extract_tb(exc.__traceback__)
    code = getattr(getattr(fn, "fn", fn), "__code__", None)
    own = [f for f in frames if code is not None and f.filename == code.co_filename]
    frame = (own or frames or [None])[-1]
    return "unknown location" if frame is None else f"{frame.filename}:{frame.lineno} in {frame.name}: `{frame.line}`"


class _LastSite(pyro.poutine.messenger.Messenger):
    """Remembers the name of the last site the model reached."""

    def __init__(self):
        super().__init__()
        self.name: str | None = None

    def _process_message(self, msg):
        self.name = msg["name"]


def run_traced(model: Callable, args: tuple, kwargs: dict, seed: int = 0) -> poutine.Trace:
    """Run ``model(*args, **kwargs)`` once (seeded, prior draws for latents) and return its trace.

    Errors raised by the model are re-raised saying it happened while tracing, after which
    site, and at which line of the model.
    """
    last = _LastSite()
    try:
        with torch.random.fork_rng(), last:
            torch.manual_seed(seed)
            return poutine.trace(model).get_trace(*args, **kwargs)
    except Exception as exc:  # noqa: BLE001 - re-raised with context
        after = f"after site '{last.name}'" if last.name else "before its first site"
        prefix = f"while tracing model '{model_name(model)}' ({after}; at {_where(exc, model)}): "
        cls = ModelInputError if isinstance(exc, ModelInputError) else ModelTraceError
        raise cls(prefix + f"{type(exc).__name__}: {exc}") from exc


def _module_param_ids(trace: poutine.Trace) -> set[int]:
    """ids of the tensors of ``ppl.module``-registered parameters seen in the trace."""
    return {id(site["value"]) for name, site in trace.nodes.items()
            if site["type"] == "param" and "$$$" in name}


def _leaf_ids(tensors: list[torch.Tensor], limit: int = 20000) -> set[int]:
    """ids of the autograd leaves reachable from ``tensors`` (bounded graph walk)."""
    seen, leaves, stack = set(), set(), []
    for t in tensors:
        if t.grad_fn is not None:
            stack.append(t.grad_fn)
        elif t.requires_grad:
            leaves.add(id(t))
    while stack and len(seen) < limit:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        if hasattr(node, "variable"):
            leaves.add(id(node.variable))
        stack.extend(n for n, _ in node.next_functions if n is not None)
    return leaves


def _dist_tensors(fn: Any) -> list[torch.Tensor]:
    """Every tensor attribute of a distribution, unwrapping Independent/Masked/etc."""
    out, seen = [], set()
    while fn is not None and id(fn) not in seen:
        seen.add(id(fn))
        out.extend(v for v in vars(fn).values() if isinstance(v, torch.Tensor))
        fn = getattr(fn, "base_dist", None)
    return out


def _discrete_size(fn: Any) -> int | None:
    """Number of support values of a finite discrete distribution, else None."""
    if not getattr(fn.support, "is_discrete", False):
        return None
    if getattr(fn, "has_enumerate_support", False):
        try:
            return int(fn.enumerate_support(expand=False).shape[0])
        except NotImplementedError:
            return None
    num_states = getattr(fn, "num_states", None)
    return int(num_states) if num_states is not None else None


def site_infos(trace: poutine.Trace) -> list[SiteInfo]:
    """A ``SiteInfo`` for each sample site of ``trace``, in execution order."""
    neural_ids = _module_param_ids(trace)
    infos = []
    for name, site in trace.nodes.items():
        if site["type"] != "sample" or site["infer"].get("_deterministic") or site_is_subsample(site):
            continue
        fn = site["fn"]
        neural = bool(neural_ids) and bool(_leaf_ids(_dist_tensors(fn)) & neural_ids)
        plates = tuple((f.name, int(f.size)) for f in site["cond_indep_stack"] if f.vectorized)
        infos.append(SiteInfo(
            name=name, family=type(fn).__name__, support=str(fn.support),
            discrete_size=_discrete_size(fn), is_discrete=bool(getattr(fn.support, "is_discrete", False)),
            batch_shape=tuple(fn.batch_shape), event_shape=tuple(fn.event_shape), plates=plates,
            observed=bool(site["is_observed"]), block=block_kind(site), neural=neural))
    return infos


def site_dependencies(model: Callable, args: tuple, kwargs: dict) -> dict[str, set[str]]:
    """child site -> set of parent sites, from Pyro's provenance tracking."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        deps = get_dependencies(model, args, kwargs)["prior_dependencies"]
    return {child: {p for p in parents if p != child} for child, parents in deps.items()}
