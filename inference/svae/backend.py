"""Backend "svae": structured variational autoencoders (Johnson, Duvenaud, Wiltschko, Datta &
Adams, NIPS 2016), generic over the model.

For every latent Gaussian node or chain with neural observed children (an ``SVAETarget``), a
recognition network emits Gaussian potentials; local inference is exact message passing
(LDS: Kalman; Gaussian node: closed form) or structured mean field (mixture: q(z)q(x);
switching LDS: alternating HMM and Kalman messages). The decoder, the recognition networks
and the global parameters (point estimates, MAP) are trained jointly by Adam on the ELBO,
with reparameterized gradients through the message passing. Conjugate globals (a Dirichlet on
mixture weights, a normal-inverse-Wishart on mixture components, a matrix-normal-inverse-Wishart
on a chain's dynamics) get a variational factor instead, moved after every step by the vi
backend's natural-gradient update of its family (``conjugate.py``, ``inference/vi/families.py``).
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Callable

import pyro
import pyro.poutine as poutine
import torch
from pyro.distributions.util import scale_and_mask
from pyro.infer.autoguide import AutoDelta
from torch.overrides import TorchFunctionMode

from ppl.analysis import Facts
from ppl.backends import Backend, Rule, Verdict, needs_normalized_density
from ppl.compiler import compile as compile_model
from ppl.plan import SiteTreatment
from ppl.posterior import LogEvidence, Posterior, StateFunction

from .. import distributed
from ..initialization import align_labels
from ..results import make_posterior, warn_if_nearly_empty
from ..checkpoints import Checkpoints
from ..minibatch import batch_rows, check_batch_size, minibatch
from ..training import (NETWORK_MAX_GRAD_NORM, LoopState, cosine_tail, init_fn, optimize, traced_loss,
                        warn_if_still_moving)
from .conjugate import (DirichletConjugate, MNIWConjugate, NIWConjugate, describe, mixture_statistics,
                        natural_gradient_sites)
from .conjugate import build as build_conjugates
from .facts import Kind, svae_facts
from .objective import SVAEObjective
from .recognition import default_recognition, potentials
from .warmup import (MAP_STEPS, PRETRAIN_LR, PRETRAIN_STEPS, latent_targets, mixture_labels, pretrain_recognition,
                     soft_labels)

NAME = "svae"
WARMUP = 400   # default steps with the mixtures' q(z) held at data-driven labels (at most num_steps // 2; warmup.py)
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
            start = ("; held at labels of the data (k-means++ on its principal components, refined by full-covariance "
                     "Gaussian-mixture EM) for the first warmup= steps (data-driven start: default recognition network "
                     "pretrained to the principal components with each cluster made spherical, point-estimate globals "
                     "at their complete-data MAP, decoders fitted to the data from those latents)"
                     if parents[s.name].kind == Kind.MIXTURE else "")
            rows.append(SiteTreatment(s.name, "message passing",
                                      f"q({s.name}) by {MESSAGES[parents[s.name].kind]}{start}"))
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
                 conjugates: dict | None = None, natgrad_step: float = 0.5, fixed: dict | None = None,
                 warmup: int = 0):
        self.model, self.args, self.kwargs = model, args, kwargs
        self.fixed, self.warmup, self.calls, self.rows = fixed or {}, warmup, 0, None
        self.targets, self.nets, self.inputs, self.guide = facts.of(NAME).targets, nets, inputs, guide
        self.masks = masks
        self.conjugates = conjugates or {}
        self.natgrad_step = natgrad_step
        self.globals = set(facts.continuous) - set(self.targets) - set(self.conjugates)
        self.num_iters = num_iters
        self.terms: dict[str, list[float]] = {"recon": [], "local_kl": [], "global_term": [], "global_kl": []}

    def warming_up(self) -> bool:
        """Whether the next training step holds the mixtures' q(z) at their data-driven labels (``warmup.py``)."""
        return bool(self.fixed) and self.calls < self.warmup

    def run(self, generator=None, point: dict | None = None, clamp: bool = False) -> SVAEObjective:
        """One pass of the model under ``SVAEObjective`` with the networks' potentials, globals at ``point``
        (the guide's value if None) and conjugate q's plugged in; returns the handler (terms, locals).
        ``clamp``: the mixtures' q(z) held at ``self.fixed`` (their rows ``self.rows`` in a minibatch)."""
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
                                                   for c in mniws},
                                fixed_responsibilities=self._fixed_rows() if clamp else None)
        with handler:
            poutine.condition(self.model, data=point)(*self.args, **self.kwargs)
        handler.global_kl = sum((c.kl() for c in self.conjugates.values()), torch.zeros(()))
        return handler

    def _fixed_rows(self) -> dict:
        if self.rows is None:
            return self.fixed
        return {n: v[self.rows.to(v.device)] for n, v in self.fixed.items()}

    def natural_gradient_step(self, handler: SVAEObjective) -> None:
        """Move each conjugate q toward its optimum given the new local posteriors."""
        for c in self.conjugates.values():
            c.update_from(handler, self.natgrad_step)

    def state(self) -> dict:
        """What the step updates outside the parameters: the conjugate q's (their vi family's params), the ELBO
        terms."""
        return {"q": {site: c.q for site, c in self.conjugates.items()},
                "terms": {k: list(v) for k, v in self.terms.items()}, "calls": self.calls}

    def load_state(self, state: dict) -> None:
        for site, q in state.get("q", {}).items():
            self.conjugates[site].q = tuple(q)
        for site, natparam in state.get("natparams", {}).items():   # a checkpoint written before the q's were
            self.conjugates[site].natparam = natparam                # the vi families' (expfam natural parameters)
        for key, values in state["terms"].items():
            self.terms[key][:] = values
        self.calls = state.get("calls", len(next(iter(state["terms"].values()), [])))

    def __call__(self) -> torch.Tensor:
        h = self.run(clamp=self.warming_up())
        self.calls += 1
        for key in self.terms:
            self.terms[key].append(float(torch.as_tensor(getattr(h, key)).detach()))
        self.natural_gradient_step(h)
        return -(h.recon - h.local_kl + h.global_term - h.global_kl)


