r"""Backend "discrete_vi": amortized variational inference for binary latent vectors too large to enumerate.

A model whose latents are binary vectors per data point (``Bernoulli(logits).to_event(1)`` over K bits inside
the data plate: :math:`2^K` states, e.g. :math:`2^{20}`) gets a mean-field Bernoulli encoder
:math:`q_\phi(b \mid x) = \prod_k \mathrm{Bernoulli}(b_k; \sigma(\alpha_\phi(x)_k))`, an MLP from the data
point's observed values to the K logits. The ELBO per data point is

.. math::
    \mathcal{L}_i = \mathbb{E}_{q}[\log p_\theta(x_i, b)] + H[q_\phi(\cdot \mid x_i)],

the entropy in closed form, the model's parameters :math:`\theta` get the pathwise gradient at a discrete
draw, and the encoder's logits get :math:`\nabla_\alpha \mathbb{E}_q[\log p_\theta(x_i, b)]` from the
``estimator`` option (``estimators``: "reinforce", "gumbel", "rebar", "relax"); REBAR/RELAX train their
control variate to minimize the estimator's variance as they go. Minibatches of ``batch_size`` rows of the
data plate (``inference.minibatch``), Adam.

Result: ``post.params`` (the model's parameters), ``post.networks[site]`` the encoder (one for all latent
sites), ``post.discrete[site]`` q per data point ``(N, K, 2)``, ``post.draws[site]`` ``(1, num_samples, N, K)``
draws of q, ``post.log_evidence`` the ELBO of the whole data set (Monte Carlo, entropy exact), ``post.history``
the negative ELBO per data point of each minibatch.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import pyro
import pyro.poutine as poutine
from pyro.poutine.util import site_is_subsample
import torch
from torch import nn

from ppl.analysis import Facts
from ppl.backends import Backend, Rule, Verdict
from ppl.plan import SiteTreatment
from ppl.posterior import LogEvidence, Posterior

from .. import minibatch as mb
from ..results import make_posterior
from ..training import History, mark_interrupted, progress_bar
from . import estimators as E

NAME = "discrete_vi"


@dataclass(frozen=True)
class DiscreteVIFacts:
    """binary: latent sites that are vectors of Bernoulli bits (``Bernoulli(...).to_event(n)``); other: every
    other latent site; outside: sites not in exactly one plate (the data plate)."""

    binary: tuple[str, ...]
    other: tuple[str, ...]
    outside: tuple[str, ...]


def _is_binary_vector(site) -> bool:
    return site.family == "Independent" and site.support.startswith("IndependentConstraint(Boolean()")


def facts(graph, generic: Facts) -> DiscreteVIFacts:
    """Which latents are binary vectors, which sites are not in one data plate."""
    binary = tuple(n for n in generic.combinatorial if _is_binary_vector(graph.site(n)))
    other = tuple(s.name for s in graph.latent() if s.name not in binary)
    outside = tuple(s.name for s in graph.sites() if len(s.plates) != 1)
    return DiscreteVIFacts(binary, other, outside)


def supports(f: Facts) -> Verdict:
    """Latents: binary vectors only, each site in one plate (the data plate)."""
    own = f.of(NAME)
    if not own.binary:
        return Verdict(False, "no latent binary vector (Bernoulli(...).to_event(1)) to fit")
    if own.other:
        return Verdict(False, f"latent site '{own.other[0]}' is not a vector of Bernoulli bits; the discrete_vi "
                              "backend fits models whose latents are all binary vectors")
    if own.outside:
        return Verdict(False, f"site '{own.outside[0]}' is not in exactly one plate; the discrete_vi backend "
                              "needs every site in the data plate (ppl.plate('data', N))")
    return Verdict(True)


def treatments(graph, f: Facts) -> list[SiteTreatment]:
    """Binary latents: the amortized encoder and the gradient estimator; observed sites: the likelihood."""
    rows = []
    for s in graph.sites():
        if s.observed:
            rows.append(SiteTreatment(s.name, "observed", f"{s.family}, shape {s.value_shape}, log-density at "
                                      "the encoder's draws"))
        else:
            bits = int(torch.Size(s.event_shape).numel())
            rows.append(SiteTreatment(s.name, "guide", f"{bits} binary latents per data point (2^{bits} states, "
                                      "not enumerated) -> amortized Bernoulli encoder; gradient estimator "
                                      "estimator='relax' (RELAX, learned control variate) by default, or "
                                      "'rebar', 'reinforce' (+ baseline), 'gumbel' (concrete relaxation, biased)"))
    return rows


class MLPEncoder(nn.Module):
    """``x (B, P) -> logits (B, K)``: one tanh hidden layer of ``hidden`` units."""

    def __init__(self, inputs: int, bits: int, hidden: int = 128):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(inputs, hidden), nn.Tanh(), nn.Linear(hidden, bits))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


@dataclass(frozen=True)
class Layout:
    """The latent sites' event shapes, in the order their bits are concatenated into ``(B, K)``."""

    sites: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]

    @property
    def bits(self) -> int:
        return sum(int(torch.Size(s).numel()) for s in self.shapes)

    def split(self, values: torch.Tensor) -> dict[str, torch.Tensor]:
        """``(..., K)`` -> site -> ``(..., *event)``."""
        out, start = {}, 0
        for site, shape in zip(self.sites, self.shapes):
            n = int(torch.Size(shape).numel())
            out[site] = values[..., start:start + n].reshape(values.shape[:-1] + shape)
            start += n
        return out


