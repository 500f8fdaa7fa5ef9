"""The modeling primitives: ``model``, ``sample``, ``param``, ``plate``, ``deterministic``, ``module``.

They are Pyro's primitives with graphppl's input checks added: an observed value is
checked against its distribution (finite, event shape equal, batch shape broadcastable)
and every error names the site. A model is a plain Python function; ``@ppl.model``
gives it a name and a place to hang compile-time facts, nothing more.
"""
from __future__ import annotations

import copy
import functools
import importlib
import sys
from typing import Any, Callable

import pyro
import torch
from pyro.distributions import Independent
from pyro.poutine.runtime import get_plates

plate = pyro.plate
param = pyro.param
deterministic = pyro.deterministic
factor = pyro.factor


class ModelInputError(ValueError):
    """Bad input at a model site: the message names the site, the expected and the actual value."""


class Model:
    """A model function marked for graphppl. Calling it runs the function (a Pyro model).

    ``Model`` is a thin wrapper: ``ppl.compile``/``ppl.infer`` accept plain functions too.
    """

    def __init__(self, fn: Callable[..., Any]):
        if not callable(fn):
            raise TypeError(f"ppl.model expects a function, got {type(fn).__name__}")
        self.fn = fn
        self.fixed_values: dict[str, torch.Tensor] = {}  # sites fixed by ppl.condition: not data
        self.name = getattr(fn, "__name__", "model")
        functools.update_wrapper(self, fn)

    @property
    def fixed_sites(self) -> frozenset[str]:
        """Names of the sites fixed by ``ppl.condition`` (not data: kept when the data are redrawn)."""
        return frozenset(self.fixed_values)

    def __call__(self, *args, **kwargs):
        return self.fn(*args, **kwargs)

    def __repr__(self) -> str:
        return f"ppl.model({self.name})"

    def __reduce__(self):
        """Pickle a module-level model by reference (the module attribute is this object, not ``fn``),
        any other (e.g. ``ppl.condition(...)``) by its function and fields."""
        module, qualname = getattr(self.fn, "__module__", None), getattr(self.fn, "__qualname__", "")
        if _lookup(module, qualname) is self:
            return _lookup, (module, qualname)
        return _restore_model, (self.fn, self.fixed_values, self.name)


def _lookup(module: str | None, qualname: str) -> Any:
    """The object ``module.qualname`` if the module is loaded (imported when pickled), else None."""
    obj = sys.modules.get(module or "")
    if obj is None and module and "<locals>" not in qualname:
        obj = importlib.import_module(module)
    for part in qualname.split("."):
        obj = getattr(obj, part, None)
    return obj


def _restore_model(fn: Callable[..., Any], fixed_values: dict, name: str) -> Model:
    restored = Model(fn)
    restored.fixed_values, restored.name = dict(fixed_values), name
    return restored


def model(fn: Callable[..., Any]) -> Model:
    """Decorator marking ``fn(*data, **options)`` as a graphppl model."""
    return fn if isinstance(fn, Model) else Model(fn)


def model_name(fn: Callable[..., Any]) -> str:
    """The user-facing name of a model function."""
    return getattr(fn, "name", None) or getattr(fn, "__name__", "model")


def _check_observed(name: str, fn, obs: torch.Tensor, mask, trailing: int) -> None:
    """Raise ModelInputError if ``obs`` is not a finite value of the right shape for ``fn``.

    Entries where ``mask`` is False (missing data) may be NaN; all others must be finite (``mask`` is aligned
    with ``obs`` but for its last ``trailing`` dims). The event shape of ``obs`` must equal ``fn.event_shape``;
    its batch shape must broadcast with ``fn.batch_shape``.
    """
    event_shape = tuple(fn.event_shape)
    shape = tuple(obs.shape)
    if len(shape) < len(event_shape) or shape[len(shape) - len(event_shape):] != event_shape:
        raise ModelInputError(
            f"site '{name}': observed value has shape {shape} but the distribution "
            f"{type(fn).__name__} has event shape {event_shape} (batch shape {tuple(fn.batch_shape)}); "
            f"the trailing dims of the data must equal the event shape")
    batch = shape[: len(shape) - len(event_shape)]
    expected = _plated_batch_shape(fn)
    if broadcast_or_none(batch, expected) is None:
        raise ModelInputError(
            f"site '{name}': observed value has batch shape {batch} (full shape {shape}) which does not "
            f"match the batch shape {expected} of its distribution inside its plates")
    if obs.is_floating_point() or obs.is_complex():
        bad = ~torch.isfinite(obs)
        if isinstance(mask, torch.Tensor):
            bad = bad & _expand_mask(mask, obs, trailing)
        elif mask is False:
            return
        if bool(bad.any()):
            first = tuple(int(i) for i in bad.nonzero()[0])
            raise ModelInputError(
                f"site '{name}': observed data contains {int(bad.sum())} NaN/inf value(s) "
                f"(first at index {first}); pass mask=... marking missing entries False, or clean the data")


