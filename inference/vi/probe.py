r"""Probing a model: run it with its discrete local enumerated and its globals drawn from their priors, and
compare distribution parameters with the globals' values (exactly, or to float tolerance).

``Tabulate`` records every sample site (distribution, value, mask, scale) while the local takes its support
``arange(K)`` in a new leftmost dim (as ``ppl.handlers.tabulate`` does for a ``markov_chain``), so a child that
uses z elementwise (``loc[z]``) is evaluated at all K states at once; ``is_global_indexed`` then checks that a
parameter *is* the global indexed by the local: ``param[k, n, ...] == value[k, ...]`` for every state k and
data entry n.
"""
from __future__ import annotations

import pyro
import torch
from pyro.poutine.messenger import Messenger
from pyro.poutine.util import site_is_subsample

PROBE_SEEDS = (101, 202)


class Tabulate(Messenger):
    """Record every sample site (fn, value, mask, scale) with ``local`` set to its enumerated support: ``arange(K)``
    in a new leftmost dim, expanded over the site's shape (``expand=False``: not expanded, so that e.g. an LDA's
    ``topics[z]`` is ``(K, 1, ..., V)``, not documents x words x topics x vocabulary)."""

    def __init__(self, local: str | None, expand: bool = True):
        super().__init__()
        self.local = local
        self.expand = expand
        self.sites: dict[str, dict] = {}
        self.params: list[str] = []

    def _pyro_sample(self, msg):
        if msg["name"] != self.local or msg["is_observed"]:
            return
        fn = msg["fn"]
        K = num_states(fn)
        shape = tuple(fn.batch_shape + fn.event_shape)
        ref = fn.log_init if hasattr(fn, "log_init") else fn.logits
        support = torch.arange(K, device=ref.device).reshape((K,) + (1,) * len(shape))
        msg.update(value=support.expand((K,) + shape) if self.expand else support, done=True)

    def _pyro_post_sample(self, msg):
        if not site_is_subsample(msg):
            self.sites[msg["name"]] = dict(fn=msg["fn"], value=msg["value"], mask=msg.get("mask"),
                                           scale=msg.get("scale", 1.0), observed=msg["is_observed"])

    def _pyro_param(self, msg):
        self.params.append(msg["name"])


class Held(Tabulate):
    """Record every sample site (as ``Tabulate``, the local ``local`` enumerated) with the latent sites in ``values``
    held at the given values (gradients flow to them when the run has them on)."""

    def __init__(self, values: dict, local: str | None = None, expand: bool = True):
        super().__init__(local, expand)
        self.values = values

    def _pyro_sample(self, msg):
        if msg["name"] in self.values and not msg["is_observed"]:
            msg.update(value=self.values[msg["name"]], done=True)
            return
        super()._pyro_sample(msg)


def run_held(model, args, kwargs, values: dict, seed: int | None, grad: bool = False,
             local: str | None = None) -> Held:
    """The model run once under ``Held(values, local)``: the latent sites in ``values`` held there, the local
    enumerated, the others drawn from their priors under ``seed`` (None: not seeded, for a caller that reads
    nothing that depends on those draws); gradients flow to ``values`` when ``grad``."""
    return run_under(Held(values, local), model, args, kwargs, seed, grad)


def num_states(fn) -> int:
    return int(fn.num_states) if hasattr(fn, "num_states") else int(fn.logits.shape[-1])


def probe_runs(model, args, kwargs, local: str | None, expand: bool = True, held: dict | None = None) -> list[Tabulate]:
    """The model run under ``Tabulate(local, expand)`` once per probe seed (globals drawn from their priors, but
    for the sites in ``held``, held at the given values in both runs: ``Held``).

    With ``expand`` and a Categorical (mixture) local, the second run first takes the local unexpanded,
    ``(K, 1, ..)``: the model's own work is then done for K states, not K x data (its plates broadcast the rest),
    and the first run has already checked the data-wide, elementwise use of the local. That run is kept only if
    every site has the layout it has in the first run (``same_layout``); otherwise (or if the model fails on it)
    the second run is expanded too."""
    held = held or {}
    first = _run(model, args, kwargs, local, expand, PROBE_SEEDS[0], held)
    if expand and local in first.sites and not hasattr(first.sites[local]["fn"], "log_trans"):
        try:
            cheap = _run(model, args, kwargs, local, False, PROBE_SEEDS[1], held)
        except Exception:  # noqa: BLE001 - only a shortcut: any failure falls back to the expanded run
            cheap = None
        if cheap is not None and same_layout(first, cheap, local):
            return [first, cheap]
    return [first, _run(model, args, kwargs, local, expand, PROBE_SEEDS[1], held)]


