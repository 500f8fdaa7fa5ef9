"""Run a model once under an interpreter and record its sites (the compiler's first pass).

Each sample site becomes a ``SiteInfo``: distribution family, support, discrete support
size, batch/event shape, plates, observed or latent, block kind, and whether its
distribution depends on the parameters of a registered ``nn.Module`` (neural).
Dependencies between sites come from Pyro's provenance tracking.

Both runs give a plain latent with finite support inside plates one draw shared along its plate dims
(``CompactDiscrete``: the value has size 1 there, as Pyro's enumeration lays a value out), so that a child
indexing a global with it (an LDA's ``topics[z]``) stays (1, ..., V) instead of tokens x V: the plates broadcast
every distribution back to its full batch shape, and the site records are the same. Memory and time of a run
are then linear in the data, not in data x the indexed global's size.
"""
from __future__ import annotations

import contextlib
import copy
import inspect
import re
import traceback
from dataclasses import dataclass
from typing import Any, Callable

import pyro
import pyro.poutine as poutine
import torch
from pyro.infer.inspect import TrackProvenance, is_sample_site
from pyro.ops.provenance import detach_provenance, get_provenance
from pyro.poutine.messenger import Messenger
from pyro.poutine.util import site_is_subsample

from .blocks import block_kind
from .chain_dists import MarkovChain
from .implicit import Implicit, ImplicitDependencies
from .primitives import ModelInputError, model_name


TRUSTED_MODULES = ("torch.distributions", "pyro.distributions")
"""Distributions (and constraints) defined here compute ``log_prob`` from their tensor attributes only, and can be
rebuilt from their ``arg_constraints`` parameters."""
_PLAIN = (int, float, bool, complex, str, type(None), torch.Size, torch.dtype, torch.device)


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
        self.refused = False  # an observed value failed its check (a data error: no other run can fix it)

    def _postprocess_message(self, msg):
        if msg["type"] not in ("sample", "param") or msg["name"].startswith("_") or site_is_subsample(msg):
            return
        value = msg["value"]
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            where = (f"ppl.module '{msg['name'].split('$$$')[0]}'" if "$$$" in msg["name"]
                     else f"site '{msg['name']}'")
            self.dtypes.setdefault(value.dtype, where)
        if msg["type"] == "sample" and msg["is_observed"] and isinstance(value, torch.Tensor):
            try:
                _check_observed_value(msg, "the value given by ppl.condition" if msg["name"] in self.fixed
                                      else "the observed data")
            except ModelInputError:
                self.refused = True
                raise
        self.name = msg["name"]  # a completed site


def compact_dims(msg: dict) -> tuple[int, ...]:
    """The batch dims (negative, counted from the right of the batch shape) along which a sample site may share
    one value: every dim of size > 1 of a plain (no block) latent site with enumerable finite support when all of
    them are plate dims (Pyro's enumeration contract: within plates a model broadcasts such a value); () otherwise
    (observed, in a markov_chain/gaussian_chain block, continuous, combinatorial, or a batch dim outside plates)."""
    fn = msg["fn"]
    if (msg["is_observed"] or msg["value"] is not None or site_is_subsample(msg) or block_kind(msg) is not None
            or not getattr(fn, "has_enumerate_support", False) or not getattr(fn.support, "is_discrete", False)):
        return ()
    batch = tuple(fn.batch_shape)
    plates = {f.dim for f in msg["cond_indep_stack"] if f.vectorized and f.dim is not None}
    large = {d for d in range(-len(batch), 0) if batch[d] > 1}
    return tuple(sorted(large)) if large and large <= plates else ()


class CompactDiscrete(Messenger):
    """Give each site with ``compact_dims`` one prior draw shared along those dims: the value of its first entry
    there, of size 1 in them (a site's batch shape ``(L, D)`` with both dims plates gets a ``(1, 1)`` value). The
    plates broadcast every distribution downstream back to its full batch shape, so the sites' families, shapes,
    supports and dependencies are those of a run with one draw per entry, while ``table[z]`` costs the table's
    size, not entries x its size. ``sites`` lists the sites given such a value."""

    def __init__(self):
        super().__init__()
        self.sites: list[str] = []

    def _pyro_sample(self, msg):
        dims = compact_dims(msg)
        if not dims:
            return
        fn = msg["fn"]
        batch = tuple(fn.batch_shape)
        index = tuple(slice(0, 1) if d - len(batch) in dims else slice(None) for d in range(len(batch)))
        draw = _entry_draw(fn, index)
        if draw is None:
            draw = fn.sample()[index].clone()
        msg["value"] = draw
        msg["done"] = True
        self.sites.append(msg["name"])


