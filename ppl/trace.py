"""Run a model once under an interpreter and record its sites (the compiler's first pass).

Each sample site becomes a ``SiteInfo``: distribution family, support, discrete support
size, batch/event shape, plates, observed or latent, block kind, and whether its
distribution depends on the parameters of a registered ``nn.Module`` (neural).
Dependencies between sites come from Pyro's provenance tracking.
"""
from __future__ import annotations

import inspect
import re
import traceback
from dataclasses import dataclass
from typing import Any, Callable

import pyro
import pyro.poutine as poutine
import torch
from pyro.infer.inspect import get_dependencies
from pyro.poutine.util import site_is_subsample

from .blocks import block_kind
from .implicit import Implicit, ImplicitDependencies
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
    density: str = "normalized"      # "normalized", "unnormalized" (energy-based: log_prob is -energy), "none"
                                     # (a simulator, ppl.Implicit: no log_prob)

    @property
    def value_shape(self) -> tuple[int, ...]:
        return self.batch_shape + self.event_shape


def _model_code(fn: Callable):
    """The code object of the user's function under ``ppl.model`` / ``ppl.condition`` / Pyro handler wrappers."""
    for _ in range(20):
        code = getattr(fn, "__code__", None)
        if code is not None:
            return code
        inner = getattr(fn, "fn", None) or getattr(fn, "__wrapped__", None) or getattr(fn, "func", None)
        if inner is None and getattr(fn, "args", None):  # a functools.partial(_context_wrap, messenger, fn)
            inner = fn.args[-1]
        if inner is None or inner is fn:
            return None
        fn = inner
    return None


def _where(exc: BaseException, fn: Callable) -> str:
    """'file:line in function' of the innermost frame in the model's own file, else the innermost frame."""
    frames = traceback.extract_tb(exc.__traceback__)
    code = _model_code(fn)
    own = [f for f in frames if code is not None and f.filename == code.co_filename]
    frame = (own or frames or [None])[-1]
    return "unknown location" if frame is None else f"{frame.filename}:{frame.lineno} in {frame.name}: `{frame.line}`"


class _SiteWatch(pyro.poutine.messenger.Messenger):
    """While tracing: remembers the last sample or param site the model completed (not Pyro's internal
    ``_pyro_inspect`` messages nor a plate's subsample site), the floating dtypes seen at sites and
    module parameters, and checks each observed value (data, or a value given by ``ppl.condition``):
    a continuous site refuses integer data, and a value must lie in its distribution's support."""

    def __init__(self, fixed: frozenset):
        super().__init__()
        self.name: str | None = None
        self.fixed = fixed
        self.dtypes: dict[torch.dtype, str] = {}  # dtype -> the first site (or module) seen with it

    def _postprocess_message(self, msg):
        if msg["type"] not in ("sample", "param") or msg["name"].startswith("_") or site_is_subsample(msg):
            return
        value = msg["value"]
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            where = (f"ppl.module '{msg['name'].split('$$$')[0]}'" if "$$$" in msg["name"]
                     else f"site '{msg['name']}'")
            self.dtypes.setdefault(value.dtype, where)
        if msg["type"] == "sample" and msg["is_observed"] and isinstance(value, torch.Tensor):
            _check_observed_value(msg, "the value given by ppl.condition" if msg["name"] in self.fixed
                                  else "the observed data")
        self.name = msg["name"]  # a completed site


def _check_observed_value(msg: dict, what: str) -> None:
    """ModelInputError naming the site if ``msg``'s observed value has an integer dtype at a continuous site
    or lies outside its distribution's support (masked sites: only the dtype is checked)."""
    fn, value, name = msg["fn"], msg["value"], msg["name"]
    support = getattr(fn, "support", None)
    discrete = bool(getattr(support, "is_discrete", False))
    numeric = value.is_floating_point() or value.is_complex()
    if not discrete and not numeric and not msg["infer"].get("_deterministic"):
        raise ModelInputError(f"site '{name}': {what} must be floating-point for the continuous {_family(fn)} "
                              f"(support {support}), got dtype {value.dtype}; convert with .float() or .double()")
    if support is None or msg.get("mask") is not None or _has_mask(fn):
        return
    base = fn
    while type(base).__name__ == "Independent":  # check entry by entry, not per event
        base = base.base_dist
    support = getattr(base, "support", support)
    try:
        ok = support.check(value)
    except (RuntimeError, ValueError, TypeError, NotImplementedError):  # a support that cannot check this value
        return
    if isinstance(ok, torch.Tensor) and not bool(ok.all()):
        bad = (~ok).nonzero()[0].tolist() if ok.dim() else []
        raise ModelInputError(f"site '{name}': {int((~ok).sum())} of {ok.numel()} entries of {what} lie outside the "
                              f"support {support} of {_family(fn)} (first at index {tuple(bad)})")