def observed_inputs(model, args, kwargs, graph) -> torch.Tensor:
    """The encoder's input: each data point's observed values, flattened and concatenated, ``(N, P)``."""
    with torch.no_grad(), pyro.validation_enabled(False):
        tr = poutine.trace(model).get_trace(*args, **kwargs)
    parts = [tr.nodes[s.name]["value"].detach() for s in graph.observed()]
    return torch.cat([p.reshape(p.shape[0], -1).to(parts[0].dtype) for p in parts], -1)


def log_joint_rows(model, args, kwargs, size: int, rows: torch.Tensor, layout: Layout, values: torch.Tensor):
    r""":math:`\log p_\theta(x_i, b)` per row: latent ``values (M, B, K)`` (binary or relaxed) for the ``B = len(rows)``
    data points -> ``(M, B)``. The model runs once on the rows repeated M times (validation off, so a relaxed
    value in (0, 1) is scored by the same formula as a bit)."""
    M, B, _ = values.shape
    bargs, bkwargs = mb.minibatch(args, kwargs, size, rows.repeat(M))
    data = layout.split(values.reshape(M * B, -1))
    with pyro.validation_enabled(False):
        tr = poutine.trace(poutine.condition(model, data=data)).get_trace(*bargs, **bkwargs)
    total = values.new_zeros(M * B)
    for name, site in tr.nodes.items():
        if (site["type"] != "sample" or site["infer"].get("_deterministic") or name.startswith("_")
                or site_is_subsample(site)):   # a plate's index site: log-density 0, a CPU scalar
            continue
        lp = site["fn"].log_prob(site["value"])
        mask = site.get("mask")
        if isinstance(mask, torch.Tensor):
            lp = torch.where(mask, lp, torch.zeros_like(lp))
        total = total + lp.reshape(-1).expand(M * B) if lp.numel() == 1 else total + lp.reshape(M * B)
    return total.reshape(M, B)


def _check_options(estimator, lr, encoder, batch_size, temperature) -> None:
    E.check_estimator(estimator)
    mb.check_batch_size(batch_size, NAME)
    if not (isinstance(lr, (int, float)) and lr > 0):
        raise ValueError(f"backend 'discrete_vi': lr must be a positive number, got {lr!r}")
    if not (isinstance(temperature, (int, float)) and temperature > 0):
        raise ValueError(f"backend 'discrete_vi': temperature must be a positive number, got {temperature!r}")
    if encoder is not None and not isinstance(encoder, nn.Module):
        raise TypeError(f"backend 'discrete_vi': encoder must be a torch.nn.Module mapping (B, P) to (B, K), got "
                        f"{type(encoder).__name__}")


