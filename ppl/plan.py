"""Plan: the compiler's frozen, printable decision: backend, per-site treatment, and why."""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from .analysis import Facts

TREATMENTS = ("enumerate", "message passing", "recognition potential", "natural gradient", "guide", "sampled",
              "point estimate", "observed")


@dataclass(frozen=True)
class SiteTreatment:
    """How a backend handles one site (one of ``TREATMENTS``), and the detail ``explain()`` prints."""

    site: str
    treatment: str
    detail: str


@dataclass(frozen=True)
class RuleOutcome:
    """One routing rule as the compiler tried it: outcome is "chosen", "does not apply", or why its
    backend declined ("applies, but ...")."""

    rule: str
    backend: str
    outcome: str


@dataclass(frozen=True)
class Plan:
    """What ``ppl.infer`` will do with a model on this data.

    backend:    name of the backend ("exact", "svi", "mcmc", ...)
    rule:       the routing rule that chose it, or "user override"
    reason:     why, in words
    treatments: how each site is handled
    options:    backend options as (name, value) pairs: the backend's defaults, merged with the user's by
                ``ppl.infer`` (what the backend ran with)
    facts:      the analysis facts the decision was based on
    rules_tried: every routing rule in the order tried, up to the one that chose (empty on override)
    density:    for the backends that fit on the compiled log density (``inference/compiled.py``: svi, exact,
                mcmc), the objective they will use: "" (the compiled density) or why it cannot run the model,
                naming the site (then they fall back to Pyro's ELBO / potential); None for the other backends
    """

    model_name: str
    backend: str
    rule: str
    reason: str
    treatments: tuple[SiteTreatment, ...]
    facts: Facts
    options: tuple[tuple[str, Any], ...] = ()
    rules_tried: tuple[RuleOutcome, ...] = ()
    graph: Any = field(default=None, compare=False, repr=False)
    density: str | None = None

    def treatment(self, site: str) -> str:
        """The treatment of ``site``; KeyError naming the model if it has no such site."""
        for t in self.treatments:
            if t.site == site:
                return t.treatment
        raise KeyError(f"site '{site}' is not in the plan of model '{self.model_name}'")

    def with_options(self, **options) -> "Plan":
        """A copy with ``options`` merged into ``self.options`` (what the backend ran with)."""
        merged = dict(self.options)
        merged.update(options)
        return replace(self, options=tuple(sorted(merged.items())))

    def explain(self) -> str:
        """A readable table: backend, rule, reason, then one row per site."""
        width = max([len(t.site) for t in self.treatments] + [4])
        twidth = max([len(t.treatment) for t in self.treatments] + [9])
        lines = [f"Plan for model '{self.model_name}'",
                 f"  backend: {self.backend}   (rule: {self.rule})",
                 f"  why:     {self.reason}"]
        density = getattr(self, "density", None)  # a plan saved before the field existed has none
        if density is not None:
            lines.append("  density: " + ("compiled log density (one handler run per evaluation; a long fit records "
                                          "it as one graph, checked against that run)" if not density else
                                          f"Pyro's ELBO / potential (fallback): the compiled log density stops: "
                                          f"{density}"))
        if self.rules_tried:
            lines += ["", "  rules, in order:"]
            lines += [f"    {i}. {t.rule} -> {t.backend}: {t.outcome}" for i, t in enumerate(self.rules_tried, 1)]
        lines += ["", f"  {'site':<{width}}  {'treatment':<{twidth}}  detail",
                  f"  {'-' * width}  {'-' * twidth}  {'-' * 40}"]
        lines += [f"  {t.site:<{width}}  {t.treatment:<{twidth}}  {t.detail}" for t in self.treatments]
        if self.options:
            lines += ["", "  options: " + ", ".join(f"{k}={_short(v)}" for k, v in self.options)]
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.explain()


def _short(value: Any, width: int = 40) -> str:
    """``repr`` of an option value, cut to ``width`` characters (a dict of networks stays one line)."""
    text = repr(value) if not isinstance(value, str) else value
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 3] + "..."