def _entry_draw(fn: Any, index: tuple) -> torch.Tensor | None:
    """A draw of the entries ``index`` (slices of the batch dims) alone: ``fn`` rebuilt from its parameters cut to
    them when it is a distribution of ``TRUSTED_MODULES`` whose parameters (``arg_constraints``) all lie on its
    batch dims (an expanded ``Categorical(probs)``: one row of probabilities, not one per entry); None otherwise."""
    if not type(fn).__module__.startswith(TRUSTED_MODULES):
        return None
    params = {k: v for k, v in vars(fn).items() if k in getattr(fn, "arg_constraints", {})}
    batch = tuple(fn.batch_shape)
    if not params or any(not isinstance(v, torch.Tensor) or tuple(v.shape[:len(batch)]) != batch
                         for v in params.values()):
        return None
    try:
        sub = type(fn)(**{k: v[index] for k, v in params.items()}, validate_args=False)
        draw = sub.sample()
    except (TypeError, ValueError, RuntimeError):
        return None
    expected = tuple(1 if isinstance(i, slice) and i.stop == 1 else n for i, n in zip(index, batch))
    return draw if tuple(draw.shape) == expected + tuple(fn.event_shape) else None


def _shrunk(trace: poutine.Trace) -> str | None:
    """An observed site whose distribution has size 1 in a dim where its data have more (a shared value reached
    it through something other than plate broadcasting, e.g. ``z.reshape(-1)``), or None."""
    for name, site in trace.nodes.items():
        if site["type"] != "sample" or not site["is_observed"] or not isinstance(site["value"], torch.Tensor):
            continue
        shape = tuple(site["fn"].batch_shape + site["fn"].event_shape)
        data = tuple(site["value"].shape)
        if any(a == 1 and b > 1 for a, b in zip(shape[::-1], data[::-1])):
            return name
    return None


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

    Plain finite discrete latents in plates get one draw shared along their plate dims (``CompactDiscrete``);
    when that run fails (not on a data check) or leaves an observed site smaller than its data (``_shrunk``), the
    model runs again with one draw per entry and that trace (or error) is the answer. A latent ``markov_chain``
    path is drawn by ``MarkovChain.gumbel_max_path`` (``PlainChainDraws``: the same law, ~30x faster than the sampler's
    step-by-step ``Categorical``). Observed values are checked at their sites (``_SiteWatch``). Errors raised by
    the model are re-raised saying it happened while tracing, after which site, and at which line of the model
    (``_explain``).
    """
    compact = CompactDiscrete()
    watch = _SiteWatch(getattr(model, "fixed_sites", frozenset()))
    try:
        trace = _traced(model, args, kwargs, seed, watch, compact)
    except (ModelInputError, ModelTraceError):
        if watch.refused or not compact.sites:
            raise
        trace = None
    if trace is not None and (not compact.sites or _shrunk(trace) is None):
        return trace
    return _traced(model, args, kwargs, seed, _SiteWatch(getattr(model, "fixed_sites", frozenset())), None)


def _traced(model: Callable, args: tuple, kwargs: dict, seed: int, watch: _SiteWatch,
            compact: CompactDiscrete | None) -> poutine.Trace:
    """One seeded run of the model under ``watch`` (and ``compact`` unless None), errors explained."""
    try:
        with torch.random.fork_rng(), watch, (compact or contextlib.nullcontext()), PlainChainDraws():
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
    """child site -> set of parent sites (earlier latent sites its log-density reads), from Pyro's provenance
    tracking (``pyro.infer.inspect.TrackProvenance``, as ``get_dependencies`` reads prior dependencies) on a run
    with ``CompactDiscrete`` values (again with one draw per entry if that run fails). A site's parents are the
    provenance of its value and of its distribution's parameters (``_log_prob_provenance``)."""
    try:
        return _dependencies(model, args, kwargs, True)
    except Exception:  # noqa: BLE001 - a model that does not broadcast a shared value: one draw per entry
        return _dependencies(model, args, kwargs, False)


