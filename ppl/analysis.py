"""Generic facts about a ModelGraph, each a small pure function; ``analyze`` gathers them into ``Facts``.

Facts that only one backend needs live with that backend (``Backend.facts``) and are attached by
the compiler under ``Facts.backend_facts``: a ``BackendFacts`` mapping that runs a backend's hook when its
facts are first read, so that only the backends the routing rules reach pay for theirs (a hook may run the
model); the plan keeps the facts that were computed.

Two facts need the model itself and are found by *probing* (running it under an interpreter):
- a gaussian_chain's children are linear-Gaussian in it iff their log-density is exactly
  quadratic in the path with no coupling across steps (checked at two random points);
- a markov_chain's children can be tabulated iff the table, read at a sampled path, equals
  the children's log-density at that path (the model uses the chain's value pointwise).
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import pyro.poutine as poutine
import torch
from pyro.poutine.util import site_is_subsample

from .graph import ModelGraph
from .handlers import CollapseChains, CollapseSpec, elementwise_log_prob


@dataclass(frozen=True)
class Facts:
    """Everything the routing rules look at. Tuples of site names, in execution order."""

    observed: tuple[str, ...]
    enumerable: tuple[str, ...]                  # plain latent sites with finite discrete support
    unenumerable: tuple[str, ...]                # latent discrete sites with infinite support
    continuous: tuple[str, ...]                  # plain continuous latents (globals, locals)
    markov_chains: tuple[str, ...]
    gaussian_chains: tuple[str, ...]
    chain_children: dict[str, tuple[str, ...]]
    tabulable: dict[str, bool]                   # markov_chain -> children usable pointwise
    linear_gaussian: dict[str, bool]             # gaussian_chain -> children linear-Gaussian
    switching: tuple[tuple[str, str], ...]       # (markov_chain, gaussian_chain it switches)
    neural: tuple[str, ...]                      # sites whose distribution depends on a module
    latent_dim: int                              # total size of the plain continuous latents
    plates: dict[str, int] = field(default_factory=dict)
    unplated: dict[str, tuple[tuple[int, int], ...]] = field(default_factory=dict)  # site -> ((dim, size), ...)
    plate_nesting: int = 0                       # deepest plate dim used by any site (as a positive count)
    continuous_local: tuple[str, ...] = ()       # continuous latents sharing a plate with a finite discrete one
    backend_facts: Mapping[str, Any] = field(default_factory=dict)  # backend name -> its own facts (plug-ins;
                                                                    # a BackendFacts while compiling)
    combinatorial: tuple[str, ...] = ()          # latent sites with finite support too large to enumerate as one
                                                 # variable: a finite discrete base over .to_event dims (2^20 states
                                                 # for Bernoulli(...).to_event(1) over 20 bits); not in unenumerable
    unnormalized: tuple[str, ...] = ()           # sites whose log_prob is not a normalized log-density: energy-based
                                                 # (ppl.RBM) or absent (ppl.Implicit); a backend that scores the model
                                                 # by its log joint cannot fit them

    def of(self, backend: str) -> Any:
        """The facts backend ``backend`` computed about this model (``Backend.facts``)."""
        if backend not in self.backend_facts:
            raise KeyError(f"no facts of backend '{backend}'; backends with facts: {sorted(self.backend_facts)} "
                           "(a compiled plan keeps those of the backends its routing consulted)")
        return self.backend_facts[backend]

    @property
    def chains(self) -> tuple[str, ...]:
        """Every latent chain: markov_chains then gaussian_chains."""
        return self.markov_chains + self.gaussian_chains

    @property
    def exactly_collapsible(self) -> bool:
        """Every latent chain can be marginalized by an exact kernel."""
        return (all(self.tabulable.get(c, False) for c in self.markov_chains)
                and all(self.linear_gaussian.get(c, False) for c in self.gaussian_chains)
                and not self.switching)

    def collapse_spec(self) -> CollapseSpec:
        """The chains an exact kernel can marginalize, with their children."""
        return CollapseSpec(
            discrete={c: self.chain_children[c] for c in self.markov_chains if self.tabulable.get(c)},
            gaussian={c: self.chain_children[c] for c in self.gaussian_chains if self.linear_gaussian.get(c)})


class BackendFacts(Mapping):
    """backend name -> that backend's facts, each computed by calling its hook ``hooks[name]()`` when first read
    (then kept); membership and iteration do not compute anything. ``computed()``: a plain dict of those read."""

    def __init__(self, hooks: dict[str, Callable[[], Any]]):
        self._hooks = dict(hooks)
        self._computed: dict[str, Any] = {}

    def __getitem__(self, name: str) -> Any:
        if name not in self._computed:
            self._computed[name] = self._hooks[name]()
        return self._computed[name]

    def __contains__(self, name: object) -> bool:
        return name in self._hooks

    def __iter__(self) -> Iterator[str]:
        return iter(self._hooks)

    def __len__(self) -> int:
        return len(self._hooks)

    def computed(self) -> dict[str, Any]:
        """The facts read so far, backend name -> facts."""
        return dict(self._computed)


def latent_chains(graph: ModelGraph, kind: str) -> tuple[str, ...]:
    """Latent sites of block ``kind`` ("markov_chain" or "gaussian_chain")."""
    return tuple(s.name for s in graph.latent() if s.block == kind)


def plain_latents(graph: ModelGraph, discrete: bool) -> tuple[str, ...]:
    """Latent sites outside any block, discrete or continuous."""
    return tuple(s.name for s in graph.latent() if s.block is None and s.is_discrete == discrete)


def combinatorial_latents(graph: ModelGraph, trace: poutine.Trace) -> tuple[str, ...]:
    """Latent discrete sites outside any block whose distribution is ``Independent`` over a base with finite
    support (e.g. ``Bernoulli(logits).to_event(1)``, ``OneHotCategorical(logits).to_event(1)``): each value is a
    vector of finite variables, a joint support of ``prod`` of their sizes, which is not enumerated as one."""
    out = []
    for s in graph.latent():
        if s.block is not None or not s.is_discrete or s.discrete_size is not None:
            continue
        fn = trace.nodes[s.name]["fn"]
        while type(fn).__name__ == "Independent":
            fn = fn.base_dist
        if getattr(fn, "has_enumerate_support", False):
            out.append(s.name)
    return tuple(out)


def switching_pairs(graph: ModelGraph) -> tuple[tuple[str, str], ...]:
    """(markov_chain, gaussian_chain) pairs where the discrete chain selects the dynamics."""
    return tuple((m, g) for m in latent_chains(graph, "markov_chain")
                 for g in graph.children_of(m) if graph.site(g).block == "gaussian_chain"
                 and not graph.site(g).observed)


def sharing_a_plate(graph: ModelGraph, sites: tuple[str, ...], others: tuple[str, ...]) -> tuple[str, ...]:
    """The sites of ``sites`` that sit in a plate with one of ``others`` (per-datapoint locals of a mixture,
    e.g. an LDA document's topic proportions next to its words' topic assignments)."""
    plates = {name for o in others for name, _ in graph.site(o).plates}
    return tuple(s for s in sites if any(name in plates for name, _ in graph.site(s).plates))


def plate_sizes(graph: ModelGraph) -> dict[str, int]:
    """plate name -> size, over every site."""
    return {name: size for s in graph.sites() for name, size in s.plates}


def _sample_sites(trace: poutine.Trace):
    for name, site in trace.nodes.items():
        if site["type"] == "sample" and not site["infer"].get("_deterministic") and not site_is_subsample(site):
            yield name, site


def plate_nesting(trace: poutine.Trace) -> int:
    """How many batch dims, counted from the right, the model's plates occupy: max over frames of ``-dim``."""
    return max([-f.dim for _, site in _sample_sites(trace) for f in site["cond_indep_stack"]
                if f.vectorized and f.dim is not None] + [0])


