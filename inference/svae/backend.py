"""Backend "svae": structured variational autoencoders (Johnson, Duvenaud, Wiltschko, Datta &
Adams, NIPS 2016), generic over the model.

For every latent Gaussian node or chain with neural observed children (an ``SVAETarget``), a
recognition network emits Gaussian potentials; local inference is exact message passing
(LDS: Kalman; Gaussian node: closed form) or structured mean field (mixture: q(z)q(x);
switching LDS: alternating HMM and Kalman messages). The decoder, the recognition networks
and the global parameters (point estimates, MAP) are trained jointly by Adam on the ELBO,
with reparameterized gradients through the message passing.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import pyro
import pyro.poutine as poutine
import torch
from pyro.infer.autoguide import AutoDelta

from ppl.analysis import Facts
from ppl.backends import Backend, Rule, Verdict, needs_normalized_density
from ppl.compiler import compile as compile_model
from ppl.plan import SiteTreatment
from ppl.posterior import LogEvidence, Posterior, StateFunction

from ..results import make_posterior
from ..checkpoints import Checkpoints
from ..training import LoopState, init_fn, optimize, traced_loss
from .conjugate import DirichletConjugate, MNIWConjugate, NIWConjugate, describe, natural_gradient_sites
from .conjugate import build as build_conjugates
from .facts import Kind, svae_facts
from .objective import SVAEObjective
from .recognition import default_recognition, potentials

NAME = "svae"
MESSAGES = {Kind.LDS: "Kalman smoother (exact)", Kind.GAUSSIAN: "closed-form Gaussian posterior (exact)",
            Kind.MIXTURE: "mean field q(z)q(x): categorical and Gaussian updates",
            Kind.SLDS: "structured mean field: HMM forward-backward <-> Kalman smoother"}


@needs_normalized_density
def supports(facts: Facts) -> Verdict:
    """Runs when some latent Gaussian node or chain has a neural observed child and every other discrete
    latent or chain belongs to such a target (as its mixture assignment or switch)."""
    targets = facts.of(NAME).targets
    if not targets:
        return Verdict(False, "no latent Gaussian node or chain has a neural observed child (nothing for a "
                              "recognition network to emit potentials on)")
    parents = {t.discrete for t in targets.values() if t.discrete}
    for site in facts.enumerable + facts.markov_chains:
        if site not in parents:
            return Verdict(False, f"discrete latent '{site}' is not the mixture/switch of an SVAE target")
    for site in facts.gaussian_chains:
        if site not in targets:
            return Verdict(False, f"gaussian_chain '{site}' has no neural observed child")
    return Verdict(True)


def treatments(graph, facts: Facts):
    """Targets: recognition potentials; their discrete parents: message passing; conjugate globals: natural
    gradients; other globals: MAP point estimates."""
    sfacts = facts.of(NAME)
    targets = sfacts.targets
    parents = {t.discrete: t for t in targets.values() if t.discrete}
    rows = []
    for s in graph.sites():
        if s.name in targets:
            t = targets[s.name]
            rows.append(SiteTreatment(s.name, "recognition potential",
                                      f"network on {', '.join(t.children)} -> Gaussian potentials (J, h) on "
                                      f"{t.node_shape} nodes of dim {t.dim}; {MESSAGES[t.kind]}"))
        elif s.name in parents:
            rows.append(SiteTreatment(s.name, "message passing", f"q({s.name}) by {MESSAGES[parents[s.name].kind]}"))
        elif s.name in natural_gradient_sites(sfacts):
            rows.append(SiteTreatment(s.name, "natural gradient", describe(s.name, sfacts)))
        elif s.observed:
            rows.append(SiteTreatment(s.name, "observed", ("neural likelihood: reconstruction term" if s.neural
                                                           else f"{s.family}")))
        else:
            rows.append(SiteTreatment(s.name, "point estimate", "global: MAP, trained jointly with the networks"))
    return rows


def _recognition_masks(trace, targets) -> dict[str, torch.Tensor | None]:
    """Per target, a boolean ``node_shape`` mask: a node whose children are all masked out (missing
    data) gets no recognition potential. None where every node is observed."""
    out = {}
    for name, t in targets.items():
        masks = [trace.nodes[c]["mask"] for c in t.children if isinstance(trace.nodes[c]["mask"], torch.Tensor)]
        if not masks:
            out[name] = None
            continue
        seen = torch.zeros(t.node_shape, dtype=torch.bool, device=masks[0].device)
        for m in masks:
            seen = seen | m.expand(t.node_shape)
        out[name] = seen
    return out


def _recognition_inputs(model, args, kwargs, targets) -> tuple[dict[str, torch.Tensor], dict]:
    """Each target's recognition input (its children's data, features flattened and concatenated)
    and its node mask."""
    trace = poutine.trace(model).get_trace(*args, **kwargs)
    out = {}
    for name, t in targets.items():
        parts = [trace.nodes[c]["value"] for c in t.children]
        n = len(t.node_shape)
        if len(parts) == 1:
            out[name] = parts[0]
        else:
            out[name] = torch.cat([p.reshape(tuple(t.node_shape) + (-1,)) for p in parts], -1)
        if tuple(out[name].shape[:n]) != tuple(t.node_shape):
            raise ValueError(f"site '{name}': data of {t.children} has shape {tuple(out[name].shape)}; its leading dims "
                             f"must index the latent nodes {tuple(t.node_shape)}")
    return out, _recognition_masks(trace, targets), trace


def _networks(targets, inputs, recognition: dict | None) -> dict[str, torch.nn.Module]:
    recognition = dict(recognition or {})
    unknown = sorted(set(recognition) - set(targets))
    if unknown:
        raise ValueError(f"recognition= names unknown site(s) {unknown}; SVAE targets are {sorted(targets)}")
    nets = {}
    for name, t in targets.items():
        y = inputs[name]
        net = recognition.get(name) or default_recognition(tuple(y.shape[len(t.node_shape):]), t.dim)
        nets[name] = net.to(device=y.device, dtype=y.dtype)
    return nets


class _Step:
    """One evaluation of the negative ELBO; keeps the last terms."""

    def __init__(self, model, args, kwargs, facts, nets, inputs, masks, guide, num_iters,
                 conjugates: dict | None = None, natgrad_step: float = 0.5):
        self.model, self.args, self.kwargs = model, args, kwargs
        self.targets, self.nets, self.inputs, self.guide = facts.of(NAME).targets, nets, inputs, guide
        self.masks = masks
        self.conjugates = conjugates or {}
        self.natgrad_step = natgrad_step
        self.globals = set(facts.continuous) - set(self.targets) - set(self.conjugates)
        self.num_iters = num_iters
        self.terms: dict[str, list[float]] = {"recon": [], "local_kl": [], "global_term": [], "global_kl": []}

    def run(self, generator=None, point: dict | None = None) -> SVAEObjective:
        """One pass of the model under ``SVAEObjective`` with the networks' potentials, globals at ``point``
        (the guide's value if None) and conjugate q's plugged in; returns the handler (terms, locals)."""
        if point is None:
            point = self.guide(*self.args, **self.kwargs) if self.guide is not None else {}
        pots = {}
        for name, t in self.targets.items():
            net = pyro.module(f"{name}_recognition", self.nets[name])
            J, h = potentials(net, self.inputs[name], t.node_shape, t.dim)
            if self.masks[name] is not None:
                keep = self.masks[name].to(h.dtype)
                J, h = J * keep[..., None, None], h * keep[..., None]
            pots[name] = (J, h)
        point = dict(point, **{c.site: c.point() for c in self.conjugates.values()})
        dirichlets = [c for c in self.conjugates.values() if isinstance(c, DirichletConjugate)]
        niws = [c for c in self.conjugates.values() if isinstance(c, NIWConjugate)]
        mniws = [c for c in self.conjugates.values() if isinstance(c, MNIWConjugate)]
        handler = SVAEObjective(self.targets, pots, self.globals, self.num_iters, generator,
                                expected_log_weights={c.child: c.expected_log() for c in dirichlets},
                                skip_sites=set(self.conjugates),
                                component_log_offsets={c.target: c.log_offsets() for c in niws},
                                expected_dynamics={c.target: (c.site, c.plug_in(), c.expectations())
                                                   for c in mniws})
        with handler:
            poutine.condition(self.model, data=point)(*self.args, **self.kwargs)
        handler.global_kl = sum((c.kl() for c in self.conjugates.values()), torch.zeros(()))
        return handler

    def natural_gradient_step(self, handler: SVAEObjective) -> None:
        """Move each conjugate q toward its optimum given the new local posteriors."""
        for c in self.conjugates.values():
            c.update_from(handler, self.natgrad_step)

    def state(self) -> dict:
        """What the step updates outside the parameters: the conjugate q's natural parameters, the ELBO terms."""
        return {"natparams": {site: c.natparam for site, c in self.conjugates.items()},
                "terms": {k: list(v) for k, v in self.terms.items()}}

    def load_state(self, state: dict) -> None:
        for site, natparam in state["natparams"].items():
            self.conjugates[site].natparam = natparam
        for key, values in state["terms"].items():
            self.terms[key][:] = values

    def __call__(self) -> torch.Tensor:
        h = self.run()
        for key in self.terms:
            self.terms[key].append(float(torch.as_tensor(getattr(h, key)).detach()))
        self.natural_gradient_step(h)
        return -(h.recon - h.local_kl + h.global_term - h.global_kl)


def run(model, args, kwargs, plan, num_steps: int = 1000, lr: float = 0.01, num_samples: int = 100,
        recognition: dict | None = None, num_iters: int = 3, init: dict | None = None,
        natgrad_step: float = 0.5, progress: bool = True, checkpoint: str | None = None,
        checkpoint_every: int = 100, resume: str | None = None, **unused) -> Posterior:
    """Train decoder, recognition networks and globals on the SVAE ELBO.

    Options: num_steps, lr (Adam), recognition (site -> nn.Module replacing the default network),
    num_iters (mean-field iterations), init (site -> initial value of a global), num_samples,
    natgrad_step (step size of the natural-gradient updates of conjugate globals: a Dirichlet on mixture
    weights, a ``ppl.NormalInverseWishart`` on mixture components, a ``ppl.MatrixNormalInverseWishart`` on an
    LDS chain's dynamics and noise; ``init`` may give the starting value of the latter two, packed
    ``(K, D, D + 1)`` and ``(D, 2 D)``), checkpoint (a file written every ``checkpoint_every`` steps, at the end
    and on Ctrl-C: parameters, Adam moments, RNG and the conjugate q's), resume (a checkpoint file of the same fit:
    continues it bit-identically, ``inference/checkpoints.py``).
    """
    if unused:
        raise TypeError(f"backend 'svae' got unexpected options: {', '.join(unused)}")
    facts = plan.facts
    targets = facts.of(NAME).targets
    inputs, masks, trace = _recognition_inputs(model, args, kwargs, targets)
    nets = _networks(targets, inputs, recognition)
    conjugates = build_conjugates(trace, facts.of(NAME), init)
    global_sites = [s for s in facts.continuous if s not in targets and s not in conjugates]
    guide = None
    if global_sites:
        guide = AutoDelta(poutine.block(model, expose=global_sites), init_loc_fn=init_fn(init))
    step = _Step(model, args, kwargs, facts, nets, inputs, masks, guide, num_iters, conjugates, natgrad_step)
    checkpoints = Checkpoints.from_options(checkpoint, checkpoint_every, resume)
    history = optimize(traced_loss(step), num_steps, lr, progress, NAME, checkpoints,
                       LoopState(step.state, step.load_state))
    return _collect(plan, step, history, num_samples, model, args, kwargs)


@dataclass(frozen=True)
class FittedSVAE:
    """What amortized inference needs after training: the model and the data it was fitted to (with their
    facts), the recognition networks, the conjugate q's, the point estimate of the other globals and the
    number of mean-field iterations. The state of ``sample_locals`` and ``encode``."""

    model: Callable
    args: tuple
    kwargs: dict
    facts: Facts
    nets: dict[str, torch.nn.Module]
    conjugates: dict[str, Any]
    point: dict[str, torch.Tensor]
    num_iters: int


def _collect(plan, step: _Step, history, num_samples, model, args, kwargs) -> Posterior:
    targets = plan.facts.of(NAME).targets
    draws_q: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        final = step.run(torch.Generator(device=_device(step)).manual_seed(0))
        point = {k: v.detach() for k, v in (step.guide(*args, **kwargs) if step.guide else {}).items()}
    discrete = {t.discrete: final.locals[n].probs.detach() for n, t in targets.items() if t.discrete}
    means = {n: final.locals[n].mean.detach() for n in targets}
    elbo = float(final.recon - final.local_kl + final.global_term - final.global_kl)
    fitted = FittedSVAE(model, tuple(args), dict(kwargs), plan.facts, dict(step.nets), dict(step.conjugates),
                        dict(point), step.num_iters)
    for c in step.conjugates.values():
        point[c.site] = c.point()
        draws_q[c.site] = c.sample(num_samples)
    return make_posterior(
        plan, model, args, kwargs,
        draws={k: draws_q[k][None] if k in draws_q else v[None, None] for k, v in point.items()},
        log_evidence=LogEvidence(elbo, "elbo (svae, globals at point estimate)"), point=point,
        discrete=discrete, smoothed_means=means, history=history, elbo_terms=step.terms, networks=step.nets,
        local_sampler=StateFunction(sample_locals, fitted), encoder=StateFunction(encode, fitted))


def _local_step(fitted: FittedSVAE, args: tuple, kwargs: dict, facts: Facts) -> _Step:
    """A training-free ``_Step`` on ``model(*args, **kwargs)`` with the fitted networks and globals."""
    inputs, masks, _ = _recognition_inputs(fitted.model, args, kwargs, facts.of(NAME).targets)
    return _Step(fitted.model, args, kwargs, facts, fitted.nets, inputs, masks, None, fitted.num_iters,
                 fitted.conjugates, 0.0)


def sample_locals(fitted: FittedSVAE, n: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """``n`` draws of every SVAE target from its local q on the fitted data: site -> ``(n, *node_shape, D)``.

    ``generator`` (CPU) seeds the draws, on the data's device."""
    with torch.no_grad():
        step = _local_step(fitted, fitted.args, fitted.kwargs, fitted.facts)
        seed = int(torch.randint(2 ** 62, (1,), generator=generator))
        gen = torch.Generator(device=_device(step)).manual_seed(seed)
        runs = [step.run(gen, fitted.point) for _ in range(n)]
    return {name: torch.stack([r.locals[name].x for r in runs]) for name in step.targets}


def encode(fitted: FittedSVAE, *args, **kwargs) -> dict:
    """Amortized local inference on new data ``model(*args, **kwargs)`` with the trained networks and globals:
    site -> ``Local`` (mean, discrete marginals, a sample, KL). Masked children give no potential.

    ``Posterior.encode`` runs it in a parameter store holding only the fitted parameters: ``ppl.module`` copies
    the store's tensors into a module of the same name, so encoding under the caller's store would let two
    fitted models with equally named networks (e.g. "decoder") overwrite each other's weights."""
    facts = compile_model(fitted.model, *args, backend=NAME, **kwargs).facts
    with torch.no_grad():
        step = _local_step(fitted, args, kwargs, facts)
        return step.run(torch.Generator(device=_device(step)).manual_seed(0), fitted.point).locals


def _device(step: _Step) -> torch.device:
    return next(iter(step.inputs.values())).device


def _neural_structured(f: Facts) -> bool:
    return bool(f.of(NAME).targets) and bool(f.neural)


RULES = (
    Rule("neural-structured", _neural_structured, NAME,
         "neural likelihood on structured Gaussian latents: recognition networks emit potentials, local "
         "inference by message passing (structured VAE); networks and globals trained on the ELBO", order=40),
)

BACKEND = Backend(NAME, run=run, supports=supports, treatments=treatments, rules=RULES, facts=svae_facts)