class _ShardedNoise(TorchFunctionMode):
    """Inside this mode, process r of W answers ``torch.randn(shape, generator=g)`` (g the step's generator) with
    rows ``[r s_0, (r + 1) s_0)`` of ``torch.randn((W s_0, *shape[1:]), generator=g)``: every process draws the
    whole batch's noise from the same stream and keeps its rows. When the local solver draws its noise rows-first
    (Gaussian nodes, mixtures, the banded LDS smoother), each data point gets the noise it gets in one process on
    the whole batch, so W processes reproduce that run; any other layout (the scan smoother's column layout) still
    gets independent standard normals, only not the same ones. Cost: every torch call of the model run passes
    through the mode (measured 20-30 % of an LDS-SVAE step's forward and backward on CPU, 16 sequences); used only
    when W > 1."""

    def __init__(self, generator: torch.Generator, rank: int, world: int):
        super().__init__()
        self.generator, self.rank, self.world = generator, rank, world

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if kwargs.get("generator") is not self.generator:
            return func(*args, **kwargs)
        if func is not torch.randn:
            raise NotImplementedError(f"svae data parallel: the local step drew noise with {func.__name__}; only "
                                      "torch.randn is split between the processes")
        size = kwargs.pop("size", None)
        if size is None:
            size = args[0] if len(args) == 1 and not isinstance(args[0], int) else args
        shape = tuple(size)
        rows = shape or (1,)
        full = torch.randn((self.world * rows[0],) + rows[1:], **kwargs)
        return full[self.rank * rows[0]:(self.rank + 1) * rows[0]].reshape(shape)


