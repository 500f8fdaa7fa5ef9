r"""The model's log density as one tensor computation: what MAP and SVI optimize, without Pyro's ELBO machinery.

Pyro's ``TraceEnum_ELBO`` evaluates a model by recording a trace of the guide and of the model, packing every
site's log-density and contracting the enumerated ones; on a small model that bookkeeping, not the arithmetic,
is the cost (7-10 ms a step on a 150-point mixture whose log-density is a few hundred flops). Here the model
function runs under a single handler that sets every latent site's value, enumerates the finite discrete sites in
parallel (each at its own dim left of the plates, as Pyro's parallel enumeration does) and collects the log-density
factors; chains are collapsed by the exact kernels (``chains.fit_model``) before. The log joint is then

.. math::
    \log p(x, \theta) = \sum_{\text{sites } s \text{ without enumerated dims}} \log p_s
      + \log \sum_{z} \prod_{\text{sites depending on } z} p_s

with the sum over the enumerated sites' values contracted plate by plate by Pyro's tensor-tree contraction
(``pyro.ops.contract``: variable elimination in the log ring). No trace object, no guide trace, no validation
(the compiler validated the model once).

``log_joint(fmodel, args, kwargs, values, site_plan)`` is that function; ``guide_objective`` builds the loss of
a Pyro autoguide on it (MAP for ``AutoDelta``, the reparametrized ELBO for ``AutoNormal`` and the
``AutoContinuous`` family) and returns None for a guide it does not know, where the backends keep Pyro's ELBO.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from operator import attrgetter
from typing import Callable

import pyro
import pyro.poutine as poutine
import torch
from pyro.distributions.transforms import biject_to
from pyro.infer.autoguide import AutoContinuous, AutoDelta, AutoNormal
from pyro.ops import packed
from pyro.ops.contract import contract_tensor_tree
from pyro.ops.rings import LogRing
from pyro.poutine.messenger import Messenger
from pyro.poutine.util import site_is_subsample

SYMBOLS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"


class NotCompilable(Exception):
    """The model cannot be run as a compiled log density; the message names the site that stops it."""


@dataclass(frozen=True)
class SitePlan:
    """What the compiled run needs to know about the model: the finite discrete sites it enumerates, the
    most plates any site sits in (enumeration dims start left of them) and, for a minibatch, the factor by
    which each subsampled plate's sites are scaled (plate name -> full size / batch size) and the factor of the
    sites in none of those plates (``outside_scale``: 0 leaves the globals' terms out of a chunk's sum)."""

    enumerate: frozenset[str]
    max_plate_nesting: int
    plate_scales: tuple[tuple[str, float], ...] = ()
    outside_scale: float = 1.0

    def scaled(self, outside_scale: float = 1.0, **plate_scales: float) -> "SitePlan":
        """This plan with the sites of the named plates scaled (an unbiased minibatch estimate of the sum) and
        the other sites by ``outside_scale``."""
        return SitePlan(self.enumerate, self.max_plate_nesting, tuple(sorted(plate_scales.items())), outside_scale)

    @classmethod
    def of(cls, plan) -> "SitePlan":
        nesting = max([len(s.plates) for s in plan.graph.sites()] + [0])
        return cls(frozenset(plan.facts.enumerable), nesting)


@dataclass
class _Factor:
    """One site's log-density: ``log_prob`` (unscaled, masked), its plates (name -> dim), its scale, and the
    enumeration dims it depends on (found from its shape)."""

    name: str
    log_prob: torch.Tensor
    plates: dict[str, int]
    scale: float | torch.Tensor


class _DensityRun(Messenger):
    """Sets the latent sites' values, enumerates the finite discrete ones in parallel, collects the factors."""

    def __init__(self, values: dict[str, torch.Tensor], site_plan: SitePlan):
        super().__init__()
        self.values = values
        self.site_plan = site_plan
        self.next_dim = -site_plan.max_plate_nesting - 1
        self.enum_dims: dict[int, str] = {}
        self.factors: list[_Factor] = []

    def _pyro_sample(self, msg) -> None:
        if msg["is_observed"] or msg["done"] or site_is_subsample(msg):
            return
        name = msg["name"]
        if name in self.values:
            msg["value"] = self.values[name]
        elif name in self.site_plan.enumerate:
            msg["value"] = self._enumerated(name, msg["fn"])
        else:
            raise NotCompilable(f"latent site '{name}' has no value and is not enumerated")
        msg["done"] = True

    def _enumerated(self, name: str, fn) -> torch.Tensor:
        """The support of ``fn`` along a new dim left of the plates and of earlier enumerated sites."""
        support = fn.enumerate_support(expand=False)
        dim = self.next_dim
        self.next_dim -= 1
        self.enum_dims[dim] = name
        event = support.shape[1 + len(fn.batch_shape):]
        return support.reshape((support.shape[0],) + (1,) * (-dim - 1) + tuple(event))

    def _pyro_post_sample(self, msg) -> None:
        if site_is_subsample(msg):
            return
        fn, value = msg["fn"], msg["value"]
        log_prob = fn.log_prob(value)
        mask = msg["mask"]
        if mask is not None and mask is not True:
            log_prob = torch.where(torch.as_tensor(mask, device=log_prob.device), log_prob,
                                   log_prob.new_zeros(()))
            if mask is False:
                log_prob = log_prob.new_zeros(log_prob.shape)
        plates = {f.name: f.dim for f in msg["cond_indep_stack"] if f.vectorized and f.dim is not None}
        scale = msg["scale"]
        inside = False
        for plate, factor in self.site_plan.plate_scales:
            if plate in plates:
                scale, inside = scale * factor, True
        if self.site_plan.plate_scales and not inside and self.site_plan.outside_scale != 1.0:
            scale = scale * self.site_plan.outside_scale
        self.factors.append(_Factor(msg["name"], log_prob, plates, scale))