def _family(fn) -> str:
    """The distribution's family, under any ``Independent`` (``.to_event``) wrappers."""
    while type(fn).__name__ == "Independent":
        fn = fn.base_dist
    return type(fn).__name__


def _has_mask(fn) -> bool:
    """Whether a MaskedDistribution hides inside ``fn`` (masked entries hold placeholders)."""
    while fn is not None:
        if type(fn).__name__ == "MaskedDistribution":
            return True
        fn = getattr(fn, "base_dist", None)
    return False


_DTYPE_ERROR = re.compile(r"dtype|Double|Float|Half|BFloat|float != double|double != float")
_SAMPLE_CALL = re.compile(r"""sample\(\s*(?:f?["'])([^"']+)["']""")


def _data_dtypes(model: Callable, args: tuple, kwargs: dict) -> dict[torch.dtype, str]:
    """floating dtype -> the first model argument (by name) holding a tensor of it."""
    try:
        bound = inspect.signature(getattr(model, "fn", model)).bind(*args, **kwargs).arguments
    except (TypeError, ValueError):
        bound = {**{f"argument {i}": a for i, a in enumerate(args)}, **kwargs}
    out: dict[torch.dtype, str] = {}
    for name, value in bound.items():
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            out.setdefault(value.dtype, f"data '{name}'")
        elif isinstance(value, torch.nn.Module):
            for p in value.parameters():
                out.setdefault(p.dtype, f"network '{name}'")
    return out


def _explain(exc: Exception, model: Callable, args: tuple, kwargs: dict, watch: _SiteWatch, where: str) -> str:
    """The message for an error raised while tracing: the original one, after naming the dtypes when two floating
    dtypes met (that is what a 'mat1 and mat2 must have the same dtype' error means) and the site whose
    distribution refused its parameters (read off the failing ``sample("name", ...)`` line)."""
    text = f"{type(exc).__name__}: {exc}"
    if isinstance(exc, (RuntimeError, ValueError, TypeError)) and _DTYPE_ERROR.search(str(exc)):
        seen = {**_data_dtypes(model, args, kwargs), **watch.dtypes}
        if len(seen) > 1:
            spelled = ", ".join(f"{who} is {dtype}" for dtype, who in seen.items())
            return (f"mixed floating-point dtypes: {spelled}; give the data, the priors' tensors and the networks one "
                    f"dtype (e.g. y.float() / net.float(), or .double() throughout). {text}")
    match = _SAMPLE_CALL.search(where)
    if isinstance(exc, ValueError) and str(exc).startswith("Expected parameter") and match:
        return f"site '{match.group(1)}': its distribution refused a parameter: {text}"
    return text


def run_traced(model: Callable, args: tuple, kwargs: dict, seed: int = 0) -> poutine.Trace:
    """Run ``model(*args, **kwargs)`` once (seeded, prior draws for latents) and return its trace.

    Observed values are checked at their sites (``_SiteWatch``). Errors raised by the model are re-raised
    saying it happened while tracing, after which site, and at which line of the model (``_explain``).
    """
    watch = _SiteWatch(getattr(model, "fixed_sites", frozenset()))
    try:
        with torch.random.fork_rng(), watch:
            torch.manual_seed(seed)
            return poutine.trace(model).get_trace(*args, **kwargs)
    except Exception as exc:  # noqa: BLE001 - re-raised with context
        after = f"after site '{watch.name}'" if watch.name else "before its first site"
        where = _where(exc, model)
        text = _explain(exc, model, args, kwargs, watch, where)
        prefix = f"while tracing model '{model_name(model)}' ({after}; at {where}): "
        named = text.startswith("mixed floating-point dtypes") or text.startswith("site '")
        cls = ModelInputError if isinstance(exc, ModelInputError) or named else ModelTraceError
        raise cls(prefix + text) from exc


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


def _density(fn: Any) -> str:
    """What ``fn.log_prob`` is: "none" for a simulator (``Implicit``), "unnormalized" for an energy-based
    distribution (``normalized = False``), else "normalized"."""
    if isinstance(fn, Implicit):
        return "none"
    return "normalized" if getattr(fn, "normalized", True) else "unnormalized"


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
            observed=bool(site["is_observed"]), block=block_kind(site), neural=neural, density=_density(fn)))
    return infos


def site_dependencies(model: Callable, args: tuple, kwargs: dict) -> dict[str, set[str]]:
    """child site -> set of parent sites, from Pyro's provenance tracking."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        # an Implicit (simulator) site has no log_prob: it depends on its simulator's inputs
        deps = get_dependencies(ImplicitDependencies()(model), args, kwargs)["prior_dependencies"]
    return {child: {p for p in parents if p != child} for child, parents in deps.items()}