def unplated_batch_dims(trace: poutine.Trace) -> dict[str, tuple[tuple[int, int], ...]]:
    """Sites whose distribution has batch dims of size > 1 to the left of all of the site's plates (all its
    batch dims if it is in no plate): site -> ((dim, size), ...), dims negative, counted from the right.

    E.g. ``gaussian_chain("x", ...)`` over N sequences without a plate has batch shape (N,) and gives
    ``{"x": ((-1, N),)}``. Every log-density sums over such dims, but a backend's machinery may not accept
    them: Pyro's shape check rejects one that falls among the plate dims, and Pyro's enumeration allocates its
    own dims left of the plates. Dims right of a site's innermost plate are Pyro's broadcast dims, not listed.
    """
    out = {}
    for name, site in _sample_sites(trace):
        batch = tuple(site["fn"].batch_shape)
        left_of = min([f.dim for f in site["cond_indep_stack"] if f.vectorized and f.dim is not None] + [0])
        dims = tuple((d, int(batch[d])) for d in range(-len(batch), left_of) if batch[d] > 1)
        if dims:
            out[name] = dims
    return out


def probe_tabulable(model: Callable, args: tuple, kwargs: dict, chain: str, children: tuple[str, ...],
                    trace: poutine.Trace) -> bool:
    """True iff tabulating ``children`` over the states of ``chain`` agrees with evaluating them
    at the traced path (so the model uses the chain's value elementwise)."""
    try:
        tables = _tabulate_replayed(model, args, kwargs, CollapseSpec(discrete={chain: children}), trace)
    except (RuntimeError, ValueError, IndexError):
        return False
    path = trace.nodes[chain]["value"].long()
    table = tables[chain].log_lik
    picked = table.gather(-1, path.unsqueeze(-1)).squeeze(-1).sum()
    direct = sum(_site_log_prob(trace.nodes[c]) for c in children)
    return bool(torch.isclose(picked, direct, rtol=1e-4, atol=1e-4 * max(1.0, float(direct.abs()))))


