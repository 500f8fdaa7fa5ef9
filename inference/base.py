"""The backend protocol and the registry of backends.

A backend is a module exposing:
    NAME: str
    supports(facts) -> Verdict            can it run a model with these facts? if not, which fact stops it
    treatments(graph, facts) -> list[SiteTreatment]
    run(model, args, kwargs, plan, **options) -> Posterior
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from types import ModuleType

BACKEND_MODULES = {
    "exact": "ppl.inference.exact.backend",
    "svae": "ppl.inference.svae.backend",
    "svi": "ppl.inference.svi.backend",
    "mcmc": "ppl.inference.mcmc.backend",
}


@dataclass(frozen=True)
class Verdict:
    ok: bool
    reason: str = ""

    def __bool__(self) -> bool:
        return self.ok


class UnknownBackendError(ValueError):
    """The requested backend name does not exist."""


class UnsupportedModelError(ValueError):
    """A backend cannot run the model; the message names the fact that stops it."""


def backend_names() -> tuple[str, ...]:
    return tuple(BACKEND_MODULES)


def get_backend(name: str) -> ModuleType:
    """The backend module called ``name``; raises UnknownBackendError listing the valid names."""
    if name not in BACKEND_MODULES:
        raise UnknownBackendError(f"unknown backend {name!r}; choose one of {', '.join(backend_names())} or 'auto'")
    return importlib.import_module(BACKEND_MODULES[name])