@dataclass
class Fit:
    """What one training step needs."""

    model: object
    args: tuple
    kwargs: dict
    size: int
    layout: Layout
    inputs: torch.Tensor
    encoder: nn.Module
    cv: E.ControlVariate | None
    estimator: str
    temperature: float
    baseline: float | None = None   # running mean of f(b) (REINFORCE's baseline)


def objective(fit: Fit, rows: torch.Tensor):
    """``f(values (M, B, K)) -> (M, B)`` on the data points ``rows``."""
    return lambda values: log_joint_rows(fit.model, fit.args, fit.kwargs, fit.size, rows, fit.layout, values)


def step_loss(fit: Fit, rows: torch.Tensor, gen: torch.Generator):
    """One minibatch: ``(loss, encoder logits, their gradient estimate, variance loss or None)``. ``loss`` is the
    negative ELBO per data point; its gradient is the model's (pathwise at the draw) and the entropy's."""
    logits = fit.encoder(fit.inputs[rows.to(fit.inputs.device)])
    free = logits.detach().requires_grad_(True)
    est = E.estimate(fit.estimator, objective(fit, rows), free, fit.cv, fit.baseline or 0.0, fit.temperature, gen)
    loss = -(est.f_hard + E.bernoulli_entropy(logits)).mean()
    var = E.variance_loss(est.grad) if fit.cv is not None else None
    mean = float(est.f_hard.detach().mean())
    fit.baseline = mean if fit.baseline is None else 0.9 * fit.baseline + 0.1 * mean
    return loss, logits, est.grad, var


def _update(fit: Fit, rows: torch.Tensor, gen: torch.Generator, opt: torch.optim.Optimizer,
            opt_cv: torch.optim.Optimizer | None) -> float:
    """One step: the model's and the encoder's parameters (Adam ``opt``; the encoder through the estimator's
    gradient of its logits), and the control variate's on the estimator's variance (``opt_cv``)."""
    loss, logits, grad, var = step_loss(fit, rows, gen)
    if var is not None:
        cv_grads = torch.autograd.grad(var, list(fit.cv.parameters()), retain_graph=True)
    opt.zero_grad()
    torch.autograd.backward([loss, logits], [None, -grad.detach() / logits.shape[0]])
    opt.step()
    if var is not None:
        for p, g in zip(fit.cv.parameters(), cv_grads):
            p.grad = g
        opt_cv.step()
    return float(loss.detach())


def _model_params(model, args, kwargs, size):
    """The unconstrained Pyro parameters one model run touches."""
    rows = torch.arange(min(size, 2))
    bargs, bkwargs = mb.minibatch(args, kwargs, size, rows)
    with poutine.trace(param_only=True) as ptr, pyro.validation_enabled(False), torch.no_grad():
        poutine.trace(model).get_trace(*bargs, **bkwargs)
    return [s["value"].unconstrained() for s in ptr.trace.nodes.values()]


