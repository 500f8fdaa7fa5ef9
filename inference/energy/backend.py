r"""Backend "energy": a model whose observed site is an energy-based distribution (``ppl.RBM``).

Its log-density is known up to the partition function :math:`Z(\theta)`, so the likelihood is not
maximized directly. The gradient of the mean log-likelihood of data :math:`v_1..v_B` is

.. math::
    \nabla_\theta \tfrac1B \textstyle\sum_i \log p(v_i) = -\tfrac1B \sum_i \nabla_\theta F(v_i)
    + \mathbb{E}_{p_\theta}[\nabla_\theta F(v)],

and the model expectation is replaced by Gibbs samples: ``k`` sweeps started at the data (contrastive
divergence, ``method="cd"``, Hinton 2002) or persistent chains carried across steps (``method="pcd"``,
Tieleman 2008). After training, :math:`\log Z` is estimated by annealed importance sampling (``ais``) and
the log-likelihood of the data :math:`-\sum_i F(v_i) - N \log \hat Z` is ``post.log_evidence`` (kind "AIS
estimate"). ``post.predictive(n)`` draws by block Gibbs sampling (``RBM.sample``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import pyro
import pyro.poutine as poutine
import torch

from ppl.analysis import Facts
from ppl.backends import Backend, Rule, Verdict
from ppl.plan import SiteTreatment
from ppl.posterior import LogEvidence, Posterior

from .. import minibatch as mb
from ..results import make_posterior
from ..training import History, mark_interrupted, progress_bar
from .ais import RBMParams, ais_log_z

NAME = "energy"
METHODS = ("cd", "pcd")


@dataclass(frozen=True)
class EnergyFacts:
    """energy: observed sites with an unnormalized density; families: their distributions' class names."""

    energy: tuple[str, ...]
    families: tuple[str, ...]


def facts(graph, generic: Facts) -> EnergyFacts:
    """Which observed sites are energy-based (``SiteInfo.density == "unnormalized"``)."""
    sites = [s for s in graph.observed() if s.density == "unnormalized"]
    return EnergyFacts(tuple(s.name for s in sites), tuple(s.family for s in sites))


def supports(f: Facts) -> Verdict:
    """One observed RBM site, no latent site, no other observed site."""
    own = f.of(NAME)
    if len(own.energy) != 1:
        return Verdict(False, f"the model needs exactly one observed energy-based site, found {len(own.energy)}")
    if own.families[0] != "RBM":
        return Verdict(False, f"site '{own.energy[0]}' is a {own.families[0]}; the energy backend trains and "
                              "normalizes ppl.RBM sites")
    others = [s for s in f.observed if s != own.energy[0]]
    latent = f.continuous + f.enumerable + f.combinatorial + f.chains
    if others or latent:
        which = others[0] if others else latent[0]
        return Verdict(False, f"site '{which}' is not the RBM; the energy backend fits models made of one observed "
                              "RBM and its parameters (the hidden units are summed out inside it)")
    return Verdict(True)


def treatments(graph, f: Facts) -> list[SiteTreatment]:
    return [SiteTreatment(s.name, "observed", "energy-based (unnormalized log-density, hidden units summed out) -> "
                          "method='pcd' persistent contrastive divergence by block Gibbs (or 'cd'); log Z by annealed "
                          "importance sampling") for s in graph.sites()]


def rbm_at(model, args, kwargs, site: str, size: int, rows: torch.Tensor):
    """(the RBM distribution of one model run on ``rows``, its data ``(B, V)``); the parameters keep their graph."""
    bargs, bkwargs = mb.minibatch(args, kwargs, size, rows)
    with pyro.validation_enabled(False):
        node = poutine.trace(model).get_trace(*bargs, **bkwargs).nodes[site]
    return node["fn"], node["value"]


def cd_loss(fn, data: torch.Tensor, negatives: torch.Tensor) -> torch.Tensor:
    r"""The contrastive-divergence surrogate :math:`\mathrm{mean}\, F(v_{data}) - \mathrm{mean}\, F(v_{neg})`: its
    gradient is the negated log-likelihood gradient with the model expectation taken over ``negatives``."""
    return fn.free_energy(data).mean() - fn.free_energy(negatives.detach()).mean()


def _check_options(method, gibbs_steps, lr, batch_size, num_chains) -> None:
    if method not in METHODS:
        raise ValueError(f"backend 'energy': method must be one of {list(METHODS)}, got {method!r}")
    mb.check_batch_size(batch_size, NAME)
    for name, value in (("gibbs_steps", gibbs_steps), ("num_chains", num_chains)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"backend 'energy': {name} must be an integer >= 1, got {value!r}")
    if not (isinstance(lr, (int, float)) and lr > 0):
        raise ValueError(f"backend 'energy': lr must be a positive number, got {lr!r}")


