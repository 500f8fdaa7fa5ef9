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

``log_joint(fmodel, args, kwargs, values, site_plan)`` is that function (the interpreter); ``TracedDensity``
records it once per input shape, with its gradient, as one graph of tensor operations checked against the
interpreter (the model's Python runs no more per step); ``guide_objective`` builds the loss of a Pyro autoguide
on it (MAP for ``AutoDelta``, the reparametrized ELBO for ``AutoNormal`` and the
``AutoContinuous`` family) and returns None for a guide it does not know, where the backends keep Pyro's ELBO.
"""
from __future__ import annotations

import math
import warnings
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable

import pyro
import pyro.poutine as poutine
import torch
from pyro.distributions.transforms import biject_to
from torch.distributions import transform_to
from torch.utils._python_dispatch import TorchDispatchMode
from pyro.infer.autoguide import AutoContinuous, AutoDelta, AutoNormal
from pyro.ops import packed
from pyro.ops.contract import contract_tensor_tree
from pyro.ops.rings import LogRing
from pyro.poutine.messenger import Messenger
from pyro.poutine.util import site_is_subsample

from .graph_recording import ValueDependentShape, record_graph

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
        return cls.from_graph(plan.graph, plan.facts)

    @classmethod
    def from_graph(cls, graph, facts) -> "SitePlan":
        """The plan of a model with ``graph`` and ``facts`` (the compiler's)."""
        return cls(frozenset(facts.enumerable), max([len(s.plates) for s in graph.sites()] + [0]))


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


def _run(fmodel: Callable, args: tuple, kwargs: dict, values: dict, site_plan: SitePlan,
         validate: bool = False) -> _DensityRun:
    run = _DensityRun(values, site_plan)
    with pyro.validation_enabled(validate), run:
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
              site_plan: SitePlan, validate: bool = False) -> torch.Tensor:
    r"""log p(data, values) of ``fmodel`` with its finite discrete sites (``site_plan.enumerate``) summed out
    exactly: a differentiable scalar.

    ``fmodel`` is the model inference runs on (``chains.fit_model``: chains collapsed into factors); ``values``
    sets every other latent site (constrained space, the site's shape). Raises ``NotCompilable`` naming a latent
    site that has neither. ``validate``: run Pyro's argument and support checks (off by default: the compiler
    checked the model once, ``TracedDensity`` checks the user's data once more).
    """
    return _contract(_run(fmodel, args, kwargs, values, site_plan, validate))


def refusal(model: Callable, fmodel: Callable, args: tuple, kwargs: dict, graph, facts) -> str | None:
    """Why the compiled log density cannot run ``model`` (``NotCompilable``'s message, naming the site), or
    None when it can: ``fmodel``, the model with its chains collapsed (``chains.fit_model``), is run once under
    the compiled handler at latent values drawn from the prior (a seeded draw; the global RNG is restored). What
    ``plan.explain()`` says before a fit; a model that fails here for another reason is left to the fit
    (which reports it)."""
    try:
        with torch.no_grad(), torch.random.fork_rng(), pyro.get_param_store().scope():
            torch.manual_seed(0)
            trace = poutine.trace(model).get_trace(*args, **kwargs)
            values = {name: site["value"] for name, site in trace.nodes.items()
                      if site["type"] == "sample" and not site["is_observed"] and name not in facts.enumerable}
            log_joint(fmodel, args, kwargs, values, SitePlan.from_graph(graph, facts))
    except NotCompilable as why:
        return str(why)
    except Exception:  # noqa: BLE001 - not the compiled handler's refusal: the fit itself reports it
        return None
    return None


def _model_params(fmodel: Callable, args: tuple, kwargs: dict, values: dict, site_plan: SitePlan) -> list:
    """The unconstrained leaves of the model's own ``ppl.param``/``ppl.module`` parameters (the model is run and
    its log joint contracted once: ``NotCompilable`` if it cannot be)."""
    with poutine.trace(param_only=True) as tracer:
        run = _run(fmodel, args, kwargs, values, site_plan)
    _contract(run)
    return [site["value"].unconstrained() for site in tracer.trace.nodes.values()]


class TracedDensity:
    r"""The log joint as a tensor function of the latent sites' unconstrained values, traced once per input
    layout: ``density(u_1, ..., u_n) -> scalar``

    .. math::
        D(u) = \log p(x, T(u)) + [\text{jacobian}] \sum_i \log |\det \partial T_i / \partial u_i|

    ``names`` orders the sites (``u_i`` has the unconstrained shape of site ``names[i]``); ``transforms[name]``
    maps it into the site's support (None: identity). The interpreter (``log_joint``: the model's Python code
    under one handler) evaluates D; for each new layout of the inputs (shapes, dtypes, device: the cache key) D
    and its gradient are recorded once as one graph of tensor operations (``_JointGraph``: ``make_fx`` of the
    interpreter's forward and backward pass, run by ``torch.jit.trace``), so later calls run no Python of the
    model, the distributions or the contraction, and no autograd. Python reads of tensor values that depend on
    u become guards (a call whose reads differ is evaluated by the interpreter), and a recording is kept only if
    it gives the interpreter's value and gradient (relative ``sqrt(eps)`` of the dtype) at the point it was
    recorded at and at ``checks`` random points around it (a fixed-seed generator: the global RNG is not
    touched); otherwise, or when recording fails or the model has its own ``ppl.param``/``ppl.module``
    parameters (they are read from the parameter store at every
    call), the interpreter runs and ``fallback_reason[key]`` says why (``reason`` the latest). Pyro's argument
    validation runs once, on the first call's interpreter run (the user's data). ``record_after``: the
    interpreter runs the first ``record_after - 1`` calls of a layout and the recording is made at the next one,
    so a fit of a few hundred evaluations never pays for a recording (``guide_objective``: ``RECORD_AFTER``).
    Called with ``arity`` tensors, differentiated with respect to the first ``wrt`` (both ``len(names)`` here; a
    subclass such as ``NormalObjective`` takes more inputs and overrides ``interpreted``).
    """

    def __init__(self, fmodel: Callable, args: tuple, kwargs: dict, site_plan: SitePlan, names: list[str],
                 transforms: dict, jacobian: bool, trace: bool = True, checks: int = 3, record_after: int = 1):
        self.fmodel, self.args, self.kwargs, self.site_plan = fmodel, args, kwargs, site_plan
        self.names, self.transforms, self.jacobian = list(names), dict(transforms), jacobian
        self.trace, self.checks, self.record_after = trace, checks, record_after
        self.arity = self.wrt = len(self.names)
        self.calls: dict[tuple, int] = {}
        self.recorded: dict[tuple, Callable | None] = {}
        self.fallback_reason: dict[tuple, str] = {}
        self.reason: str | None = None
        self._validated = False

    def interpreted(self, *us: torch.Tensor, validate: bool = False) -> torch.Tensor:
        """D(u) by the interpreter (the reference every recording is checked against); ``validate``: with Pyro's
        argument checks."""
        values, log_det = {}, 0.0
        for name, u in zip(self.names, us):
            transform = self.transforms.get(name)
            value = u if transform is None else transform(u)
            values[name] = value
            if self.jacobian and transform is not None:
                log_det = log_det + _log_det(transform, u, value)
        return log_joint(self.fmodel, self.args, self.kwargs, values, self.site_plan, validate) + log_det

    def __call__(self, *us: torch.Tensor) -> torch.Tensor:
        if len(us) != self.arity:
            raise ValueError(f"the density takes {self.arity} tensors ({self._inputs()}), got {len(us)}")
        key = _layout(us)
        if key not in self.recorded:
            self._validate_once(us)
            self.calls[key] = self.calls.get(key, 0) + 1
            if self.calls[key] < self.record_after:  # a short fit never pays for the recording
                return self.interpreted(*us)
            self.recorded[key] = self._record(key, us)
        fn = self.recorded[key]
        if fn is None:
            return self.interpreted(*us)
        return fn(*us)

    def recording(self, *us: torch.Tensor) -> "_JointGraph | None":
        """The recorded graph of this layout of the inputs, or None when there is none (yet, or refused): then
        only ``__call__`` evaluates D (and counts the call towards ``record_after``)."""
        return self.recorded.get(_layout(us))

    def _inputs(self) -> str:
        """What the inputs are, for error messages."""
        return f"sites {self.names}"

    def _refuse(self, key: tuple, why: str) -> None:
        self.fallback_reason[key] = self.reason = why
        return None

    def _validate_once(self, us: tuple) -> None:
        """Pyro's argument checks, once, on the user's data; notes the model's own parameters (which the
        recording refuses)."""
        if self._validated:
            return
        with torch.no_grad(), poutine.trace() as tracer:
            self.interpreted(*(u.detach() for u in us), validate=True)
        self._validated = True
        nodes = tracer.trace.nodes.items()
        self._params = [name for name, site in nodes if site["type"] == "param"]

    def _record(self, key: tuple, us: tuple) -> Callable | None:
        """A recording of D for this input layout checked against the interpreter, or None (reason kept)."""
        point = tuple(u.detach() for u in us)
        self._validate_once(point)
        if not self.trace:
            return self._refuse(key, "tracing turned off (trace=False)")
        if self._params:
            return self._refuse(key, f"the model has its own parameters ({', '.join(self._params[:3])}); the "
                                     "interpreter reads them from the parameter store at every call")
        ops = _count_ops(self.interpreted, point)
        if ops > MAX_RECORDED_OPS:
            return self._refuse(key, f"one evaluation runs {ops} tensor operations (more than MAX_RECORDED_OPS = "
                                     f"{MAX_RECORDED_OPS}, e.g. a chain's step-by-step loop): recording it would "
                                     "cost more than it saves")
        if not point or len({u.dtype for u in point}) > 1 or not point[0].is_floating_point():
            return self._refuse(key, f"the sites' values are not of one floating dtype ({[u.dtype for u in point]})")
        try:
            fn = _JointGraph(self, point)
        except _Refused as why:
            return self._refuse(key, str(why))
        generator = torch.Generator(device=point[0].device).manual_seed(0)
        points = [point] + [tuple(u + torch.randn(u.shape, generator=generator, device=u.device, dtype=u.dtype)
                                  for u in point) for _ in range(self.checks)]
        for i, at in enumerate(points):
            mismatch = self._mismatch(fn, at)
            if mismatch:
                where = "the recording point" if i == 0 else f"random point {i}"
                return self._refuse(key, f"the traced density differs from the interpreter at {where} ({mismatch}): "
                                         "the model's Python code branches on tensor values")
        return fn

    def _mismatch(self, fn: Callable, point: tuple) -> str | None:
        """None if ``fn`` and the interpreter agree at ``point`` (value and gradient), else what differs."""
        results = []
        for f in (fn, self.interpreted):
            inputs = tuple(u.clone().requires_grad_(i < self.wrt and u.is_floating_point())
                           for i, u in enumerate(point))
            try:
                with torch.enable_grad(), pyro.validation_enabled(False):
                    value = f(*inputs)
                    floats = [u for u in inputs if u.requires_grad]
                    grads = torch.autograd.grad(value, floats, allow_unused=True) if value.requires_grad else ()
            except Exception as error:  # noqa: BLE001 - compared below: one raising and not the other differs
                results.append(("error", type(error).__name__))
                continue
            grads = [torch.zeros_like(u) if g is None else g for u, g in zip(floats, grads)]
            results.append((value.detach(), [g.detach() for g in grads]))
        (v1, g1), (v2, g2) = results
        if isinstance(v1, str) or isinstance(v2, str):
            return None if v1 == v2 and g1 == g2 else f"one raised {g1 if isinstance(v1, str) else g2}"
        tol = torch.finfo(v2.dtype).eps ** 0.5
        if not _close(v1, v2, tol):
            return f"value {float(v1):.10g} vs {float(v2):.10g}"
        if len(g1) != len(g2) or any(not _close(a, b, tol) for a, b in zip(g1, g2)):
            return "gradient"
        return None


class NormalObjective(TracedDensity):
    r"""One draw's loss of an ``AutoNormal`` guide as a function of the guide's parameters and the noise, recorded
    like the density (``TracedDensity``) but with the guide's draw, its log q and the gradient with respect to
    its parameters inside the one graph, so that a step runs no Python of the guide either:

    .. math::
        L(m, \rho, \epsilon) = \sum_i \log N(u_i; m_i, s_i) - D(u), \quad u_i = m_i + s_i \epsilon_i,
        \quad s_i = S(\rho_i)

    with D the log joint plus the log-Jacobian of the sites' transforms (``TracedDensity`` with
    ``jacobian=True``) and S the guide's scale transform (softplus for its default ``scale_constraint``).
    Called as ``L(m_1, ..., m_n, rho_1, ..., rho_n, eps_1, ..., eps_n)``, each of site i's unconstrained shape,
    ``n = len(names)``: a scalar with gradients for the m's and rho's (the eps are drawn, not fitted)."""

    def __init__(self, fmodel: Callable, args: tuple, kwargs: dict, site_plan: SitePlan, names: list[str],
                 transforms: dict, to_scale: Callable, trace: bool = True, checks: int = 3, record_after: int = 1):
        super().__init__(fmodel, args, kwargs, site_plan, names, transforms, True, trace=trace, checks=checks,
                         record_after=record_after)
        self.to_scale = to_scale
        self.arity, self.wrt = 3 * len(self.names), 2 * len(self.names)

    def _inputs(self) -> str:
        return f"the locs, raw scales and noises of sites {self.names}"

    def interpreted(self, *inputs: torch.Tensor, validate: bool = False) -> torch.Tensor:
        """L by the interpreter: the draw and log q in torch, D by ``TracedDensity.interpreted``."""
        n = len(self.names)
        us, log_q = normal_sample(inputs[:n], inputs[n:2 * n], inputs[2 * n:], self.to_scale)
        return log_q - super().interpreted(*us, validate=validate)


def normal_sample(locs, raw_scales, eps, to_scale: Callable) -> tuple[list[torch.Tensor], torch.Tensor]:
    r"""A reparametrized draw of a mean-field Gaussian, site by site: ``([u_i], log q(u))`` with
    :math:`u_i = m_i + S(\rho_i) \epsilon_i` (each of site i's shape) and
    :math:`\log q = -\sum_i \sum (\epsilon_i^2 / 2 + \log S(\rho_i) + \log(2\pi)/2)`."""
    half_log_2pi = 0.5 * math.log(2 * math.pi)
    us, log_q = [], 0.0
    for loc, raw, e in zip(locs, raw_scales, eps):
        scale = to_scale(raw)
        us.append(loc + scale * e)
        log_q = log_q - (0.5 * e.square() + scale.log()).sum() - half_log_2pi * e.numel()
    return us, log_q


MAX_RECORDED_OPS = 500
"""The most tensor operations one interpreted forward evaluation of D may run for it to be recorded. Recording
the forward and backward pass costs milliseconds per operation on this 2-core machine, which a fit of ordinary
length does not win back. A collapsed chain's exact kernel (``inference/exact/ops.py``) is one operation: the
library's HMM, LDS, IO-HMM and factorial HMM run 345-704 (recorded; the switching LDS, ~1100, is not)."""


MAX_FUNCTIONALIZED_NODES = 1000
"""The largest recorded graph that is recorded a second time through functionalization so that its constants can
be folded, where rewriting its in-place ops out of place (``graph_recording.inline_mutations``: the usual case,
writes into temporaries of the backward pass) leaves some (a larger one runs unfolded)."""


def _layout(us: tuple) -> tuple:
    """The cache key of a recording: every input's shape, dtype and device."""
    return tuple((tuple(u.shape), u.dtype, u.device) for u in us)


class _OpCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


def _count_ops(fn: Callable, point: tuple) -> int:
    """How many tensor operations (aten calls) ``fn(*point)`` runs, forward only."""
    counter = _OpCounter()
    with torch.no_grad(), counter:
        fn(*point)
    return counter.count


class _Refused(Exception):
    """The density cannot be recorded as one graph (the message says why)."""


class _JointGraph:
    r"""D and its gradient as one straight-line graph of tensor operations: ``make_fx`` records
    ``(u_1, ..., u_n) -> ([dD/du_1, ..., dD/du_w], D(u), guards)`` at the recording point, the gradient with
    respect to the first ``density.wrt`` inputs (the forward and the backward pass of the interpreter, no
    autograd at run time), with the NUTS potential's tools (``graph_recording``): every Python read of a tensor
    value that depends on the inputs becomes a guard (``add_guards``: a call whose guards differ from the
    recording's is evaluated by the interpreter), the tensors computed from the data alone (the data checks, the
    priors' constants) are folded into constants and the ops that compute nothing new removed
    (``fold_and_simplify``), and the graph runs under
    ``torch.jit.trace`` when that gives the graph's values exactly. ``_Refused`` when a shape depends on values
    or recording fails. Called as ``D(u_1, ..., u_n)``: a scalar whose backward is the recorded gradient (first
    order; none for the inputs after the first ``wrt``)."""

    def __init__(self, density: TracedDensity, point: tuple):
        self.density = density
        try:
            with warnings.catch_warnings(), pyro.validation_enabled(False):
                warnings.simplefilter("ignore")
                self.run, graph_out = record_graph(self.grad_and_value, *point,
                                                   max_functionalized_nodes=MAX_FUNCTIONALIZED_NODES)
        except ValueDependentShape as why:
            raise _Refused(str(why)) from None
        except Exception as error:  # noqa: BLE001 - a model make_fx cannot record keeps the interpreter
            raise _Refused(f"recording failed: {type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
                           ) from None
        self.guards = graph_out[2]

    def grad_and_value(self, *us: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """([dD/du_i for the first ``wrt`` inputs], D(u)) by the interpreter and autograd (also when called under
        ``torch.inference_mode``)."""
        wrt = self.density.wrt
        with torch.inference_mode(False), torch.enable_grad():
            leaves = [u.detach().requires_grad_(True) for u in us[:wrt]]
            value = self.density.interpreted(*leaves, *us[wrt:])
            grads = torch.autograd.grad(value, leaves, allow_unused=True) if leaves else ()
        return [torch.zeros_like(u) if g is None else g for u, g in zip(leaves, grads)], value.detach()

    def evaluate(self, *us: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """(gradients, D(u)) by the graph, or by the interpreter where a guard differs."""
        try:
            grads, value, guards = self.run(*us)
        except RuntimeError:  # a shape the recording fixed does not fit these values
            return self.grad_and_value(*us)
        if not torch.equal(guards, self.guards):
            return self.grad_and_value(*us)
        return grads, value

    def __call__(self, *us: torch.Tensor) -> torch.Tensor:
        return _RecordedDensity.apply(self, *us)


class _RecordedDensity(torch.autograd.Function):
    """D(u) with the gradient the joint graph computed alongside it."""

    @staticmethod
    def forward(ctx, graph: _JointGraph, *us: torch.Tensor) -> torch.Tensor:
        grads, value = graph.evaluate(*(u.detach() for u in us))
        ctx.save_for_backward(*grads)
        ctx.rest = len(us) - len(grads)
        return value

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output: torch.Tensor):
        return (None, *(grad_output * g for g in ctx.saved_tensors), *(None,) * ctx.rest)


def _close(a: torch.Tensor, b: torch.Tensor, tol: float) -> bool:
    """Equal non-finite entries, and finite ones within ``tol * (1 + max |b|)``."""
    if a.shape != b.shape or not torch.equal(torch.isfinite(a), torch.isfinite(b)):
        return False
    finite = torch.isfinite(b)
    if not bool(finite.any()):
        return torch.equal(a[~finite], b[~finite])
    scale = 1.0 + float(b[finite].abs().max())
    return float((a[finite] - b[finite]).abs().max()) <= tol * scale and torch.equal(a[~finite], b[~finite])


def _guide_sites(guide) -> list[tuple[str, dict]]:
    return [(name, site) for name, site in guide.prototype_trace.iter_stochastic_nodes()]


def _initialize(guide, args: tuple, kwargs: dict) -> None:
    """Create the guide's parameters (autoguides make them on their first call)."""
    with poutine.block(), torch.no_grad():
        guide(*args, **kwargs)


RECORD_AFTER = 500
"""Evaluations of one layout the interpreter runs before ``guide_objective``'s density is recorded: recording
costs ~0.5-2 s (a GMM ~0.6 s, the library HMM ~1.5 s) and saves ~3-8 ms an evaluation, so it pays off only for
long fits (2000 Adam steps of SVI, not the ~250 evaluations of the exact backend's L-BFGS MAP: the iris demo took
3.8 s of CPU with every fit recorded, 1.2 s interpreted).
A fit known to be long records at its first evaluation instead (``training.record_after``: Adam with at least
this many steps)."""


def guide_objective(fmodel: Callable, guide, args: tuple, kwargs: dict, site_plan: SitePlan, trace: bool = True,
                    record_after: int = RECORD_AFTER) -> Callable[[], tuple[torch.Tensor, list]] | None:
    r"""``step() -> (loss, params)`` for fitting ``guide`` to ``fmodel`` on the compiled log joint, or None when
    the guide is not one this module knows (then Pyro's ELBO is used).

    With u the guide's sites in unconstrained space and D the ``TracedDensity`` (recorded once, ``trace=False``
    keeps the interpreter):

    - ``AutoDelta``: u = the guide's unconstrained parameters, loss = -log p(data, T(u)) with T the parameter
      store's transform (MAP in constrained space, no Jacobian: as Pyro's ELBO with a delta guide);
    - ``AutoNormal``: one reparametrized draw u = loc + scale * eps per site, theta = T(u) (``biject_to`` of the
      support), loss = log N(u; loc, scale) - [log p(data, theta) + log|dT/du|], recorded with the draw and
      log q as one graph of the guide's parameters and the noise (``NormalObjective``; eps drawn site by site);
    - ``AutoContinuous`` (AutoMultivariateNormal, AutoLowRankMultivariateNormal, AutoDiagonalNormal, IAF):
      the same with u drawn from the guide's joint posterior over all sites.

    ``params`` are the unconstrained leaves of the guide's and the model's parameters (the optimizers read them
    on the first call). The guide is initialized and the objective evaluated once here: ``NotCompilable`` (naming
    the site) if the model cannot be run so. ``step.density`` is the ``TracedDensity`` (``.reason``: why it
    runs the interpreter, None when recorded). ``step.direct() -> (loss, [(param, gradient), ...])`` evaluates a
    step's loss and gradients by the recorded graph alone, without autograd (None while the density is not
    recorded; then ``step()`` and ``backward`` do it; ``step.direct`` is None for a guide it does not cover). A
    guide with an attribute ``num_particles`` = K > 1 (e.g. ``ppl.flow_guide``'s) gets the mean of K independent
    draws' losses per step (same expectation, 1/K of the gradient's variance).
    """
    if not isinstance(guide, (AutoDelta, AutoNormal, AutoContinuous)):
        return None
    _initialize(guide, args, kwargs)
    names, transforms, draw, jacobian = _draw_function(guide)
    if isinstance(guide, AutoNormal):  # the draw and log q recorded with the density
        _, locs, raw_scales, to_scale = _normal_parts(guide)
        density = NormalObjective(fmodel, args, kwargs, site_plan, names, transforms, to_scale, trace=trace,
                                  record_after=record_after)

        def one_draw() -> torch.Tensor:
            return density(*locs, *raw_scales, *[torch.randn_like(loc) for loc in locs])

        def direct() -> tuple[torch.Tensor, list] | None:
            graph = density.recording(*locs, *raw_scales, *locs)  # the noise has the locs' layout
            if graph is None:
                return None
            noise = [torch.randn_like(loc) for loc in locs]
            with torch.inference_mode():  # no autograd bookkeeping in the graph's ~300 small ops
                grads, value = graph.evaluate(*(u.detach() for u in (*locs, *raw_scales)), *noise)
            return value, list(zip([*locs, *raw_scales], grads))
    else:
        density = TracedDensity(fmodel, args, kwargs, site_plan, names, transforms, jacobian, trace=trace,
                                record_after=record_after)

        def one_draw() -> torch.Tensor:
            us, log_q = draw()
            return log_q - density(*us)

        leaves = draw()[0] if isinstance(guide, AutoDelta) else None  # loss = -D(u) at u = the guide's leaves

        def direct() -> tuple[torch.Tensor, list] | None:
            graph = density.recording(*leaves) if leaves is not None else None
            if graph is None:
                return None
            with torch.inference_mode():
                grads, value = graph.evaluate(*(u.detach() for u in leaves))
            return -value, [(leaf, -g) for leaf, g in zip(leaves, grads)]

    with torch.no_grad():
        us, _ = draw()
        values = {name: (u if transforms[name] is None else transforms[name](u)) for name, u in zip(names, us)}
        params = _param_leaves(guide) + _model_params(fmodel, args, kwargs, values, site_plan)

    num_particles = int(getattr(guide, "num_particles", 1))
    if num_particles < 1:
        raise ValueError(f"guide.num_particles must be an integer >= 1, got {num_particles}")

    def step() -> tuple[torch.Tensor, list]:
        if num_particles == 1:
            return one_draw(), params
        return sum(one_draw() for _ in range(num_particles)) / num_particles, params

    step.density = density
    step.direct = direct if num_particles == 1 else None
    return step


def _draw_function(guide):
    """``(names, transforms, draw, jacobian)``: ``draw() -> ([u per site], log q(u))`` draws the guide's sites in
    unconstrained space (log q = 0 for a delta), ``transforms`` maps each into its support, ``jacobian``: whether
    the objective includes log|dT/du| (not for a delta: MAP in constrained space)."""
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


def _leaf(guide, attribute: str) -> torch.Tensor:
    """The unconstrained leaf of the guide's parameter ``attribute`` (e.g. "locs.loc")."""
    return pyro.get_param_store().get_param(f"{guide._pyro_name}.{attribute}").unconstrained()


def _delta_draw(guide: AutoDelta):
    sites = _guide_sites(guide)
    names = [name for name, _ in sites]
    leaves = [_leaf(guide, name) for name in names]
    transforms = {name: transform_to(site["fn"].support) for name, site in sites}  # the store's transform

    def draw():
        return leaves, 0.0

    return names, transforms, draw, False


def _normal_parts(guide: AutoNormal) -> tuple[list[str], list[torch.Tensor], list[torch.Tensor], Callable]:
    """(site names, loc leaves, unconstrained scale leaves, the scale transform) of an AutoNormal guide."""
    names = [name for name, _ in _guide_sites(guide)]
    locs = [_leaf(guide, f"locs.{name}") for name in names]
    raw_scales = [_leaf(guide, f"scales.{name}") for name in names]
    return names, locs, raw_scales, transform_to(guide.scale_constraint)


def _normal_draw(guide: AutoNormal):
    names, locs, raw_scales, to_scale = _normal_parts(guide)

    def draw():
        return normal_sample(locs, raw_scales, [torch.randn_like(loc) for loc in locs], to_scale)

    return names, {name: biject_to(site["fn"].support) for name, site in _guide_sites(guide)}, draw, True


def _continuous_draw(guide: AutoContinuous):
    sites = _guide_sites(guide)
    names = [name for name, _ in sites]

    def draw():
        posterior = guide.get_posterior()
        latent = posterior.rsample()
        unpacked = {site["name"]: u for site, u in guide._unpack_latent(latent)}
        return [unpacked[name] for name in names], posterior.log_prob(latent)

    return names, {name: biject_to(site["fn"].support) for name, site in sites}, draw, True


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