def run(model, args, kwargs, plan, num_steps: int = 2000, lr: float = 1e-3, batch_size: int | None = 100,
        estimator: str = "relax", encoder: nn.Module | None = None, hidden: int = 128, temperature: float = 0.5,
        seed: int = 0, num_samples: int = 100, progress: bool = True, **unused) -> Posterior:
    """Fit the model and the encoder on the ELBO.

    Options: num_steps, lr (Adam), batch_size (data rows per step; None: all), estimator ("relax", "rebar",
    "reinforce", "gumbel"), encoder (a module ``(B, P) -> (B, K)``, P the observed values per data point, K the
    latent bits; default an MLP with ``hidden`` units), temperature (of the concrete relaxation; REBAR/RELAX
    start from it and learn it), seed, num_samples (draws of q per data point kept in ``post.draws``).
    """
    if unused:
        raise TypeError(f"backend 'discrete_vi' got unexpected options: {', '.join(unused)}")
    _check_options(estimator, lr, encoder, batch_size, temperature)
    graph, own = plan.graph, plan.facts.of(NAME)
    layout = Layout(own.binary, tuple(graph.site(n).event_shape for n in own.binary))
    _, size = mb.data_plate(graph, own.binary[0])
    inputs = observed_inputs(model, args, kwargs, graph)
    enc = encoder if encoder is not None else MLPEncoder(inputs.shape[-1], layout.bits, hidden).to(inputs)
    cv = None
    if estimator in ("rebar", "relax"):
        cv = E.ControlVariate(layout.bits, temperature, hidden=32 if estimator == "relax" else 0).to(inputs)
    fit = Fit(model, args, kwargs, size, layout, inputs, enc, cv, estimator, temperature)
    opt_cv = torch.optim.Adam(cv.parameters(), lr=lr) if cv is not None else None
    params = {id(p): p for p in _model_params(model, args, kwargs, size) + list(enc.parameters())}
    opt = torch.optim.Adam(list(params.values()), lr=lr)
    gen, history = torch.Generator().manual_seed(seed), History()
    bar = progress_bar(NAME, num_steps, progress)
    try:
        for _ in range(num_steps):
            loss = _update(fit, mb.batch_rows(size, batch_size, gen), gen, opt, opt_cv)
            if not math.isfinite(loss):
                raise FloatingPointError(f"discrete_vi: the negative ELBO became {loss} at step {len(history) + 1}; "
                                         "lower lr=")
            history.append(loss)
            bar.update()
    except KeyboardInterrupt:
        mark_interrupted(history, NAME, num_steps)
    finally:
        bar.close()
    return _collect(plan, fit, num_samples, history, gen)


def bernoulli_draws(probs: torch.Tensor, n: int, generator: torch.Generator | None) -> torch.Tensor:
    """``n`` draws of independent bits of probabilities ``probs (...)``: ``(n, ...)`` on their device (the uniforms
    come from the CPU ``generator``)."""
    u = torch.rand((n,) + tuple(probs.shape), generator=generator, dtype=torch.float64).to(probs)
    return (u < probs).to(probs.dtype)


def elbo(fit: Fit, draws: int = 10, generator: torch.Generator | None = None, chunk: int = 500) -> float:
    """The ELBO of the whole data set: ``draws`` Monte Carlo draws of q per data point, the entropy exact."""
    total = 0.0
    with torch.no_grad():
        for start in range(0, fit.size, chunk):
            rows = torch.arange(start, min(start + chunk, fit.size))
            logits = fit.encoder(fit.inputs[rows.to(fit.inputs.device)])
            b = bernoulli_draws(torch.sigmoid(logits), draws, generator)
            total += float(objective(fit, rows)(b).mean(0).sum() + E.bernoulli_entropy(logits).sum())
    return total


def _collect(plan, fit: Fit, num_samples: int, history, gen) -> Posterior:
    """q per data point, draws of q, the ELBO."""
    with torch.no_grad():
        probs = torch.sigmoid(fit.encoder(fit.inputs))
        b = bernoulli_draws(probs, num_samples, gen)
    discrete = {site: torch.stack([1 - p, p], -1) for site, p in fit.layout.split(probs).items()}
    draws = {site: d.unsqueeze(0) for site, d in fit.layout.split(b).items()}
    evidence = LogEvidence(elbo(fit, generator=gen), "elbo (Monte Carlo, 10 draws per point, entropy exact)")
    networks = {site: fit.encoder for site in fit.layout.sites}
    return make_posterior(plan, fit.model, fit.args, fit.kwargs, draws=draws, log_evidence=evidence,
                          discrete=discrete, history=history, networks=networks)