def broadcast_or_none(a: tuple, b: tuple) -> tuple | None:
    """The broadcast of the shapes ``a`` and ``b`` (NumPy's rules), or None when they do not broadcast. Plain
    Python: ``torch.broadcast_shapes`` imports sympy on its first call (about a second, once per process)."""
    n = max(len(a), len(b))
    a, b = (1,) * (n - len(a)) + tuple(a), (1,) * (n - len(b)) + tuple(b)
    if any(x != y and 1 not in (x, y) for x, y in zip(a, b)):
        return None
    return tuple(y if x == 1 else x for x, y in zip(a, b))


def _plated_batch_shape(fn) -> tuple[int, ...]:
    """The distribution's batch shape broadcast with the sizes of the enclosing plates."""
    frames = [f for f in get_plates() if f.dim is not None]
    if not frames:
        return tuple(fn.batch_shape)
    shape = [1] * max(-f.dim for f in frames)
    for f in frames:
        shape[f.dim] = f.size
    broadcast = broadcast_or_none(tuple(fn.batch_shape), tuple(shape))
    return tuple(fn.batch_shape) if broadcast is None else broadcast


def _expand_mask(mask: torch.Tensor, obs: torch.Tensor, event_dim: int) -> torch.Tensor:
    """Broadcast a mask over the last ``event_dim`` dims of ``obs`` (the dims it does not cover)."""
    mask = mask.reshape(mask.shape + (1,) * event_dim)
    return mask.expand(obs.shape) if mask.dim() <= obs.dim() else mask


def _check_mask_type(name: str, mask) -> None:
    """A mask is None, a Python bool or a bool tensor (True = observed); ModelInputError naming the site."""
    if mask is None or isinstance(mask, bool) or (isinstance(mask, torch.Tensor) and mask.dtype == torch.bool):
        return
    got = f"a tensor of dtype {mask.dtype}" if isinstance(mask, torch.Tensor) else type(mask).__name__
    raise ModelInputError(f"site '{name}': mask must be a bool tensor (True = observed) or a Python bool, got {got}")


def _fold_entry_mask(name: str, fn, obs: torch.Tensor | None, mask):
    """``(fn, site_mask, trailing)``: how a mask applies to the site.

    A mask of at most as many dims as the value's batch shape masks whole events (Pyro's ``poutine.mask``):
    returned as ``site_mask``, ``trailing`` = the number of event dims. A mask with more dims would be
    broadcast by Pyro into new batch dims, counting the log-density once per extra entry (an all-True
    ``(T, P)`` mask on ``Normal(...).to_event(2)`` multiplied it by T * P). Such a mask is read as one over the
    value's entries, right-aligned: over the dims that ``.to_event`` reinterpreted it masks the base
    distribution (``fn.base_dist.mask(m).to_event(n)``: masked entries leave the sum, exactly) and
    ``site_mask`` is None; reaching into a base's own event dims (e.g. a MultivariateNormal's) it is refused
    with a ModelInputError naming the site and the shapes a mask may have.
    """
    if not isinstance(mask, torch.Tensor):
        return fn, mask, len(fn.event_shape)
    event = tuple(fn.event_shape)
    batch = tuple(obs.shape[: obs.dim() - len(event)]) if obs is not None else _plated_batch_shape(fn)
    if mask.dim() <= len(batch):
        return fn, mask, len(event)
    base, n = fn, 0
    while isinstance(base, Independent):
        n, base = n + base.reinterpreted_batch_ndims, base.base_dist
    entries = batch + event[:n]
    fits = mask.dim() <= len(entries) and broadcast_or_none(tuple(mask.shape), entries) == entries
    if not fits:
        single = f", or one over its single entries of shape {entries} (the dims .to_event reinterpreted)" if n else ""
        raise ModelInputError(
            f"site '{name}': mask has shape {tuple(mask.shape)}, more dims than the batch shape {batch} of "
            f"{type(fn).__name__} (event shape {event}); expected a mask of the batch shape {batch} (whole "
            f"events){single}")
    return base.mask(mask).to_event(n), None, len(event) - n