def _run(fmodel: Callable, args: tuple, kwargs: dict, values: dict, site_plan: SitePlan) -> _DensityRun:
    run = _DensityRun(values, site_plan)
    with pyro.validation_enabled(False), run:
        fmodel(*args, **kwargs)
    return run


def _contract(run: _DensityRun) -> torch.Tensor:
    """The log joint from the collected factors: plain sum when nothing is enumerated, else the sum of the
    factors free of enumeration dims plus the log-ring contraction of the others over the enumerated values."""
    enum_dims = run.enum_dims
    total = None
    dependent: list[_Factor] = []
    for factor in run.factors:
        lp = factor.log_prob
        if enum_dims and any(-dim <= lp.dim() and lp.shape[dim] > 1 for dim in enum_dims):
            dependent.append(factor)
            continue
        term = (lp * factor.scale).sum() if isinstance(factor.scale, torch.Tensor) or factor.scale != 1.0 else lp.sum()
        total = term if total is None else total + term
    if dependent:
        contracted = _contract_enumerated(dependent, enum_dims)
        total = contracted if total is None else total + contracted
    if total is None:
        raise NotCompilable("the model has no sample site")
    return total


def _contract_enumerated(factors: list[_Factor], enum_dims: dict[int, str]) -> torch.Tensor:
    """log sum over the enumerated values of the product of ``factors`` (each plate a product), summed over
    the plates left after contraction; the factors' common scale (subsampling) multiplies the result."""
    plate_dims = {name: dim for f in factors for name, dim in f.plates.items()}
    dim_to_symbol = {dim: SYMBOLS[i] for i, dim in enumerate(sorted(set(plate_dims.values())) + sorted(enum_dims))}
    plate_symbol = {name: dim_to_symbol[dim] for name, dim in plate_dims.items()}
    scales = {float(f.scale) if not isinstance(f.scale, torch.Tensor) else float(f.scale) for f in factors}
    if len(scales) > 1:
        raise NotCompilable(f"sites {[f.name for f in factors]} depend on an enumerated site under different "
                            "scales (subsample sizes)")
    tree: OrderedDict = OrderedDict()
    for f in factors:
        ordinal = frozenset(plate_symbol[name] for name in f.plates)
        tree.setdefault(ordinal, []).append(packed.pack(f.log_prob, dim_to_symbol))
    sum_dims = {dim_to_symbol[dim] for dim in enum_dims}
    contracted = contract_tensor_tree(tree, sum_dims, ring=LogRing())
    total = sum(term.sum() for terms in contracted.values() for term in terms)
    scale = scales.pop()
    return total * scale if scale != 1.0 else total


def log_joint(fmodel: Callable, args: tuple, kwargs: dict, values: dict[str, torch.Tensor],
              site_plan: SitePlan) -> torch.Tensor:
    r"""log p(data, values) of ``fmodel`` with its finite discrete sites (``site_plan.enumerate``) summed out
    exactly: a differentiable scalar.

    ``fmodel`` is the model inference runs on (``chains.fit_model``: chains collapsed into factors); ``values``
    sets every other latent site (constrained space, the site's shape). Raises ``NotCompilable`` naming a latent
    site that has neither.
    """
    return _contract(_run(fmodel, args, kwargs, values, site_plan))


def _model_params(fmodel: Callable, args: tuple, kwargs: dict, values: dict, site_plan: SitePlan) -> list:
    """The unconstrained leaves of the model's own ``ppl.param``/``ppl.module`` parameters (the model is run and
    its log joint contracted once: ``NotCompilable`` if it cannot be)."""
    with poutine.trace(param_only=True) as tracer:
        run = _run(fmodel, args, kwargs, values, site_plan)
    _contract(run)
    return [site["value"].unconstrained() for site in tracer.trace.nodes.values()]


def _guide_sites(guide) -> list[tuple[str, dict]]:
    return [(name, site) for name, site in guide.prototype_trace.iter_stochastic_nodes()]


def _initialize(guide, args: tuple, kwargs: dict) -> None:
    """Create the guide's parameters (autoguides make them on their first call)."""
    with poutine.block(), torch.no_grad():
        guide(*args, **kwargs)