def run(model, args, kwargs, plan, num_steps: int = 1000, lr: float = 0.01, method: str = "pcd", gibbs_steps: int = 1,
        batch_size: int | None = 100, num_chains: int = 100, ais_betas: int = 1000, ais_chains: int = 100,
        seed: int = 0, num_samples: int = 0, progress: bool = True, **unused) -> Posterior:
    """Train by CD-k / PCD-k (Adam), then estimate log Z by AIS.

    Options: num_steps, lr, method ("pcd" or "cd"), gibbs_steps (k sweeps per step), batch_size, num_chains
    (persistent chains of PCD), ais_betas / ais_chains (AIS temperatures and runs), seed. ``num_samples`` is
    accepted for ``ppl.infer`` and unused (draw with ``post.predictive(n)``: block Gibbs).
    """
    if unused:
        raise TypeError(f"backend 'energy' got unexpected options: {', '.join(unused)}")
    _check_options(method, gibbs_steps, lr, batch_size, num_chains)
    site = plan.facts.of(NAME).energy[0]
    _, size = mb.data_plate(plan.graph, site)
    gen, history, optim, chains = torch.Generator().manual_seed(seed), History(), None, None
    bar = progress_bar(NAME, num_steps, progress)
    try:
        for _ in range(num_steps):
            with poutine.trace(param_only=True) as ptr:
                fn, data = rbm_at(model, args, kwargs, site, size, mb.batch_rows(size, batch_size, gen))
            with torch.no_grad():
                if method == "cd":
                    negatives = fn.gibbs(data.to(fn.weights.dtype), gibbs_steps)
                else:
                    start = chains if chains is not None else torch.bernoulli(
                        torch.full((num_chains, fn.num_visible), 0.5, dtype=fn.weights.dtype, device=fn.weights.device))
                    negatives = chains = fn.gibbs(start, gibbs_steps)
            loss = cd_loss(fn, data, negatives)
            if optim is None:
                params = list({id(p): p for p in (s["value"].unconstrained() for s in ptr.trace.nodes.values())}.values())
                optim = torch.optim.Adam(params, lr=lr)
            optim.zero_grad()
            loss.backward()
            optim.step()
            history.append(float(loss.detach()))
            bar.update()
    except KeyboardInterrupt:
        mark_interrupted(history, NAME, num_steps)
    finally:
        bar.close()
    return _collect(plan, model, args, kwargs, site, size, history, ais_betas, ais_chains, gen)


def log_likelihood(fn, data: torch.Tensor, log_z: float) -> float:
    r""":math:`\sum_i -F(v_i) - N \log Z` for ``data (N, V)``."""
    with torch.no_grad():
        return float(-fn.free_energy(data).sum()) - data.shape[0] * log_z


def base_bias(data: torch.Tensor, eps: float = 0.01) -> torch.Tensor:
    """The AIS base's visible biases: the logits of the data's pixel means (clipped), ``(V,)``."""
    m = data.double().mean(0).clamp(eps, 1 - eps)
    return torch.log(m) - torch.log1p(-m)


def _collect(plan, model, args, kwargs, site, size, history, ais_betas, ais_chains, gen) -> Posterior:
    """AIS log Z, the data's log-likelihood, the Posterior."""
    fn, data = rbm_at(model, args, kwargs, site, size, torch.arange(size))
    params = RBMParams(fn.weights.detach(), fn.visible_bias.detach(), fn.hidden_bias.detach())
    ais = ais_log_z(params, ais_betas, ais_chains, base_bias(data), gen if data.device.type == "cpu" else None)
    value = log_likelihood(fn, data, ais.log_z)
    kind = (f"AIS estimate (log Z = {ais.log_z:.4f} +- {ais.stderr:.2g} relative, {ais_betas} temperatures, "
            f"{ais_chains} runs)")
    return make_posterior(plan, model, args, kwargs, draws={}, history=history,
                          log_evidence=LogEvidence(value if math.isfinite(value) else float("nan"), kind))


RULES = (
    Rule("energy-based", lambda f: bool(f.of(NAME).energy), NAME,
         "an observed site is energy-based (unnormalized density, intractable partition function): trained by "
         "contrastive divergence with Gibbs sampling, log Z by annealed importance sampling", order=7),
)

BACKEND = Backend(NAME, run=run, supports=supports, treatments=treatments, rules=RULES, facts=facts)