def sample(name: str, fn, obs: torch.Tensor | None = None, *, mask: torch.Tensor | None = None,
           infer: dict | None = None) -> torch.Tensor:
    """Declare a random variable ``name ~ fn``; observed if ``obs`` is given.

    Args:
        name: unique site name.
        fn: a ``ppl.dist`` (Pyro) distribution, or a structured block's distribution.
        obs: observed value, shape ``batch_shape + event_shape`` of ``fn`` (broadcastable batch).
        mask: optional boolean ``(batch...)``; False marks a missing observation, which is
            then left out of the likelihood (its value may be NaN). On a ``.to_event(n)``
            distribution the mask may also cover the n reinterpreted dims ``(batch..., event[:n]...)``
            (e.g. y's full shape for ``Normal(loc, s).to_event(2)``) to leave out single entries.
        infer: Pyro inference hints.
    Returns:
        the value of the site: ``obs`` if observed, otherwise a draw (or the value an
        interpreter substitutes).
    """
    check_site = getattr(fn, "check_site", None)  # parameter checks that name the site (ppl.conjugate_dists)
    if check_site is not None:
        check_site(name)
    if obs is not None and not isinstance(obs, torch.Tensor):
        raise ModelInputError(f"site '{name}': observed value must be a torch.Tensor, got {type(obs).__name__}")
    _check_mask_type(name, mask)
    fn, site_mask, trailing = _fold_entry_mask(name, fn, obs, mask)
    if obs is not None:
        _check_observed(name, fn, obs, mask, trailing)
        if mask is not None and obs.is_floating_point():
            # Missing entries are excluded by the mask; a finite placeholder keeps gradients finite.
            keep = _expand_mask(mask, obs, trailing) if isinstance(mask, torch.Tensor) else mask
            obs = torch.where(torch.as_tensor(keep, device=obs.device), obs, torch.zeros_like(obs))
    if site_mask is None:
        return pyro.sample(name, fn, obs=obs, infer=infer or {})
    with pyro.poutine.mask(mask=site_mask):
        return pyro.sample(name, fn, obs=obs, infer=infer or {})


def module(name: str, nn_module: torch.nn.Module) -> torch.nn.Module:
    """Register a ``torch.nn.Module`` so that its parameters are learned; returns the module.

    Sites whose distribution depends on these parameters are marked *neural* by the compiler.
    """
    if not isinstance(nn_module, torch.nn.Module):
        raise TypeError(f"ppl.module('{name}', ...) expects a torch.nn.Module, got {type(nn_module).__name__}")
    # update_module_params: the module computes with the parameter store's tensors, the ones
    # inference optimizes, even when the model builds a fresh module on every call.
    return pyro.module(name, nn_module, update_module_params=True)


def copy_modules(value: Any, memo: dict | None = None) -> Any:
    """``value`` with every ``torch.nn.Module`` in it (itself, or an item of a tuple, list or dict, nested)
    replaced by a deep copy; everything else (data tensors included) is passed through uncopied.

    ``ppl.infer`` fits copies of the networks it is given, so the caller's modules are never trained in place
    (the same call twice gives the same fit); the trained copies live in the Posterior (``kwargs``, ``args``,
    ``networks``). One ``memo`` across calls keeps modules shared between arguments shared.
    """
    memo = {} if memo is None else memo
    if isinstance(value, torch.nn.Module):
        return copy.deepcopy(value, memo)
    if isinstance(value, dict):
        return type(value)((k, copy_modules(v, memo)) for k, v in value.items())
    if isinstance(value, (list, tuple)) and not hasattr(value, "_fields"):
        return type(value)(copy_modules(v, memo) for v in value)
    return value


def condition(fn: Callable[..., Any], data: dict[str, torch.Tensor]) -> Model:
    """The model with the sites in ``data`` fixed to the given values (latent or observed).

    ``ppl.infer(ppl.condition(model, {"z": path}), y)`` answers p(rest | z, y); conditioning
    globals and leaving the data unobserved answers the other direction, p(data | globals).
    Values are checked at their sites when the model runs (shape, finiteness).
    """
    if not isinstance(data, dict) or not data:
        raise TypeError("ppl.condition expects a non-empty dict of site name -> value")
    for name, value in data.items():
        if not isinstance(value, torch.Tensor):
            raise ModelInputError(f"site '{name}': conditioned value must be a torch.Tensor, got {type(value).__name__}")
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise ModelInputError(f"site '{name}': conditioned value contains NaN or inf")
    conditioned = Model(pyro.poutine.condition(fn, data=data))
    conditioned.name = f"{model_name(fn)}|{','.join(data)}"
    # the outer condition wins in Pyro (it writes the site's value last), so its values override the inner's
    conditioned.fixed_values = {**getattr(fn, "fixed_values", {}), **data}
    return conditioned


def without_data(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` with its observed data freed (drawn when it runs), the sites fixed by ``ppl.condition`` kept at
    their given values: what the predictive and ``simulate`` run. (``poutine.uncondition`` alone would free
    both, redrawing e.g. a conditioned transition matrix from its prior.)"""
    free = pyro.poutine.uncondition(fn)
    fixed = getattr(fn, "fixed_values", None)
    return pyro.poutine.condition(free, data=dict(fixed)) if fixed else free