def data_rows(targets: dict, trace, global_sites) -> int:
    """N, the data points (or sequences) a minibatch draws from: the leading node dim every SVAE target shares.

    ValueError naming the site when a target has no such dim (a single chain: its time steps are not
    exchangeable), when the targets disagree, or when an observed site does not have the N rows first (its
    log-density would be scaled by N / B without being a sum over the data points)."""
    sizes = {}
    for name, t in targets.items():
        chain = t.kind in (Kind.LDS, Kind.SLDS)
        if len(t.node_shape) < (2 if chain else 1):
            what = "sequences (a chain's nodes (N, T))" if chain else "data points (nodes (N, ...))"
            raise ValueError(f"site '{name}': batch_size= and data parallel training split a batch of {what}; its "
                             f"nodes have shape {tuple(t.node_shape)}")
        sizes[name] = t.node_shape[0]
    if len(set(sizes.values())) > 1:
        raise ValueError(f"batch_size= needs the SVAE targets to share their leading data dim, got {sizes}")
    size = next(iter(sizes.values()))
    for name, node in trace.nodes.items():
        if node["type"] == "sample" and node["is_observed"] and name not in global_sites:
            shape = tuple(node["value"].shape)
            if not shape or shape[0] != size:
                raise ValueError(f"site '{name}': batch_size= scales the likelihood by N / B, so every observed site "
                                 f"needs the N = {size} data points first; its value has shape {shape}")
    return size