def guide_objective(fmodel: Callable, guide, args: tuple, kwargs: dict, site_plan: SitePlan
                    ) -> Callable[[], tuple[torch.Tensor, list]] | None:
    r"""``step() -> (loss, params)`` for fitting ``guide`` to ``fmodel`` on the compiled log joint, or None when
    the guide is not one this module knows (then Pyro's ELBO is used).

    - ``AutoDelta``: loss = -log p(data, theta) at the guide's values (MAP in constrained space, as Pyro's ELBO
      with a delta guide);
    - ``AutoNormal``: one reparametrized draw u = loc + scale * eps per site, theta = T(u) (``biject_to`` of the
      support), loss = -[log p(data, theta) + log|dT/du| - log N(u; loc, scale)];
    - ``AutoContinuous`` (AutoMultivariateNormal, AutoLowRankMultivariateNormal, AutoDiagonalNormal, IAF):
      the same with u drawn from the guide's joint posterior over all sites.

    ``params`` are the unconstrained leaves of the guide's and the model's parameters (the optimizers read them
    on the first call). The guide is initialized and the objective evaluated once here: ``NotCompilable`` (naming
    the site) if the model cannot be run so.
    """
    if not isinstance(guide, (AutoDelta, AutoNormal, AutoContinuous)):
        return None
    _initialize(guide, args, kwargs)
    draw = _draw_function(guide)
    with torch.no_grad():
        values, _ = draw()
        params = _param_leaves(guide) + _model_params(fmodel, args, kwargs, values, site_plan)

    def step() -> tuple[torch.Tensor, list]:
        values, log_q = draw()
        return log_q - log_joint(fmodel, args, kwargs, values, site_plan), params

    return step


def _draw_function(guide) -> Callable[[], tuple[dict, torch.Tensor | float]]:
    """``draw() -> (values, log q(values))``: constrained values of the guide's sites (log q = 0 for a delta)."""
    if isinstance(guide, AutoDelta):
        return _delta_draw(guide)
    if isinstance(guide, AutoNormal):
        return _normal_draw(guide)
    return _continuous_draw(guide)


def _param_leaves(guide) -> list[torch.Tensor]:
    """The unconstrained leaves of the guide's parameters in the parameter store."""
    prefix = guide._pyro_name + "."
    store = pyro.get_param_store()
    return [store.get_param(name).unconstrained() for name in store.keys() if name.startswith(prefix)]


def _delta_draw(guide: AutoDelta):
    getters = {name: attrgetter(name) for name, _ in _guide_sites(guide)}

    def draw():
        return {name: get(guide) for name, get in getters.items()}, 0.0

    return draw


def _normal_draw(guide: AutoNormal):
    sites = _guide_sites(guide)
    transforms = {name: biject_to(site["fn"].support) for name, site in sites}

    def draw():
        values, log_q = {}, 0.0
        for name, _ in sites:
            values[name], site_log_q = gaussian_draw(*guide._get_loc_and_scale(name), transforms[name])
            log_q = log_q + site_log_q
        return values, log_q

    return draw


def _continuous_draw(guide: AutoContinuous):
    def draw():
        posterior = guide.get_posterior()
        latent = posterior.rsample()
        log_q = posterior.log_prob(latent)
        values = {}
        for site, u in guide._unpack_latent(latent):
            transform = biject_to(site["fn"].support)
            value = transform(u)
            log_q = log_q - _log_det(transform, u, value)
            values[site["name"]] = value
        return values, log_q

    return draw


def gaussian_draw(loc: torch.Tensor, scale: torch.Tensor, transform, eps: torch.Tensor | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    r"""A reparametrized draw of a Gaussian q in unconstrained space, pushed into the support: ``(value, log q)``
    with :math:`u = loc + scale \cdot \epsilon` (``eps`` given, else drawn), value = T(u) and
    :math:`\log q = \sum \log N(u; loc, scale) - \log|dT/du|` summed over the site."""
    u = loc + scale * (torch.randn_like(loc) if eps is None else eps)
    value = transform(u)
    return value, torch.distributions.Normal(loc, scale).log_prob(u).sum() - _log_det(transform, u, value)


def _log_det(transform, u: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """log |dT/du| summed over the site (its event dims and its batch dims)."""
    return transform.log_abs_det_jacobian(u, value).sum()


def potential_fn(fmodel: Callable, args: tuple, kwargs: dict, transforms: dict, site_plan: SitePlan
                 ) -> Callable[[dict[str, torch.Tensor]], torch.Tensor]:
    r"""``U(u) = -[log p(data, T(u)) + log|dT/du|]`` over unconstrained site values ``u`` (site -> tensor): the
    potential energy HMC/NUTS samples, on the compiled log joint. ``transforms`` (site -> Transform from
    constrained to unconstrained space, Pyro's ``initialize_model`` convention; T is its inverse) may omit
    real-valued sites."""

    def potential(unconstrained: dict[str, torch.Tensor]) -> torch.Tensor:
        values, log_det = {}, 0.0
        for name, u in unconstrained.items():
            transform = transforms.get(name)
            if transform is None:
                values[name] = u
                continue
            to_constrained = transform.inv
            value = to_constrained(u)
            values[name] = value
            log_det = log_det + _log_det(to_constrained, u, value)
        return -(log_joint(fmodel, args, kwargs, values, site_plan) + log_det)

    return potential
