"""Backends as plug-ins: the protocol, the routing rules and the registry (one line a backend).

A backend is a folder under ``inference/`` whose module (named in ``REGISTRY``) defines
``BACKEND = Backend(...)``:

    name        "exact", "svi", ...
    run         run(model, args, kwargs, plan, **options) -> Posterior
    supports    supports(facts) -> Verdict: can it run a model with these facts? if not, which fact stops it
    treatments  treatments(graph, facts) -> list[SiteTreatment]: the rows of ``plan.explain()``
    rules       Rule(name, applies, backend, reason, order): when the compiler should pick it
    facts       facts(graph, facts) -> Any: the backend's own facts about a model, computed at compile
                time and read back with ``facts.of(name)`` (None if it needs none); a hook taking
                ``(graph, facts, model, args, kwargs)`` also gets the model and its data to probe

The language core never imports a backend: ``get_backend`` imports the registered module by
name when a backend is asked for (``ppl.compile`` asks for all of them to route). Adding a
backend is its folder plus one ``REGISTRY`` line (or ``register`` for a package of your own).
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Callable

REGISTRY: dict[str, str] = {
    "exact": "ppl.inference.exact.backend",
    "svae": "ppl.inference.svae.backend",
    "svi": "ppl.inference.svi.backend",
    "mcmc": "ppl.inference.mcmc.backend",
    "amortized": "ppl.inference.amortized.backend",
    "vi": "ppl.inference.vi.backend",
    "adversarial": "ppl.inference.adversarial.backend",
    "discrete_vi": "ppl.inference.discrete_vi.backend",
    "energy": "ppl.inference.energy.backend",
}


@dataclass(frozen=True)
class Verdict:
    """Whether a backend can run a model; ``reason`` names the fact that stops it."""

    ok: bool
    reason: str = ""

    def __bool__(self) -> bool:
        return self.ok



def normalized_density_verdict(facts: Any) -> Verdict:
    """Whether a model can be run by a backend that scores its normalized log-density (exact, svi, mcmc, svae,
    vi, amortized): not if a site has none (``Facts.unnormalized``: energy-based or a simulator), nor if a latent
    is a vector of discrete variables too large to enumerate (``Facts.combinatorial``)."""
    unnormalized = getattr(facts, "unnormalized", ())
    if unnormalized:
        return Verdict(False, f"site '{unnormalized[0]}' has no normalized log-density (energy-based or a "
                              "simulator); use backend 'energy' or 'adversarial'")
    combinatorial = getattr(facts, "combinatorial", ())
    if combinatorial:
        return Verdict(False, f"site '{combinatorial[0]}' is a vector of discrete variables too large to "
                              "enumerate; use backend 'discrete_vi'")
    return Verdict(True)


def needs_normalized_density(supports: Callable[[Any], Verdict]) -> Callable[[Any], Verdict]:
    """Decorate a backend's ``supports`` so that it first refuses what ``normalized_density_verdict`` refuses."""

    def checked(facts: Any) -> Verdict:
        verdict = normalized_density_verdict(facts)
        return supports(facts) if verdict else verdict

    checked.__name__, checked.__doc__ = supports.__name__, supports.__doc__
    return checked

@dataclass(frozen=True)
class Rule:
    """Route to ``backend`` when ``applies(facts)``; rules are tried by ascending ``order``.

    ``reason`` is what ``plan.explain()`` prints for the rule that chose the backend.
    """

    name: str
    applies: Callable[[Any], bool]
    backend: str
    reason: str
    order: int


@dataclass(frozen=True)
class Backend:
    """One inference backend (see the module docstring for each field)."""

    name: str
    run: Callable[..., Any]
    supports: Callable[[Any], Verdict]
    treatments: Callable[[Any, Any], list]
    rules: tuple[Rule, ...] = ()
    facts: Callable[[Any, Any], Any] | None = None


class UnknownBackendError(ValueError):
    """The requested backend name does not exist."""


class UnsupportedModelError(ValueError):
    """A backend cannot run the model; the message names the fact that stops it."""


def backend_names() -> tuple[str, ...]:
    """The registered backends' names, in registry order."""
    return tuple(REGISTRY)


def register(name: str, module: str) -> None:
    """Add (or replace) backend ``name`` whose module ``module`` defines ``BACKEND``; checked when first asked for."""
    if not isinstance(name, str) or not name or name == "auto":
        raise ValueError(f"a backend name must be a non-empty string other than 'auto', got {name!r}")
    REGISTRY[name] = module


def get_backend(name: str) -> Backend:
    """The backend called ``name``; raises UnknownBackendError listing the valid names."""
    if name not in REGISTRY:
        raise UnknownBackendError(f"unknown backend {name!r}; choose one of {', '.join(backend_names())} or 'auto'")
    backend = getattr(importlib.import_module(REGISTRY[name]), "BACKEND", None)
    if not isinstance(backend, Backend) or backend.name != name:
        raise TypeError(f"module {REGISTRY[name]!r}, registered as backend '{name}', must define "
                        f"BACKEND = ppl.backends.Backend(name='{name}', ...); found {backend!r}")
    return backend


def all_backends() -> tuple[Backend, ...]:
    """Every registered backend (each module imported on first use)."""
    return tuple(get_backend(name) for name in REGISTRY)


def routing_rules(backends: tuple[Backend, ...]) -> tuple[Rule, ...]:
    """Every backend's rules in the order they are tried (ascending ``order``, ties by registry order)."""
    return tuple(sorted((r for b in backends for r in b.rules), key=lambda r: r.order))
