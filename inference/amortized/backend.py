r"""Backend "amortized": SVI with a recognition (encoder) network for the local latents of a data plate,
on minibatches, optionally data-parallel over processes (torch.distributed).

For a model with global latents :math:`\theta` and, inside a plate of N data points, continuous local latents
:math:`z_n` and observations :math:`x_n`, the variational family is

.. math::
    q(\theta)\prod_n q_\phi(z_n \mid x_n), \qquad
    q(\theta) = N(u_\theta; m, \mathrm{diag}(s^2)), \quad
    q_\phi(z_n \mid x_n) = N(u_{z_n}; \mu_\phi(x_n), \mathrm{diag}(\sigma^2_\phi(x_n)))

in unconstrained space (:math:`u = T^{-1}(\cdot)`, ``biject_to`` of the support), the encoder
:math:`(\mu_\phi, \log\sigma^2_\phi)` an MLP on the point's observed values (a small conv net for images;
``encoder={site: module}`` replaces it). Each step draws a batch B of indices uniformly with replacement and
maximizes the unbiased ELBO estimate

.. math::
    \log p(\theta) - \log q(\theta) + \frac{N}{B}\sum_{n \in B}
        \big[\log p(x_n, z_n \mid \theta) - \log q_\phi(z_n \mid x_n)\big]

(reparametrized, one draw) on the compiled log density (``compiled.py``: the plate's sites scaled by N/B).
Memory is flat in N: no per-point parameter exists, the model runs on the sliced batch. ``post.encode(x_new)``
gives the local posteriors of new data without refitting.

Data parallel: when ``torch.distributed`` is initialized (e.g. under ``torchrun``), each of the W processes
draws the same batch of ``batch_size`` indices and the same noise (same seed), fits its 1/W slice, and the
gradients are averaged (all-reduce) before the step: the same update as one process on the whole batch
(``inference/distributed.py``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, NamedTuple

import pyro
import pyro.poutine as poutine
import torch
from pyro.distributions.transforms import biject_to

from ppl.analysis import Facts
from ppl.backends import Backend, Rule, Verdict, needs_normalized_density
from ppl.plan import SiteTreatment
from ppl.posterior import LogEvidence, Posterior, StateFunction

from .. import chains, compiled, distributed, training
from ..checkpoints import Checkpoints
from ..minibatch import minibatch, slice_rows
from ..results import make_posterior
from ..svae.recognition import MIN_VARIANCE, default_recognition

NAME = "amortized"
MIN_POINTS = 1000  # the compiler routes here from this many data points on (fewer: per-point guides are cheap)


@dataclass(frozen=True)
class AmortizedFacts:
    """The data plate (None if the model has none this backend can use), its size, its continuous local latents
    and observed sites (the encoder's input), and why the backend cannot run the model ("" if it can)."""

    plate: str | None
    size: int = 0
    locals: tuple[str, ...] = ()
    observed: tuple[str, ...] = ()
    problem: str = ""


def amortized_facts(graph, facts: Facts) -> AmortizedFacts:
    """Find the data plate: the outermost plate of the plated continuous latents, shared by all of them and by
    at least one observed site, indexing the first dim of each of their values."""
    plated = [s for s in facts.continuous if graph.site(s).plates]
    if not plated:
        return AmortizedFacts(None, problem="no continuous latent inside a plate (nothing local to amortize)")
    if facts.chains or facts.unenumerable:
        site = (facts.chains + facts.unenumerable)[0]
        return AmortizedFacts(None, problem=f"site '{site}' is a chain or an unbounded discrete latent")
    plate, size = graph.site(plated[0]).plates[0]
    locals_ = tuple(s for s in plated if graph.site(s).plates[0] == (plate, size))
    if len(locals_) != len(plated):
        other = next(s for s in plated if s not in locals_)
        return AmortizedFacts(None, problem=f"local latents sit in different plates ('{plated[0]}' in '{plate}', "
                                            f"'{other}' in '{graph.site(other).plates[0][0]}')")
    observed = tuple(s.name for s in graph.sites() if s.observed and s.plates and s.plates[0] == (plate, size))
    if not observed:
        return AmortizedFacts(None, problem=f"no observed site in plate '{plate}' to encode its latents from")
    for name in locals_ + observed:
        shape = graph.site(name).value_shape
        if not shape or shape[0] != size:
            return AmortizedFacts(None, problem=f"site '{name}' has shape {shape}: plate '{plate}' must index its "
                                                f"first dim (size {size})")
    return AmortizedFacts(plate, size, locals_, observed)


@needs_normalized_density
def supports(facts: Facts) -> Verdict:
    own = facts.of(NAME)
    return Verdict(False, own.problem) if own.problem else Verdict(True)


def treatments(graph, facts: Facts) -> list[SiteTreatment]:
    own = facts.of(NAME)
    rows = []
    for s in graph.sites():
        if s.observed:
            rows.append(SiteTreatment(s.name, "observed", f"{s.family}, shape {s.value_shape}"
                                      + (f", minibatched over plate '{own.plate}'" if s.name in own.observed else "")))
        elif s.name in own.locals:
            rows.append(SiteTreatment(s.name, "encoder", f"q(z_n | x_n) Gaussian in unconstrained space from an "
                                                         f"encoder network on {', '.join(own.observed)}"))
        elif s.name in facts.enumerable:
            rows.append(SiteTreatment(s.name, "enumerate", f"finite support ({s.discrete_size} values), summed out"))
        else:
            rows.append(SiteTreatment(s.name, "guide", "mean-field Gaussian in unconstrained space"))
    return rows


class AmortizedLocal(NamedTuple):
    """A local latent's posterior from the encoder: ``x`` one draw and ``mean`` = T(loc) (constrained, the
    site's shape), ``loc`` and ``scale`` of the Gaussian in unconstrained space ``(N, *unconstrained shape)``."""

    x: torch.Tensor
    mean: torch.Tensor
    loc: torch.Tensor
    scale: torch.Tensor


@dataclass(frozen=True)
class FittedEncoder:
    """What ``encode`` needs: the facts, the local sites' shapes and supports' transforms, the encoders."""

    facts: AmortizedFacts
    shapes: dict[str, tuple[int, ...]]
    transforms: dict[str, Any]
    nets: dict[str, torch.nn.Module]


def _features(observed_values: dict[str, torch.Tensor], names) -> torch.Tensor:
    """The encoder input ``(B, F)``: the plate's observed values per point, flattened, concatenated, NaN -> 0."""
    parts = [observed_values[n].reshape(observed_values[n].shape[0], -1) for n in names]
    out = parts[0] if len(parts) == 1 else torch.cat(parts, -1)
    return torch.nan_to_num(out, nan=0.0, posinf=0.0, neginf=0.0)


def _observed(model, args, kwargs, names) -> dict[str, torch.Tensor]:
    with torch.no_grad(), pyro.get_param_store().scope():
        trace = poutine.trace(model).get_trace(*args, **kwargs)
    return {n: trace.nodes[n]["value"] for n in names}


def encode_batch(fitted: FittedEncoder, features: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """site -> (loc, scale) ``(B, *unconstrained shape)`` of q(z_n | x_n) for the features ``(B, F)``."""
    out = {}
    for name, net in fitted.nets.items():
        shape = fitted.shapes[name]
        d = math.prod(shape)
        raw = net(features)
        if raw.shape[-1] != 2 * d:
            raise ValueError(f"encoder of site '{name}' must output 2 * {d} numbers per point, got {raw.shape[-1]}")
        loc, log_var = raw.reshape(-1, 2, d).unbind(-2)
        scale = (log_var.exp() + MIN_VARIANCE).sqrt()
        out[name] = (loc.reshape((-1,) + shape), scale.reshape((-1,) + shape))
    return out


def encode(fitted: FittedEncoder, model: Callable, *args, **kwargs) -> dict[str, AmortizedLocal]:
    """Local posteriors of new data ``model(*args, **kwargs)`` (``Posterior.encode``): site -> AmortizedLocal."""
    values = _observed(model, args, kwargs, fitted.facts.observed)
    generator = torch.Generator(device=next(iter(values.values())).device).manual_seed(0)  # the same draw each call
    with torch.no_grad():
        out = {}
        for name, (loc, scale) in encode_batch(fitted, _features(values, fitted.facts.observed)).items():
            transform = fitted.transforms[name]
            eps = torch.randn(loc.shape, generator=generator, device=loc.device, dtype=loc.dtype)
            out[name] = AmortizedLocal(transform(loc + scale * eps), transform(loc), loc, scale)
    return out


class _Objective:
    """The minibatch negative ELBO (module docstring); ``__call__() -> (loss, params)`` for ``training.optimize``."""

    def __init__(self, model, args, kwargs, plan, batch_size: int, encoder: dict | None, init: dict | None):
        self.model, self.args, self.kwargs = model, args, kwargs
        self.own: AmortizedFacts = plan.facts.of(NAME)
        self.fmodel = chains.fit_model(model, plan.facts)
        self.size, self.batch_size = self.own.size, batch_size
        self.mine = distributed.shard(batch_size)
        self.site_plan = compiled.SitePlan.of(plan)
        trace, self.observed_values = _small_trace(model, args, kwargs, self.own)
        self.transforms = {name: biject_to(trace.nodes[name]["fn"].support) for name in plan.facts.continuous}
        self.globals = [s for s in plan.facts.continuous if s not in self.own.locals]
        self.shapes = {name: tuple(self.transforms[name].inv.forward_shape(trace.nodes[name]["value"].shape)[1:])
                       for name in self.own.locals}
        features = _features(self.observed_values, self.own.observed)
        self.nets = {name: pyro.module(f"{NAME}.encoder.{name}", net)
                     for name, net in _networks(self.own, features, self.shapes, encoder).items()}
        start = training.init_fn(init)
        for name in self.globals:
            unconstrained = self.transforms[name].inv(start(dict(trace.nodes[name])).detach())
            pyro.param(f"{NAME}.loc.{name}", unconstrained.clone())
            pyro.param(f"{NAME}.scale.{name}", torch.full_like(unconstrained, 0.1),
                       constraint=torch.distributions.constraints.positive)
        with poutine.trace(param_only=True) as tracer:   # runs the model once on a slice: its own parameters too
            self.loss_on(torch.arange(min(2, self.size)), 1.0)
        leaves = [site["value"].unconstrained() for site in tracer.trace.nodes.values()]
        leaves += [p for net in self.nets.values() for p in net.parameters()]
        self.params = list({id(p): p for p in leaves}.values())

    def fitted(self) -> FittedEncoder:
        return FittedEncoder(self.own, self.shapes, {n: self.transforms[n] for n in self.own.locals}, self.nets)

    def _global_values(self) -> tuple[dict, torch.Tensor | float]:
        values, log_q = {}, 0.0
        for name in self.globals:
            values[name], site_log_q = compiled.gaussian_draw(pyro.param(f"{NAME}.loc.{name}"),
                                                              pyro.param(f"{NAME}.scale.{name}"), self.transforms[name])
            log_q = log_q + site_log_q
        return values, log_q

    def loss_on(self, index: torch.Tensor, scale: float, noise: dict[str, torch.Tensor] | None = None,
                outside: float = 1.0) -> torch.Tensor:
        """Negative ELBO estimate on the points ``index`` (the plate's sites and log q's scaled by ``scale``, the
        terms outside the plate by ``outside``); ``noise`` (site -> standard normal draws for these points) fixes
        the local draws."""
        args, kwargs = minibatch(self.args, self.kwargs, self.size, index)
        values, log_q = self._global_values()
        encoded = encode_batch(self.fitted(), _features(_rows(self.observed_values, index), self.own.observed))
        local_q = 0.0
        for name, (loc, sd) in encoded.items():
            values[name], site_log_q = compiled.gaussian_draw(loc, sd, self.transforms[name],
                                                              noise[name] if noise is not None else None)
            local_q = local_q + site_log_q
        site_plan = self.site_plan.scaled(outside, **{self.own.plate: scale})
        return outside * log_q + scale * local_q - compiled.log_joint(self.fmodel, args, kwargs, values, site_plan)

    def __call__(self) -> tuple[torch.Tensor, list]:
        batch = torch.randint(self.size, (self.batch_size,))
        noise = {name: torch.randn((self.batch_size,) + shape) for name, shape in self.shapes.items()}
        mine = self.mine
        loss = self.loss_on(batch[mine], self.size / (mine.stop - mine.start), {n: e[mine] for n, e in noise.items()})
        return loss, self.params


def _small_trace(model, args, kwargs, own: AmortizedFacts) -> tuple[Any, dict[str, torch.Tensor]]:
    """A trace of the model on a 2-point slice of the data (shapes, supports, prior medians) and each observed
    site's full data: the argument tensor the site observes when the slice's value is that very (sliced)
    argument, else the value in a trace on all the data. Memory stays flat in N for the usual ``obs=x``."""
    index = torch.arange(min(2, own.size))
    pairs = [(value, slice_rows(value, own.size, index)) for value in list(args) + list(kwargs.values())]
    sliced = {id(part): full for full, part in pairs if part is not full}
    small_args = tuple(part for _, part in pairs[:len(args)])
    small_kwargs = dict(zip(kwargs, (part for _, part in pairs[len(args):])))
    with torch.no_grad(), pyro.get_param_store().scope():
        small = poutine.trace(model).get_trace(*small_args, **small_kwargs)
        observed = {n: sliced.get(id(small.nodes[n]["value"])) for n in own.observed}
        if any(v is None for v in observed.values()):
            full = poutine.trace(model).get_trace(*args, **kwargs)
            observed = {n: full.nodes[n]["value"] for n in own.observed}
    return small, observed


def _rows(full: dict[str, torch.Tensor], index: torch.Tensor) -> dict[str, torch.Tensor]:
    """The observed values of the batch: the full data's rows ``index``."""
    return {name: value.index_select(0, index.to(value.device)) for name, value in full.items()}


def _networks(own: AmortizedFacts, features: torch.Tensor, shapes: dict, encoder: dict | None) -> dict:
    encoder = dict(encoder or {})
    unknown = sorted(set(encoder) - set(own.locals))
    if unknown:
        raise ValueError(f"encoder= names unknown site(s) {unknown}; the local latents are {list(own.locals)}")
    nets = {}
    for name in own.locals:
        if name in encoder and not isinstance(encoder[name], torch.nn.Module):
            raise TypeError(f"encoder['{name}'] must be a torch.nn.Module, got {type(encoder[name]).__name__}")
        net = encoder.get(name) or default_recognition(tuple(features.shape[1:]), math.prod(shapes[name]))
        nets[name] = net.to(device=features.device, dtype=features.dtype)
    return nets


def _check_batch_size(batch_size, size: int) -> int:
    if batch_size is None:
        return min(size, 256)
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    return batch_size


def run(model, args, kwargs, plan, num_steps: int = 2000, lr: float = 0.01, num_samples: int = 100,
        batch_size: int | None = None, encoder: dict | None = None, init: dict | None = None,
        progress: bool = True, checkpoint: str | None = None, checkpoint_every: int = 100,
        resume: str | None = None, **unused) -> Posterior:
    """Fit the encoder, the global q's and the model's parameters on minibatch ELBOs.

    Options: num_steps (Adam steps), lr (constant for the first half, then a cosine down to lr / 10:
    ``training.cosine_tail``), batch_size (points per step, all processes together; default
    min(N, 256)), encoder (site -> nn.Module ``(B, F) -> (B, 2 d)`` emitting mean and log variance of the d
    unconstrained numbers of a point's local latent), init (site -> initial value of a global), num_samples
    (draws of the globals kept), checkpoint / checkpoint_every / resume (as the svi backend).
    """
    if unused:
        raise TypeError(f"backend '{NAME}' got unexpected options: {', '.join(unused)}")
    own: AmortizedFacts = plan.facts.of(NAME)
    if own.problem:
        raise ValueError(f"backend '{NAME}' cannot run model '{plan.model_name}': {own.problem}")
    batch_size = _check_batch_size(batch_size, own.size)
    checkpoints = Checkpoints.from_options(checkpoint, checkpoint_every, resume)
    objective = _Objective(model, args, kwargs, plan, batch_size, encoder, init)
    progress, checkpoints = distributed.main_only(progress, checkpoints)
    history = training.optimize(objective, num_steps, lr, progress, f"{NAME} (batch {batch_size})", checkpoints,
                                after_backward=distributed.average_gradients, schedule=training.cosine_tail,
                                max_grad_norm=training.NETWORK_MAX_GRAD_NORM)
    return _collect(model, args, kwargs, plan, objective, history, num_samples)


def _collect(model, args, kwargs, plan, objective: _Objective, history, num_samples: int) -> Posterior:
    """Draws of the globals from q, the locals' encoder means on the training data, the full-data ELBO."""
    own = objective.own
    with torch.no_grad():
        draws = {name: [] for name in objective.globals}
        for _ in range(num_samples):
            values, _ = objective._global_values()
            for name in objective.globals:
                draws[name].append(values[name])
        draws = {name: torch.stack(v)[None] for name, v in draws.items()}
        point = {name: objective.transforms[name](pyro.param(f"{NAME}.loc.{name}")) for name in objective.globals}
        fitted = objective.fitted()
        locals_ = {name: [] for name in own.locals}
        for start in range(0, own.size, 4096):
            index = torch.arange(start, min(own.size, start + 4096))
            features = _features(_rows(objective.observed_values, index), own.observed)
            for name, (loc, _) in encode_batch(fitted, features).items():
                locals_[name].append(objective.transforms[name](loc))
        means = {name: torch.cat(v) for name, v in locals_.items()}
        elbo = -_full_loss(objective)
    return make_posterior(plan, model, args, kwargs, draws=draws, point={**point, **means},
                          log_evidence=LogEvidence(elbo, "elbo (amortized, one draw)"), history=history,
                          smoothed_means=means, networks=dict(objective.nets),
                          encoder=StateFunction(encode_model, (fitted, model)))


def _full_loss(objective: _Objective, chunk: int = 4096) -> float:
    """The negative ELBO on all the data (one draw of the globals, the same for every chunk), chunk by chunk:
    the terms outside the data plate (the globals' priors and log q) counted once."""
    total = 0.0
    for start in range(0, objective.size, chunk):
        index = torch.arange(start, min(objective.size, start + chunk))
        pyro.set_rng_seed(0)
        total += float(objective.loss_on(index, 1.0, outside=1.0 if start == 0 else 0.0))
    return total


def encode_model(state: tuple[FittedEncoder, Callable], *args, **kwargs) -> dict[str, AmortizedLocal]:
    fitted, model = state
    return encode(fitted, model, *args, **kwargs)


def _many_local_points(f: Facts) -> bool:
    own = f.of(NAME)
    return not own.problem and own.size >= MIN_POINTS


RULES = (
    Rule("amortized-locals", _many_local_points, NAME,
         f"continuous local latents in a data plate of at least {MIN_POINTS} points: an encoder network gives "
         "q(z_n | x_n) (amortized), fitted on minibatches (memory flat in N)", order=900),
)

BACKEND = Backend(NAME, run=run, supports=supports, treatments=treatments, rules=RULES,
                  facts=amortized_facts)