def _run(model, args, kwargs, local: str | None, expand: bool, seed: int, held: dict) -> Tabulate:
    return run_under(Held(held, local, expand), model, args, kwargs, seed)   # Held({}) is Tabulate


def run_under(handler: Tabulate, model, args, kwargs, seed: int | None, grad: bool = False) -> Tabulate:
    """``handler`` after one run of the model under it, torch's generator seeded with ``seed`` (None: not seeded;
    ``torch.manual_seed`` costs ~1 ms) and restored after,
    gradients on only with ``grad``, Pyro's argument validation off (the model's distributions validate their
    arguments once, when ppl.compile traces it; not again here)."""
    with torch.random.fork_rng(), torch.set_grad_enabled(grad), pyro.validation_enabled(False), handler:
        if seed is not None:
            torch.manual_seed(seed)
        model(*args, **kwargs)
    return handler


def same_layout(a: Tabulate, b: Tabulate, local: str) -> bool:
    """Do the two runs have the same sites, in order, each with the same batch and event shapes and (but for the
    local's) value shapes?"""
    if list(a.sites) != list(b.sites) or a.params != b.params:
        return False
    for name, site in a.sites.items():
        other = b.sites[name]
        if (site["fn"].batch_shape, site["fn"].event_shape) != (other["fn"].batch_shape, other["fn"].event_shape):
            return False
        if name != local and site["value"].shape != other["value"].shape:
            return False
    return True


def peel(fn) -> tuple[object, int, torch.Tensor | None]:
    """(base distribution, dims reinterpreted by ``Independent``, mask of any MaskedDistribution inside)."""
    extra, mask = 0, None
    while type(fn).__name__ in ("Independent", "MaskedDistribution"):
        if type(fn).__name__ == "Independent":
            extra += fn.reinterpreted_batch_ndims
        else:
            mask = fn._mask if mask is None else mask & fn._mask
        fn = fn.base_dist
    return fn, extra, mask


def site_weight(site: dict, inner_mask, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An observed site's weight: its masks (the site's and ``inner_mask``, from ``peel``: 0 where an entry is
    missing) times its scale, in ``dtype`` on ``device``; a 0-dim tensor when neither mask is a tensor (the
    masks' own shape otherwise, not broadcast)."""
    weight = torch.ones((), dtype=dtype, device=device)
    for m in (site["mask"], inner_mask):
        if isinstance(m, torch.Tensor):
            weight = weight * m.to(dtype)
        elif m is False:
            weight = weight * 0
    scale = site["scale"]
    return weight * (scale.to(dtype) if isinstance(scale, torch.Tensor) else scale)


def close(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Are ``a`` and ``b`` equal (or allclose) once broadcast together? Dims along which both are expanded (stride
    0: every entry the same) are compared at one index only."""
    try:
        a, b = torch.broadcast_tensors(a, b)
    except RuntimeError:
        return False
    index = tuple(slice(0, 1) if n > 1 and sa == 0 and sb == 0 else slice(None)
                  for n, sa, sb in zip(a.shape, a.stride(), b.stride()))
    a, b = a[index], b[index].to(a.dtype)
    # an indexed global is copied exactly (``loc[z]``): equality is the common, cheap case
    return a.shape == b.shape and (torch.equal(a, b) or bool(torch.allclose(a, b, rtol=1e-5, atol=1e-6)))


def indexed_target(v: torch.Tensor, K: int, zshape: tuple) -> torch.Tensor | None:
    """The global ``v (K, *E)`` laid out as ``(K, *zshape, *E)``; None if its leading dim is not K."""
    if v.dim() == 0 or v.shape[0] != K:
        return None
    return v.reshape((K,) + (1,) * len(zshape) + tuple(v.shape[1:])).expand((K,) + zshape + tuple(v.shape[1:]))


def is_global_indexed(p: torch.Tensor, v: torch.Tensor, K: int, zshape: tuple) -> bool:
    target = indexed_target(v, K, zshape)
    return target is not None and p.dim() == target.dim() and p.shape[0] == K and close(p, target) \
        and torch.broadcast_shapes(p.shape, target.shape) == target.shape


def is_global(p: torch.Tensor, v: torch.Tensor) -> bool:
    return p.dim() >= v.dim() and tuple(p.shape[p.dim() - v.dim():]) == tuple(v.shape) and close(p, v)


def child_params(base) -> dict[str, torch.Tensor]:
    """The parameters of an observed child's base distribution that a conjugate global can feed or fix."""
    family = type(base).__name__
    if family in ("Categorical", "Bernoulli"):
        return {"probs": base.probs}
    if family == "Poisson":
        return {"rate": base.rate}
    if family == "Normal":
        return {"loc": base.loc, "scale": base.scale}
    if family == "MultivariateNormal":
        return {"loc": base.loc, "covariance_matrix": base.covariance_matrix}
    return {}