def _dependencies(model: Callable, args: tuple, kwargs: dict, compact: bool) -> dict[str, set[str]]:
    with torch.random.fork_rng(), torch.no_grad(), pyro.validation_enabled(False):
        torch.manual_seed(0)
        with TrackProvenance(), PlainChainDraws(), (CompactDiscrete() if compact else contextlib.nullcontext()):
            # an Implicit (simulator) site has no log_prob: it depends on its simulator's inputs
            trace = poutine.trace(ImplicitDependencies()(model)).get_trace(*args, **kwargs)
        sites = [msg for msg in trace.nodes.values() if is_sample_site(msg)]
        out = {}
        for i, site in enumerate(sites):
            upstream = {u["name"] for u in sites[:i] if not u["is_observed"] and u["value"].numel()}
            out[site["name"]] = upstream & _log_prob_provenance(site["fn"], site["value"]) if upstream else set()
    return out


class PlainChainDraws(Messenger):
    """Draw the value of a latent chain block (in ``run_traced``'s runs and, under provenance tracking, in the
    dependency run) without provenance: a ``MarkovChain`` (unwrapped, at most ``FAST_DRAW_MAX_STEPS`` steps over
    all its batch) by ``MarkovChain.gumbel_max_path``, any other chain (``gaussian_chain``, a wrapped one) by its
    own sampler on a copy of its distribution whose tensors carry no provenance (``without_provenance``). The chain
    samplers step through time in torch ops, and on a ``ProvenanceTensor`` every op also goes through Python
    (~0.3 s CPU for a 309-step chain; ~30 ms without provenance, ~1 ms by ``gumbel_max_path``). The site's
    provenance is unchanged: ``TrackProvenance`` gives a sampled value the site's own name, and a site's parents
    are read off its distribution (``_log_prob_provenance``), not off how its value was drawn; the value is a draw
    from the same prior."""

    def _pyro_sample(self, msg):
        if msg["is_observed"] or msg["value"] is not None or msg["done"] or block_kind(msg) is None:
            return
        fn = without_provenance(msg["fn"])
        fast = (type(fn) is MarkovChain and not msg["args"] and not msg["kwargs"]
                and fn.batch_shape.numel() * fn.length <= FAST_DRAW_MAX_STEPS)
        msg["value"] = fn.gumbel_max_path() if fast else fn(*msg["args"], **msg["kwargs"])  # as Pyro calls it
        msg["done"] = True


FAST_DRAW_MAX_STEPS = 100_000
"""Largest number of chain steps (batch x length) ``MarkovChain.gumbel_max_path``'s Python loop takes (~3 us a step)."""


def without_provenance(fn: Any) -> Any:
    """A shallow copy of the distribution ``fn`` whose tensor attributes, and those of the distributions among its
    attributes (``base_dist`` of ``Independent`` / masked wrappers), carry no provenance (``detach_provenance``:
    the same data); ``fn`` itself is not changed."""
    plain = copy.copy(fn)
    for key, value in vars(fn).items():
        if isinstance(value, torch.Tensor):
            plain.__dict__[key] = detach_provenance(value)
        elif isinstance(value, torch.distributions.Distribution):
            plain.__dict__[key] = without_provenance(value)
    return plain


def _log_prob_provenance(fn: Any, value: torch.Tensor) -> frozenset:
    """The sites ``fn.log_prob(value)`` depends on: the provenance of ``value`` and of every tensor among the
    attributes of ``fn`` when ``fn`` is built only of distributions from ``TRUSTED_MODULES`` (their log_prob
    reads nothing else; not evaluating it keeps an expanded ``Categorical(table[z])`` a view), else the
    provenance of ``fn.log_prob(value)`` itself."""
    tensors = _attribute_tensors(fn)
    if tensors is None:
        return get_provenance(fn.log_prob(value))
    return get_provenance([value] + tensors)


def _attribute_tensors(obj: Any, depth: int = 0) -> list | None:
    """Every tensor reachable through the attributes of a trusted distribution or constraint, and through lists,
    tuples and dicts; None when something else is reached (an object this walk cannot vouch for)."""
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, _PLAIN):
        return []
    if depth > 8:
        return None
    if isinstance(obj, (list, tuple)):
        parts = list(obj)
    elif isinstance(obj, dict):
        parts = list(obj.values())
    elif (isinstance(obj, (torch.distributions.Distribution, torch.distributions.constraints.Constraint))
          and type(obj).__module__.startswith(TRUSTED_MODULES)):
        parts = list(vars(obj).values())
    else:
        return None
    out = []
    for part in parts:
        found = _attribute_tensors(part, depth + 1)
        if found is None:
            return None
        out.extend(found)
    return out