class _Minibatches:
    r"""The SVAE's negative ELBO on a minibatch of B of the N data points (sequences), data parallel.

    Each step draws B distinct rows uniformly (``minibatch.batch_rows``: the same rows on every process, same
    seed); process r of W keeps its B/W (``distributed.shard``), runs the model on those rows (the model's
    arguments, recognition inputs and masks sliced) and returns

    .. math::
        -\Big[\tfrac{N}{B/W}\big(\text{recon} - \text{local KL}\big) + \log p(\theta)
              - \mathrm{KL}(q(\phi)\|p(\phi))\Big]

    unbiased for the full-data objective (a row is in the batch with probability B/N). The network and MAP
    gradients are averaged over the processes (``distributed.average_gradients``). A conjugate global's
    natural-gradient step uses the expected statistics of the whole batch, scaled to the data set:
    :math:`\eta \leftarrow (1-\rho)\eta + \rho(\eta_0 + \frac{N}{B}\sum_{n\in B} s_n)` with
    :math:`\sum_{n\in B} = W\cdot\mathrm{mean}_r\sum_{n\in B_r}` (all-reduced), so every process holds the same
    q. The local noise is drawn for the whole batch from a generator seeded each step (``_ShardedNoise``).
    Recorded terms (``post.elbo_terms``) and the loss are this process's estimates.
    """

    def __init__(self, step: _Step, size: int, batch_size: int | None):
        self.step, self.size = step, size
        self.batch_size = size if batch_size is None else min(batch_size, size)
        self.mine = distributed.shard(self.batch_size)
        self.rank, self.world = distributed.world()
        self.full = (step.args, step.kwargs, step.inputs, step.masks, step.targets)

    def restore(self) -> None:
        """Put the whole data set back into the step (for the final full-data pass)."""
        self.step.args, self.step.kwargs, self.step.inputs, self.step.masks, self.step.targets = self.full
        self.step.rows = None

    def _select(self, rows: torch.Tensor) -> None:
        args, kwargs, inputs, masks, targets = self.full
        step = self.step
        step.args, step.kwargs = minibatch(args, kwargs, self.size, rows)
        step.inputs = {n: v[rows.to(v.device)] for n, v in inputs.items()}
        step.masks = {n: None if m is None else m[rows.to(m.device)] for n, m in masks.items()}
        step.targets = {n: replace(t, node_shape=(len(rows),) + tuple(t.node_shape[1:])) for n, t in targets.items()}
        step.rows = rows

    def __call__(self) -> torch.Tensor:
        rows = batch_rows(self.size, self.batch_size, None)[self.mine]
        seed = int(torch.randint(2 ** 62, (1,)))
        return self.loss_on(rows, torch.Generator(device=_device(self.step)).manual_seed(seed))

    def loss_on(self, rows: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """The negative ELBO estimate on this process's ``rows`` (its local terms scaled by N / len(rows)), the
        noise from ``generator``; moves the conjugate q's by their natural-gradient step and records the terms."""
        step = self.step
        self._select(rows)
        clamp = step.warming_up()
        step.calls += 1
        if self.world > 1:
            with _ShardedNoise(generator, self.rank, self.world):
                h = step.run(generator, clamp=clamp)
        else:
            h = step.run(generator, clamp=clamp)
        scale = self.size / len(rows)
        recon, local_kl = scale * h.recon, scale * h.local_kl
        for key, value in (("recon", recon), ("local_kl", local_kl), ("global_term", h.global_term),
                           ("global_kl", h.global_kl)):
            step.terms[key].append(float(torch.as_tensor(value).detach()))
        for c in step.conjugates.values():   # N / B times the batch's statistics, averaged over the processes
            c.update(tuple(distributed.average(scale * s) for s in c.statistics(h)), step.natgrad_step)
        return -(recon - local_kl + h.global_term - h.global_kl)


def warmup_labels(plan, targets: dict, inputs: dict, seed: int) -> dict[str, torch.Tensor]:
    """Mixture target -> data-driven labels ``(*node_shape)`` of its recognition input (``warmup.py``), for every
    mixture with at least K nodes."""
    out = {}
    for name, t in targets.items():
        if t.kind != Kind.MIXTURE:
            continue
        K = plan.graph.site(t.discrete).discrete_size
        y = inputs[name]
        if K is None or K < 2 or int(torch.Size(t.node_shape).numel()) < K:
            continue
        out[name] = mixture_labels(y, t.node_shape, K, seed)
    return out


def recognition_means(step: _Step) -> dict[str, torch.Tensor]:
    """Target -> the means its recognition network emits on the data: ``(*node_shape, D)``, detached."""
    out = {}
    with torch.no_grad():
        for name, t in step.targets.items():
            J, h = potentials(step.nets[name], step.inputs[name], t.node_shape, t.dim)
            out[name] = h / J.diagonal(dim1=-2, dim2=-1)
    return out


def complete_data_map(step: _Step, labels: dict[str, torch.Tensor], num_steps: int = MAP_STEPS) -> None:
    r"""Move the point-estimate globals (``step.guide``) to the MAP of the complete-data model: each mixture's
    assignment fixed at ``labels`` (target -> ``(*node_shape)``) and its latent node at the recognition network's
    means, maximizing :math:`\log p(\theta) + \sum_n \log p(z_n \mid \theta) + \log p(x_n \mid z_n, \theta)`
    (observed sites left out; conjugate globals at their q's point) by L-BFGS, at most ``num_steps`` evaluations
    (deterministic; the start is kept if it fails).
    The conjugate q's move to their complete-data posteriors (one natural-gradient step of size 1 from the hard
    assignments, q(x) a point). The mixtures' components then start where their clusters are."""
    targets = {n: t for n, t in step.targets.items() if n in labels}
    means = recognition_means(step)
    data = {}
    for name, t in targets.items():
        data[t.discrete], data[name] = labels[name], means[name]
    for c in step.conjugates.values():
        if c.target in labels:
            z, x = labels[c.target].reshape(-1), means[c.target].reshape(-1, means[c.target].shape[-1])
            onehot = torch.nn.functional.one_hot(z, step.fixed[c.target].shape[-1]).to(x.dtype)
            if isinstance(c, DirichletConjugate):
                c.update((onehot.sum(0),), 1.0)
            elif isinstance(c, NIWConjugate):
                c.update(mixture_statistics(onehot, x, x.new_zeros(x.shape + x.shape[-1:])), 1.0)
    if step.guide is None or num_steps < 1:
        return
    conj = {c.site: c.point() for c in step.conjugates.values()}

    def loss() -> torch.Tensor:
        point = step.guide(*step.args, **step.kwargs)
        trace = poutine.trace(poutine.condition(step.model, data=dict(point, **conj, **data))).get_trace(
            *step.args, **step.kwargs)
        keep = set(point) | set(data)
        return -sum(scale_and_mask(node["fn"].log_prob(node["value"]), node["scale"], node["mask"]).sum()
                    for name, node in trace.nodes.items() if node["type"] == "sample" and name in keep)

    loss()
    params = [p for p in step.guide.parameters() if p.requires_grad]
    start = [p.detach().clone() for p in params]
    optim = torch.optim.LBFGS(params, lr=1.0, max_iter=num_steps, history_size=20, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optim.zero_grad()
        value = loss()
        value.backward()
        return value

    try:
        optim.step(closure)
        ok = all(bool(torch.isfinite(p).all()) for p in params)
    except (ValueError, RuntimeError):   # a line-search trial outside a site's support
        ok = False
    if not ok:
        with torch.no_grad():
            for p, p0 in zip(params, start):
                p.copy_(p0)


def fit_likelihood_networks(step: _Step, labels: dict[str, torch.Tensor], num_steps: int = PRETRAIN_STEPS,
                            lr: float = PRETRAIN_LR) -> float:
    r"""Train the networks of the observed sites (the decoders: every parameter the model's run touches) on the data
    with the latent nodes fixed: each mixture target at the recognition network's means, its assignment at
    ``labels`` (target -> ``(*node_shape)``), the other globals at their point (and the conjugate q's at theirs):
    ``num_steps`` full-batch Adam steps of size ``lr`` on :math:`-\frac1N\sum_n \log p(y_n \mid x_n)` (N the
    data points). Returns the final loss (nan when nothing was trained).

    The decoder then starts as a regression from the data-driven latent space to the data, its learned output scale
    (when it has one) moved toward the data's residual scale: a decoder emitting scale 1 on pixels of variance
    0.1 makes the reconstruction term too weak for q(z) to keep the clusters (issue 12, digits: ARI ~0). Adam,
    not a quasi-Newton fit to convergence: each parameter moves at most about ``lr`` per step, so a feature
    without variance (a pixel that is always 0), whose maximum-likelihood scale is 0, starts at a small scale
    (``exp(-num_steps * lr)``), not at one that swamps every other gradient (measured: L-BFGS to convergence
    made standardized digits' ARI 0.49 -> 0.14)."""
    targets = {n: t for n, t in step.targets.items() if n in labels}
    if not targets or num_steps < 1:
        return float("nan")
    means = recognition_means(step)
    with torch.no_grad():
        point = {k: v.detach() for k, v in (step.guide(*step.args, **step.kwargs) if step.guide else {}).items()}
    data = dict(point, **{c.site: c.point() for c in step.conjugates.values()})
    for name, t in targets.items():
        data[t.discrete], data[name] = labels[name], means[name]
    size = max(int(torch.Size(t.node_shape).numel()) for t in targets.values())
    observed = None

    def loss() -> tuple[torch.Tensor, list]:
        nonlocal observed
        with poutine.trace(param_only=True) as params:
            trace = poutine.trace(poutine.condition(step.model, data=data)).get_trace(*step.args, **step.kwargs)
        if observed is None:
            observed = [n for n, node in trace.nodes.items() if node["type"] == "sample" and node["is_observed"]
                        and n not in data and n not in step.globals]
        value = -sum((scale_and_mask(trace.nodes[n]["fn"].log_prob(trace.nodes[n]["value"]), trace.nodes[n]["scale"],
                                     trace.nodes[n]["mask"]).sum() for n in observed), torch.zeros(()))
        return value / size, [site["value"].unconstrained() for site in params.trace.nodes.values()]

    with torch.enable_grad():
        value, touched = loss()
        params = [p for p in {id(p): p for p in touched}.values() if p.requires_grad]
        if not params or not observed:
            return float("nan")
        optim = torch.optim.Adam(params, lr=lr)
        for _ in range(num_steps):
            optim.zero_grad()
            value.backward()
            optim.step()
            value = loss()[0]
    return float(value.detach())


def aligned_warmup(step: _Step, labels: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    """Mixture target -> normalized log q(z) ``(*node_shape, K)`` at its k-means ``labels`` relabelled to agree best
    with the model's own q(z) at the start (``initialization.align_labels`` on the argmax of one unclamped pass),
    so that components the model already places (given ``init=``, fixed parameters) keep their data."""
    if not labels:
        return {}
    with torch.no_grad():
        start = step.run(torch.Generator(device=_device(step)).manual_seed(seed))
    out = {}
    for name, z in labels.items():
        probs = start.locals[name].probs
        K = probs.shape[-1]
        labels[name] = align_labels(z, probs.argmax(-1), K)
        out[name] = soft_labels(labels[name], K, probs.dtype)
    return out


def build_step(model, args, kwargs, plan, recognition: dict | None = None, num_iters: int = 3,
               init: dict | None = None, natgrad_step: float = 0.5, warmup: int = 0,
               seed: int = 0) -> tuple[_Step, Any]:
    """The SVAE's objective on ``model(*args, **kwargs)`` before training: recognition inputs and networks, the
    conjugate q's, an AutoDelta guide of the other globals, the mixtures' data-driven labels held for the first
    ``warmup`` steps (k-means seeded by ``seed``, refined by Gaussian-mixture EM) with the data-driven start
    (``warmup.py``: default recognition networks pretrained, globals at their complete-data MAP, and, when every
    target is such a mixture with a default network, the decoders fitted by ``fit_likelihood_networks``);
    returns ``(_Step, trace of the model on the data)``."""
    facts = plan.facts
    targets = facts.of(NAME).targets
    inputs, masks, trace = _recognition_inputs(model, args, kwargs, targets)
    nets = _networks(targets, inputs, recognition)
    labels = warmup_labels(plan, targets, inputs, seed) if warmup > 0 else {}
    given = set(recognition or {})
    for name, z in labels.items():   # the default networks start at the data's principal components
        if name not in given:
            t = targets[name]
            pretrain_recognition(nets[name], inputs[name], t.node_shape,
                                 latent_targets(inputs[name], t.node_shape, z, t.dim))
    conjugates = build_conjugates(trace, facts.of(NAME), init)
    global_sites = [s for s in facts.continuous if s not in targets and s not in conjugates]
    guide = None
    if global_sites:
        guide = AutoDelta(poutine.block(model, expose=global_sites), init_loc_fn=init_fn(init))
    step = _Step(model, args, kwargs, facts, nets, inputs, masks, guide, num_iters, conjugates, natgrad_step,
                 None, warmup)
    step.fixed = aligned_warmup(step, labels, seed)
    if labels and not (set(init or {}) & (set(facts.continuous) - set(targets))):
        complete_data_map(step, labels)
    if labels and set(labels) == set(targets) and not given & set(targets):
        # every latent node then sits in the data-driven latent space (a user's recognition network, e.g. untrained,
        # may emit anything); after the MAP, so the decoders see the globals' start values
        fit_likelihood_networks(step, labels)
    return step, trace


def run(model, args, kwargs, plan, num_steps: int = 1000, lr: float = 0.01, num_samples: int = 100,
        recognition: dict | None = None, num_iters: int = 3, init: dict | None = None,
        natgrad_step: float = 0.5, progress: bool = True, checkpoint: str | None = None,
        checkpoint_every: int = 100, resume: str | None = None, batch_size: int | None = None,
        warmup: int = WARMUP, seed: int = 0, **unused) -> Posterior:
    """Train decoder, recognition networks and globals on the SVAE ELBO.

    Options: num_steps, lr (Adam's step: constant for the first half of num_steps, then a cosine down to lr / 10,
    ``training.cosine_tail`` as in the svi and amortized backends: the one-draw ELBO's noisy gradients settle instead
    of leaving the networks and the mixtures' clusters where the last constant steps put them), recognition
    (site -> nn.Module replacing the default network), num_iters (mean-field iterations), init (site -> initial
    value of a global), num_samples,
    natgrad_step (step size of the natural-gradient updates of conjugate globals: a Dirichlet on mixture
    weights, a ``ppl.NormalInverseWishart`` on mixture components, a ``ppl.MatrixNormalInverseWishart`` on an
    LDS chain's dynamics and noise; ``init`` may give the starting value of the latter two, packed
    ``(K, D, D + 1)`` and ``(D, 2 D)``), checkpoint (a file written every ``checkpoint_every`` steps, at the end
    and on Ctrl-C: parameters, Adam moments, RNG and the conjugate q's), resume (a checkpoint file of the same fit:
    continues it bit-identically, ``inference/checkpoints.py``), batch_size (data points or sequences per
    step, all processes together: the leading node dim of the targets, the likelihood and local KL scaled by
    N / B, the conjugate statistics too; ``_Minibatches``), warmup (Adam steps, at most half of ``num_steps``, with
    every mixture's q(z) held at a clustering of its recognition input (k-means++ refined by Gaussian-mixture EM,
    ``warmup.py``; the decoders fitted to the data from the start's latents first), relabelled to agree with the
    model's initial q(z); then q(z) is free: a data-driven start, ``warmup.py``; 0 turns it off), seed (of the
    k-means restarts; ``ppl.infer`` passes its seed). At the end a ``DegenerateFit`` warning names an empty or
    nearly empty mixture component or coinciding components, and ``NotConverged`` an objective still falling
    (``still_moving``). Data parallel under an initialized
    ``torch.distributed`` process group: each process fits its share of every batch (``inference/distributed.py``).
    """
    if unused:
        raise TypeError(f"backend 'svae' got unexpected options: {', '.join(unused)}")
    check_batch_size(batch_size, NAME)
    if not isinstance(warmup, int) or warmup < 0:
        raise ValueError(f"backend 'svae': warmup must be an integer >= 0 (Adam steps with the mixtures' q(z) held at "
                         f"k-means labels), got {warmup!r}")
    step, trace = build_step(model, args, kwargs, plan, recognition, num_iters, init, natgrad_step,
                             min(warmup, num_steps // 2), seed)
    targets, guide = plan.facts.of(NAME).targets, step.guide
    checkpoints = Checkpoints.from_options(checkpoint, checkpoint_every, resume)
    progress, checkpoints = distributed.main_only(progress, checkpoints)
    batches = None
    if batch_size is not None or distributed.world()[1] > 1:
        batches = _Minibatches(step, data_rows(targets, trace, step.globals), batch_size)
        if guide is not None:   # its set-up traces the model: on all the data, the same draws in every process
            guide(*args, **kwargs)
    history = optimize(traced_loss(batches or step), num_steps, lr, progress, NAME, checkpoints,
                       LoopState(step.state, step.load_state), after_backward=distributed.average_gradients,
                       max_grad_norm=NETWORK_MAX_GRAD_NORM, schedule=cosine_tail)
    if batches is not None:
        batches.restore()
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
    warn_if_nearly_empty(discrete, NAME)   # an empty state: make_posterior's warn_if_degenerate
    warn_if_still_moving(history, NAME)
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