def fit_of(post: Posterior, estimator: str = "relax") -> Fit:
    """The trained model and encoder of a discrete_vi Posterior, as a ``Fit`` (the fitted parameters must be
    in the Pyro parameter store: call inside ``post.fitted_params()``)."""
    if post.backend != NAME:
        raise ValueError(f"needs a Posterior of backend '{NAME}', got '{post.backend}'")
    graph, own = post.plan.graph, post.plan.facts.of(NAME)
    layout = Layout(own.binary, tuple(graph.site(n).event_shape for n in own.binary))
    _, size = mb.data_plate(graph, own.binary[0])
    inputs = observed_inputs(post.model, post.args, post.kwargs, graph)
    return Fit(post.model, post.args, post.kwargs, size, layout, inputs, post.networks[own.binary[0]], None,
               estimator, dict(post.plan.options).get("temperature", 0.5))


def elbo_of(post: Posterior, *args, draws: int = 10, seed: int = 0, **kwargs) -> float:
    """The ELBO of new data ``model(*args, **kwargs)`` (e.g. held-out images with the trained decoder,
    ``post.kwargs["decoder"]``) under the trained encoder: ``draws`` draws of q per data point, entropy exact."""
    with post.fitted_params():
        fit = fit_of(post)
        inputs = observed_inputs(post.model, args, kwargs, post.plan.graph)
        new = Fit(post.model, args, kwargs, inputs.shape[0], fit.layout, inputs, fit.encoder, None, fit.estimator,
                  fit.temperature)
        return elbo(new, draws, torch.Generator().manual_seed(seed))


def gradient_variances(post: Posterior, rows: torch.Tensor, n: int = 200, tune_steps: int = 100,
                       temperature: float = 0.5, seed: int = 0) -> dict[str, dict[str, float]]:
    r"""Each estimator's gradient wrt the encoder's logits at the fitted model, on the data points ``rows``:
    estimator -> {"variance": total variance :math:`\sum_{i,k} \mathrm{Var}[\hat g_{ik}]` over ``n`` draws,
    "bias": :math:`\|ar g - g^*\| / \|g^*\|` with :math:`g^*` the mean of the unbiased estimators' draws}.
    REINFORCE uses the baseline :math:`E_q[f]` per point (from ``n`` separate draws); REBAR and RELAX first tune
    their control variates for ``tune_steps`` steps."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    with post.fitted_params():
        fit = fit_of(post)
        f = objective(fit, rows)
        with torch.no_grad():
            logits = fit.encoder(fit.inputs[rows.to(fit.inputs.device)])
            base = f(bernoulli_draws(torch.sigmoid(logits), n, gen)).mean(0)
        cvs = {"rebar": E.ControlVariate(fit.layout.bits, temperature).to(logits),
               "relax": E.ControlVariate(fit.layout.bits, temperature, hidden=32).to(logits)}
        for cv in cvs.values():
            E.tune_control_variate(f, logits, cv, tune_steps, lr=0.01, draws=4, generator=gen)
        draws = {name: E.gradient_samples(name, f, logits, n, cv=cvs.get(name), baseline=base,
                                          temperature=temperature, generator=gen)
                 for name in ("reinforce", "rebar", "relax", "gumbel")}
    reference = torch.cat([draws[k] for k in ("reinforce", "rebar", "relax")]).mean(0)
    for name, g in draws.items():
        bias = float((g.mean(0) - reference).norm() / reference.norm())
        out[name] = {"variance": float(g.var(0).sum()), "bias": bias}
    return out


RULES = (
    Rule("binary-latent-vectors", lambda f: bool(f.of(NAME).binary), NAME,
         "latent binary vectors too large to enumerate (2^K states): amortized variational inference with a "
         "Bernoulli encoder and a low-variance gradient estimator (RELAX / REBAR / REINFORCE / concrete)",
         order=8),
)

BACKEND = Backend(NAME, run=run, supports=supports, treatments=treatments, rules=RULES, facts=facts)
