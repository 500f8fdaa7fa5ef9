"""The svae backend's own facts about a model (``Backend.facts``; read back as ``facts.of("svae")``).

- targets: latent Gaussian nodes or chains whose observed children include a neural site; the
  recognition network emits Gaussian potentials on them. Their ``kind`` says which local inference runs.
- conjugate pairs: globals whose prior is conjugate to their latent children (Dirichlet -> Categorical,
  NormalInverseWishart -> Gaussian, MatrixNormalInverseWishart -> gaussian_chain); the backend fits them
  by natural gradients where the child is an SVAE target (``conjugate.natural_gradient_sites``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Callable

from ppl.analysis import Facts
from ppl.graph import ModelGraph

GAUSSIAN_FAMILIES = ("MultivariateNormal", "Normal", "Independent")


class Kind(str, Enum):
    """How an SVAE target is inferred locally (a str, so ``Kind.LDS == "lds"``)."""

    LDS = "lds"            # gaussian_chain: Kalman smoother on the potentials
    SLDS = "slds"          # gaussian_chain switched by a markov_chain: structured mean field
    MIXTURE = "mixture"    # Gaussian node whose mean/cov an enumerable site selects: mean field q(z)q(x)
    GAUSSIAN = "gaussian"  # a plain Gaussian node (a VAE's prior): closed form

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class SVAETarget:
    """A latent Gaussian node (or chain) with neural observed children: the SVAE's recognition
    network emits Gaussian potentials on it.

    kind: a ``Kind``; discrete: the enumerable site or markov_chain that selects its parameters (mixture,
    slds), else None. node_shape: the dims indexing nodes (batch, time); dim: the latent dimension D;
    children: the observed sites its potentials are computed from.
    """

    site: str
    kind: Kind
    children: tuple[str, ...]
    discrete: str | None
    node_shape: tuple[int, ...]
    dim: int


@dataclass(frozen=True)
class SVAEFacts:
    """targets: site -> SVAETarget. conjugate / conjugate_gaussian / conjugate_dynamics: Dirichlet, NIW and
    MNIW prior site -> its latent children (Categorical sites, Gaussian sites, gaussian_chains)."""

    targets: dict[str, SVAETarget] = field(default_factory=dict)
    conjugate: dict[str, tuple[str, ...]] = field(default_factory=dict)
    conjugate_gaussian: dict[str, tuple[str, ...]] = field(default_factory=dict)
    conjugate_dynamics: dict[str, tuple[str, ...]] = field(default_factory=dict)


def _target_kind(graph: ModelGraph, site, switching: dict[str, str], enumerable: tuple[str, ...]):
    """(kind, discrete parent) of a latent continuous site, or None if it cannot be an SVAE target."""
    if site.block == "gaussian_chain":
        return (Kind.SLDS, switching[site.name]) if site.name in switching else (Kind.LDS, None)
    if site.block is not None or len(site.event_shape) != 1 or site.family not in GAUSSIAN_FAMILIES:
        return None
    discrete = [p for p in graph.parents_of(site.name) if p in enumerable]
    if len(discrete) > 1:
        return None
    return (Kind.MIXTURE, discrete[0]) if discrete else (Kind.GAUSSIAN, None)


def svae_targets(graph: ModelGraph, switching: tuple[tuple[str, str], ...],
                 enumerable: tuple[str, ...]) -> dict[str, SVAETarget]:
    """Latent Gaussian nodes whose children are all observed and include a neural site."""
    switched = {g: m for m, g in switching}
    out = {}
    for site in graph.latent():
        if site.is_discrete:
            continue
        kids = graph.children_of(site.name)
        if not kids or not all(graph.site(k).observed for k in kids) or not any(graph.site(k).neural for k in kids):
            continue
        kind = _target_kind(graph, site, switched, enumerable)
        if kind is None:
            continue
        discrete = kind[1]
        if discrete is not None and graph.children_of(discrete) != [site.name]:
            continue
        shape = site.value_shape
        out[site.name] = SVAETarget(site.name, kind[0], tuple(kids), discrete, shape[:-1], shape[-1])
    return out


def latent_prior_pairs(graph: ModelGraph, family: str, child_ok: Callable) -> dict[str, tuple[str, ...]]:
    """Latent sites of ``family`` outside any block whose children are all latent sites satisfying
    ``child_ok(site)``: prior site -> its children (a conjugate pair when ``child_ok`` names the conjugate family)."""
    out = {}
    for s in graph.latent():
        kids = graph.children_of(s.name)
        if s.family == family and s.block is None and kids and all(
                not graph.site(k).observed and child_ok(graph.site(k)) for k in kids):
            out[s.name] = tuple(kids)
    return out


def svae_facts(graph: ModelGraph, facts: Facts) -> SVAEFacts:
    """The svae backend's facts about a model (``Backend.facts``)."""
    return SVAEFacts(
        targets=svae_targets(graph, facts.switching, facts.enumerable),
        conjugate=latent_prior_pairs(graph, "Dirichlet", lambda k: k.family == "Categorical"),
        conjugate_gaussian=latent_prior_pairs(graph, "NormalInverseWishart",
                                              lambda k: k.family in GAUSSIAN_FAMILIES and k.block is None),
        # which chain parameters the MNIW value feeds is checked by conjugate.build
        conjugate_dynamics=latent_prior_pairs(graph, "MatrixNormalInverseWishart",
                                              lambda k: k.block == "gaussian_chain"))