def _site_log_prob(site: dict) -> torch.Tensor:
    lp, extra = elementwise_log_prob(site["fn"], site["value"])
    mask = site.get("mask")
    if isinstance(mask, torch.Tensor):
        lp = torch.where(mask.reshape(mask.shape + (1,) * extra), lp, torch.zeros_like(lp))
    return lp.sum().detach()


def _tabulate_replayed(model, args, kwargs, spec, trace):
    """Tabulate with every other latent fixed to its traced value."""
    handler = CollapseChains(spec)
    with handler, poutine.replay(trace=trace):
        model(*args, **kwargs)
    return handler.tables()


def probe_linear_gaussian(model: Callable, args: tuple, kwargs: dict, chain: str, children: tuple[str, ...],
                          trace: poutine.Trace, seed: int = 0) -> bool:
    """True iff the children's log-density f(x) is exactly quadratic in the path ``x`` with
    block-diagonal (per-step) curvature: f(x1) = f(0) + h.x1 - 1/2 sum_t x1_t' J_t x1_t at a random x1."""
    spec = CollapseSpec(gaussian={chain: children})
    try:
        handler = CollapseChains(spec)
        with torch.enable_grad(), handler, poutine.replay(trace=trace):
            model(*args, **kwargs)
        table = handler.tables()[chain]
        J, h, f0 = table.J.detach(), table.h.detach(), table.const.detach()
        gen = torch.Generator().manual_seed(seed)
        x1 = torch.randn(h.shape, generator=gen, dtype=torch.float64).to(h)
        f1 = _children_log_prob_at(model, args, kwargs, chain, x1, children, trace)
    except (RuntimeError, ValueError, IndexError):
        return False
    quad = f0 + (h * x1).sum() - 0.5 * (x1.unsqueeze(-2) @ J @ x1.unsqueeze(-1)).sum()
    scale = max(1.0, float(f1.abs()))
    return bool(torch.isfinite(f1)) and abs(float(f1 - quad)) <= 1e-4 * scale


def _children_log_prob_at(model, args, kwargs, chain, x, children, trace) -> torch.Tensor:
    """Sum of the children's log-densities with the chain's value set to ``x``."""
    data = {name: site["value"] for name, site in trace.nodes.items()
            if site["type"] == "sample" and not site["is_observed"] and name != chain}
    data[chain] = x
    with torch.no_grad():
        tr = poutine.trace(poutine.condition(model, data=data)).get_trace(*args, **kwargs)
    return sum(_site_log_prob(tr.nodes[c]) for c in children)


def analyze(graph: ModelGraph, model: Callable, args: tuple, kwargs: dict, trace: poutine.Trace) -> Facts:
    """Gather the facts the rules route on."""
    markov, gauss = latent_chains(graph, "markov_chain"), latent_chains(graph, "gaussian_chain")
    children = {c: tuple(graph.children_of(c)) for c in markov + gauss}
    continuous = plain_latents(graph, discrete=False)
    discrete = plain_latents(graph, discrete=True)
    switching = switching_pairs(graph)
    switched = {g for _, g in switching}
    combinatorial = combinatorial_latents(graph, trace)
    return Facts(
        observed=tuple(s.name for s in graph.observed()),
        enumerable=tuple(n for n in discrete if graph.site(n).discrete_size is not None),
        unenumerable=tuple(n for n in discrete if graph.site(n).discrete_size is None and n not in combinatorial),
        combinatorial=combinatorial,
        unnormalized=tuple(s.name for s in graph.sites() if s.density != "normalized"),
        continuous=continuous,
        markov_chains=markov, gaussian_chains=gauss, chain_children=children,
        tabulable={c: bool(children[c]) and probe_tabulable(model, args, kwargs, c, children[c], trace)
                   for c in markov},
        linear_gaussian={c: c not in switched and bool(children[c])
                         and all(graph.site(k).observed for k in children[c])
                         and probe_linear_gaussian(model, args, kwargs, c, children[c], trace)
                         for c in gauss},
        switching=switching,
        neural=tuple(s.name for s in graph.sites() if s.neural),
        latent_dim=sum(int(torch.Size(graph.site(n).value_shape).numel()) for n in continuous),
        plates=plate_sizes(graph),
        continuous_local=sharing_a_plate(graph, continuous, tuple(n for n in discrete
                                                                  if graph.site(n).discrete_size is not None)),
        unplated=unplated_batch_dims(trace),
        plate_nesting=plate_nesting(trace))
