"""Routing rules as data: ``Rule(name, applies, backend, reason)``, tried in order.

``applies`` is a pure function of ``Facts``. The first rule that applies and whose backend
says it supports the model picks the backend; ``reason`` is what ``plan.explain()`` prints.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from .analysis import Facts

SMALL_LATENT_DIM = 20


@dataclass(frozen=True)
class Rule:
    name: str
    applies: Callable[[Facts], bool]
    backend: str
    reason: str


def _exact_chains(f: Facts) -> bool:
    return bool(f.chains) and f.exactly_collapsible and not f.unenumerable


def _neural_structured(f: Facts) -> bool:
    return bool(f.svae_targets) and bool(f.neural)


def _small_continuous(f: Facts) -> bool:
    return (not f.chains and not f.neural and not f.enumerable and not f.unenumerable
            and 0 < f.latent_dim <= SMALL_LATENT_DIM)


def _nothing_latent(f: Facts) -> bool:
    return not (f.chains or f.enumerable or f.unenumerable or f.continuous)


def _discrete_only(f: Facts) -> bool:
    return bool(f.enumerable) and not (f.chains or f.unenumerable or f.continuous)


RULES: tuple[Rule, ...] = (
    Rule("nothing-latent", _nothing_latent, "exact",
         "every random variable is observed or fixed: the log-likelihood is evaluated exactly"),
    Rule("discrete-only", _discrete_only, "exact",
         "the only latents are finite discrete ones (e.g. a mixture with its globals fixed): they are summed "
         "out by enumeration, so the log-likelihood and their posteriors are exact"),
    Rule("exact-chains", _exact_chains, "exact",
         "every latent chain is marginalized exactly by message passing (forward-backward / Kalman); "
         "global parameters (and any network weights) by MAP on the exact marginal likelihood"),
    Rule("neural-structured", _neural_structured, "svae",
         "neural likelihood on structured Gaussian latents: recognition networks emit potentials, local "
         "inference by message passing (structured VAE); networks and globals trained on the ELBO"),
    Rule("small-continuous", _small_continuous, "mcmc",
         f"only continuous latents, {SMALL_LATENT_DIM} dims or fewer, no networks: NUTS gives the full posterior"),
    Rule("default-svi", lambda f: True, "svi",
         "stochastic variational inference: finite discrete latents enumerated, chains collapsed where exact, "
         "continuous latents fitted by an AutoNormal guide"),
)
