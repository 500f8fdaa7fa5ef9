r"""Backend "adversarial": a model whose observed site is a simulator (``ppl.Implicit``) with no density.

The model is fitted by a two-player game: a discriminator :math:`D_\omega` learns to tell data from the
simulator's draws, which makes it an estimator of the log density ratio :math:`\log p_{data}(x) / q_\theta(x)`
(``losses``), and the simulator's parameters (``ppl.module`` / ``ppl.param``) are trained through the draws
(``rsample``) to make that ratio 1. Each step: a minibatch of data rows, one model run on as many rows
with the data freed (the simulator's inputs drawn from their priors), ``disc_steps`` discriminator updates,
one generator update (Adam, ``betas=(0.5, 0.999)``).

Result: ``post.params`` the trained simulator, ``post.networks[site]`` the discriminator,
``post.predictive(n)`` fresh simulations, ``post.history`` the generator's loss, ``post.elbo_terms`` both
losses per step, ``post.log_evidence`` NaN of kind "none" (an implicit model has no likelihood).
``log_density_ratio(post, x)`` reads the discriminator as :math:`\log p_{data}(x) / q_\theta(x)`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import pyro
import pyro.poutine as poutine
import torch
from torch import nn

from ppl.analysis import Facts
from ppl.backends import Backend, Rule, Verdict
from ppl.plan import SiteTreatment
from ppl.posterior import LogEvidence, Posterior
from ppl.primitives import without_data

from .. import minibatch as mb
from . import avb
from ..results import make_posterior
from ..training import History, mark_interrupted, progress_bar
from .losses import DIVERGENCES, check_divergence, discriminator_loss, generator_loss
from .losses import log_density_ratio as _ratio

NAME = "adversarial"


@dataclass(frozen=True)
class AdversarialFacts:
    """implicit: observed sites whose distribution is ``ppl.Implicit`` (a simulator); scored: other observed
    sites (they have a density, which this backend does not use)."""

    implicit: tuple[str, ...]
    scored: tuple[str, ...]


def facts(graph, generic: Facts) -> AdversarialFacts:
    """Which observed sites are simulators."""
    implicit = tuple(s.name for s in graph.observed() if s.density == "none")
    return AdversarialFacts(implicit, tuple(s for s in generic.observed if s not in implicit))


def supports(f: Facts) -> Verdict:
    """Exactly one observed site, an ``Implicit`` simulator (its latent inputs drawn from their priors); or a model
    with a density whose latents are all plain continuous sites, for an implicit posterior (option ``guide=``)."""
    own = f.of(NAME)
    if not own.implicit and f.continuous and not (f.enumerable or f.combinatorial or f.chains or f.unenumerable):
        return Verdict(True)
    if len(own.implicit) != 1:
        return Verdict(False, "the model needs exactly one observed Implicit (simulator) site, "
                              f"found {len(own.implicit)}")
    if own.scored:
        return Verdict(False, f"site '{own.scored[0]}' is observed with a density; the adversarial backend fits "
                              "models whose only observed site is an Implicit simulator")
    return Verdict(True)


def treatments(graph, f: Facts) -> list[SiteTreatment]:
    """The simulator's site and its inputs (drawn from their priors at every step); or, for a model with a
    density, the latents of an implicit q."""
    if not f.of(NAME).implicit:
        return [SiteTreatment(s.name, "observed", "log-density at q's draws") if s.observed else
                SiteTreatment(s.name, "guide", "implicit q (option guide=, a simulator): log q by a "
                              "discriminator against a Gaussian with q's moments (adversarial variational Bayes, "
                              "adaptive contrast)")
                for s in graph.sites()]
    rows = []
    for s in graph.sites():
        if s.observed:
            rows.append(SiteTreatment(s.name, "observed", "implicit simulator (no density) -> adversarial: "
                                      "discriminator as density ratio; divergence='gan' non-saturating GAN "
                                      "(or f-GAN 'kl' / 'reverse_kl')"))
        else:
            rows.append(SiteTreatment(s.name, "sampled", f"{s.family}: simulator input, drawn from its prior at "
                                      "every step (no likelihood, so no posterior)"))
    return rows


class MLPDiscriminator(nn.Module):
    """``x (B, *event) -> (B,)``: the event flattened, two LeakyReLU hidden layers, one output."""

    def __init__(self, event_size: int, hidden: int = 64):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(event_size, hidden), nn.LeakyReLU(0.2), nn.Linear(hidden, hidden),
                                 nn.LeakyReLU(0.2), nn.Linear(hidden, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.reshape(x.shape[0], -1)).squeeze(-1)


def _observed(model, args, kwargs, site: str) -> torch.Tensor:
    """The data at ``site`` (one model run with the data in place)."""
    with torch.no_grad(), pyro.validation_enabled(False):
        return poutine.trace(model).get_trace(*args, **kwargs).nodes[site]["value"].detach()


def simulate_batch(model, args, kwargs, site: str, size: int, rows: torch.Tensor) -> tuple[torch.Tensor, list]:
    """Simulator draws on ``len(rows)`` rows of the data plate (data freed, inputs from their priors) and the
    unconstrained parameters they depend on: ``((B, *event), [params])``."""
    bargs, bkwargs = mb.minibatch(args, kwargs, size, rows)
    with poutine.trace(param_only=True) as ptr:
        tr = poutine.trace(without_data(model)).get_trace(*bargs, **bkwargs)
    return tr.nodes[site]["value"], [s["value"].unconstrained() for s in ptr.trace.nodes.values()]


def _check_options(num_steps, lr, disc_steps, divergence, discriminator, batch_size) -> None:
    check_divergence(divergence)
    mb.check_batch_size(batch_size, NAME)
    if not isinstance(disc_steps, int) or disc_steps < 1:
        raise ValueError(f"backend 'adversarial': disc_steps must be an integer >= 1, got {disc_steps!r}")
    if not (isinstance(lr, (int, float)) and lr > 0):
        raise ValueError(f"backend 'adversarial': lr must be a positive number, got {lr!r}")
    if discriminator is not None and not isinstance(discriminator, nn.Module):
        raise TypeError(f"backend 'adversarial': discriminator must be a torch.nn.Module mapping (B, *event) to "
                        f"(B,), got {type(discriminator).__name__}")


def _game_step(model, args, kwargs, site, data, size, rows, D, opt_d, opt_g, divergence, disc_steps):
    """One round: ``disc_steps`` discriminator updates, one generator update; returns (loss_d, loss_g, params)."""
    fake, params = simulate_batch(model, args, kwargs, site, size, rows)
    real = data[rows.to(data.device)]
    for _ in range(disc_steps):
        loss_d = discriminator_loss(D(real), D(fake.detach()), divergence)
        opt_d.zero_grad()
        loss_d.backward()
        opt_d.step()
    loss_g = generator_loss(D(fake), divergence)
    if not params:  # a simulator without parameters: only the discriminator (the density ratio) is fitted
        return float(loss_d.detach()), float(loss_g.detach()), opt_g
    if opt_g is None:
        opt_g = torch.optim.Adam(list({id(p): p for p in params}.values()), lr=opt_d.defaults["lr"],
                                 betas=(0.5, 0.999))
    opt_g.zero_grad()
    loss_g.backward()
    opt_g.step()
    return float(loss_d.detach()), float(loss_g.detach()), opt_g


def run(model, args, kwargs, plan, num_steps: int = 2000, lr: float = 1e-3, batch_size: int | None = 256,
        divergence: str = "gan", discriminator: nn.Module | None = None, disc_steps: int = 1, hidden: int = 64,
        seed: int = 0, progress: bool = True, num_samples: int = 1000, guide=None, draws: int = 16,
        **unused) -> Posterior:
    """Train the simulator adversarially.

    Options: num_steps (rounds), lr (Adam, both players), batch_size (data rows per round; None: all),
    divergence ("gan" non-saturating, or f-GAN "kl" / "reverse_kl"), discriminator (a module ``(B, *event) ->
    (B,)``; default an MLP with ``hidden`` units), disc_steps (discriminator updates per round), seed.
    ``num_samples`` is accepted for ``ppl.infer`` and unused (draw with ``post.predictive(n)``).

    For a model with a density: ``guide`` a function of the model's arguments sampling every latent site (e.g.
    ``ppl.sample("mu", ppl.Implicit(net, noise))``), fitted by adversarial variational Bayes (``avb``) with
    ``draws`` draws of q and of the prior per step; ``num_samples`` draws of q are kept in ``post.draws``.
    """
    if unused:
        raise TypeError(f"backend 'adversarial' got unexpected options: {', '.join(unused)}")
    _check_options(num_steps, lr, disc_steps, divergence, discriminator, batch_size)
    if not plan.facts.of(NAME).implicit or guide is not None:
        return _run_implicit_q(model, args, kwargs, plan, guide, num_steps, lr, draws, hidden, discriminator,
                               num_samples, progress)
    site = plan.facts.of(NAME).implicit[0]
    _, size = mb.data_plate(plan.graph, site)
    data = _observed(model, args, kwargs, site)
    D = discriminator if discriminator is not None else MLPDiscriminator(
        int(torch.Size(data.shape[1:]).numel()), hidden).to(device=data.device, dtype=data.dtype)
    opt_d, opt_g = torch.optim.Adam(D.parameters(), lr=lr, betas=(0.5, 0.999)), None
    gen = torch.Generator().manual_seed(seed)
    history, terms = History(), {"discriminator": [], "generator": []}
    bar = progress_bar(NAME, num_steps, progress)
    try:
        with pyro.validation_enabled(False):
            for _ in range(num_steps):
                rows = mb.batch_rows(size, batch_size, gen)
                loss_d, loss_g, opt_g = _game_step(model, args, kwargs, site, data, size, rows, D, opt_d, opt_g,
                                                   divergence, disc_steps)
                if not (math.isfinite(loss_d) and math.isfinite(loss_g)):
                    raise FloatingPointError(f"adversarial: a loss became non-finite at step {len(history) + 1} "
                                             f"(discriminator {loss_d}, generator {loss_g}); lower lr=")
                terms["discriminator"].append(loss_d)
                terms["generator"].append(loss_g)
                history.append(loss_g)
                bar.update()
    except KeyboardInterrupt:
        mark_interrupted(history, NAME, num_steps)
    finally:
        bar.close()
    return make_posterior(plan, model, args, kwargs, draws={}, history=history, elbo_terms=terms,
                          networks={site: D.eval()},
                          log_evidence=LogEvidence(float("nan"), "none (implicit model: no likelihood)"))


def _run_implicit_q(model, args, kwargs, plan, guide, num_steps, lr, draws, hidden, discriminator, num_samples,
                    progress) -> Posterior:
    """Adversarial variational Bayes with the user's implicit ``guide`` (``avb``)."""
    own = plan.facts.of(NAME)
    if own.implicit:
        raise ValueError(f"backend 'adversarial': guide= fits an implicit posterior of a model with a density; site "
                         f"'{own.implicit[0]}' of this model is a simulator (fit it without guide=)")
    if not callable(guide):
        raise ValueError("backend 'adversarial': this model has a density; pass guide=, a function of the model's "
                         "arguments that samples every latent site from an implicit q (e.g. "
                         "ppl.sample('z', ppl.Implicit(net, noise))), to fit it by adversarial variational Bayes")
    if isinstance(draws, bool) or not isinstance(draws, int) or draws < 1:
        raise ValueError(f"backend 'adversarial': draws must be an integer >= 1, got {draws!r}")
    sites = tuple(s.name for s in plan.graph.latent())
    size = sum(int(torch.Size(plan.graph.site(s).value_shape).numel()) for s in sites)
    ref = next(t for t in list(args) + list(kwargs.values()) if isinstance(t, torch.Tensor))
    D = discriminator if discriminator is not None else MLPDiscriminator(size, hidden).to(
        device=ref.device, dtype=ref.dtype if ref.is_floating_point() else torch.get_default_dtype())
    history, d_losses = avb.fit(model, guide, args, kwargs, sites, D, num_steps, lr, draws, progress)
    tail = history[-min(50, len(history)):]
    evidence = LogEvidence(-sum(tail) / len(tail), f"elbo (adversarial: log q by the discriminator; mean of "
                                                   f"the last {len(tail)} steps)")
    return make_posterior(plan, model, args, kwargs, draws=avb.posterior_draws(guide, args, kwargs, sites, num_samples),
                          log_evidence=evidence, history=history, elbo_terms={"discriminator": d_losses},
                          networks={s: D.eval() for s in sites})


def log_density_ratio(post: Posterior, x: torch.Tensor) -> torch.Tensor:
    r"""The trained discriminator read as :math:`\log p_{data}(x) / q_\theta(x)`: ``x (B, *event) -> (B,)``."""
    if post.backend != NAME:
        raise ValueError(f"log_density_ratio needs a Posterior of backend '{NAME}', got '{post.backend}'")
    site = post.plan.facts.of(NAME).implicit[0]
    with torch.no_grad():
        return _ratio(post.networks[site](x), dict(post.plan.options).get("divergence", "gan"))


RULES = (
    Rule("implicit-simulator", lambda f: bool(f.of(NAME).implicit), NAME,
         "an observed site is a simulator with no density (ppl.Implicit): it is fitted adversarially, a "
         "discriminator estimating the density ratio data / model", order=6),
)

BACKEND = Backend(NAME, run=run, supports=supports, treatments=treatments, rules=RULES, facts=facts)

__all__ = ["BACKEND", "DIVERGENCES", "MLPDiscriminator", "log_density_ratio", "simulate_batch"]
