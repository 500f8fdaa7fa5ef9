"""Posterior: the one result type every backend returns.

It holds posterior draws of the latent sites (``draws``: site -> ``(chains, draws, *value_shape)``),
exact or plug-in marginals of discrete latents and chains, the log evidence (labelled exact or
a lower bound), the training history and diagnostics, and the plan that produced it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, NamedTuple

import torch


class LogEvidence(NamedTuple):
    """log p(data) or a bound on it. ``kind`` says which: "exact", "exact at point estimate", "elbo"."""

    value: float
    kind: str


class Summary(dict):
    """site -> rows of (index, mean, sd, 5%, 95%); prints as a table."""

    def __str__(self) -> str:
        lines = [f"{'site':<24} {'mean':>10} {'sd':>10} {'5%':>10} {'95%':>10}"]
        for site, rows in self.items():
            for label, mean, sd, lo, hi in rows:
                lines.append(f"{site + label:<24} {mean:>10.4f} {sd:>10.4f} {lo:>10.4f} {hi:>10.4f}")
        return "\n".join(lines)

    __repr__ = __str__


def _summary_rows(values: torch.Tensor, max_rows: int) -> list[tuple]:
    """Rows for one site from draws ``(n, *shape)``."""
    flat = values.reshape(values.shape[0], -1).double()
    qs = torch.quantile(flat, torch.tensor([0.05, 0.95], dtype=flat.dtype, device=flat.device), dim=0)
    mean, sd = flat.mean(0), flat.std(0) if flat.shape[0] > 1 else torch.zeros_like(flat[0])
    shape = tuple(values.shape[1:])
    rows = []
    for i in range(min(flat.shape[1], max_rows)):
        label = "" if not shape else str([int(j) for j in torch.unravel_index(torch.tensor(i), shape)])
        rows.append((label, float(mean[i]), float(sd[i]), float(qs[0, i]), float(qs[1, i])))
    return rows


@dataclass
class Posterior:
    """Result of ``ppl.infer``.

    plan:         the Plan that was run
    draws:        site -> tensor ``(chains, draws, *value_shape)`` of posterior draws of latents
    discrete:     site -> probabilities ``(*batch, K)`` (or ``(*batch, T, K)`` for chains)
    map_paths:    chain site -> most probable path ``(*batch, T)`` (Viterbi), where exact
    log_evidence: LogEvidence
    history:      training objective per step (negative ELBO or negative log joint), if any
    diagnostics:  e.g. r_hat, ess, divergences (MCMC)
    """

    plan: Any
    draws: dict[str, torch.Tensor]
    log_evidence: LogEvidence
    discrete: dict[str, torch.Tensor] = field(default_factory=dict)
    map_paths: dict[str, torch.Tensor] = field(default_factory=dict)
    history: list[float] = field(default_factory=list)
    diagnostics: dict[str, Any] = field(default_factory=dict)
    params: dict[str, torch.Tensor] = field(default_factory=dict)
    chain_sampler: Callable[[int, torch.Generator], dict[str, torch.Tensor]] | None = None
    predictive_fn: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]] | None = None
    encoder: Callable[..., dict] | None = None

    @property
    def backend(self) -> str:
        return self.plan.backend

    def _flat(self) -> dict[str, torch.Tensor]:
        return {k: v.reshape((-1,) + v.shape[2:]) for k, v in self.draws.items()}

    def sample(self, n: int = 1000, seed: int = 0) -> dict[str, torch.Tensor]:
        """``n`` joint posterior draws: site -> ``(n, *value_shape)``, chains included where available."""
        if n < 1:
            raise ValueError(f"sample(n): n must be >= 1, got {n}")
        flat = self._flat()
        gen = torch.Generator().manual_seed(seed)
        out = {}
        if flat:
            total = next(iter(flat.values())).shape[0]
            idx = torch.randint(total, (n,), generator=gen) if n > total else torch.randperm(total, generator=gen)[:n]
            out = {k: v[idx.to(v.device)] for k, v in flat.items()}
        if self.chain_sampler is not None:
            out.update(self.chain_sampler(n, gen))
        return out

    def marginals(self, site: str) -> torch.Tensor:
        """Posterior probabilities of a discrete latent: ``(*batch, K)``; for a chain ``(*batch, T, K)``."""
        if site not in self.discrete:
            known = ", ".join(self.discrete) or "none"
            raise KeyError(f"no discrete marginals for site '{site}' (backend '{self.backend}'); available: {known}")
        return self.discrete[site]

    def viterbi(self, site: str) -> torch.Tensor:
        """Most probable path of a collapsed ``markov_chain`` ``(*batch, T)``."""
        if site not in self.map_paths:
            raise KeyError(f"no Viterbi path for site '{site}'; available: {', '.join(self.map_paths) or 'none'}")
        return self.map_paths[site]

    def summary(self, max_rows_per_site: int = 12) -> Summary:
        """Mean, sd and 90% interval of each continuous latent (first ``max_rows_per_site`` entries)."""
        flat = self._flat()
        return Summary({k: _summary_rows(v, max_rows_per_site) for k, v in flat.items()
                        if v.is_floating_point()})

    def mean(self, site: str) -> torch.Tensor:
        """Posterior mean of a latent site."""
        return self._flat()[site].mean(0)

    def predictive(self, n: int = 100, seed: int = 0) -> dict[str, torch.Tensor]:
        """Posterior predictive: ``n`` replicated data sets (all sites) with globals drawn from the posterior."""
        if self.predictive_fn is None:
            raise RuntimeError(f"backend '{self.backend}' did not provide a predictive")
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            return self.predictive_fn(self.sample(n, seed))

    def encode(self, *args, **kwargs) -> dict:
        """Local posteriors on new data ``model(*args, **kwargs)`` by the trained recognition networks
        (amortized inference; backend "svae"): site -> Local(x, kl, mean, probs)."""
        if self.encoder is None:
            raise RuntimeError(f"backend '{self.backend}' has no amortized encoder; encode() needs backend 'svae'")
        return self.encoder(*args, **kwargs)

    def to_arviz(self):
        """An ``arviz.InferenceData`` with the posterior draws (requires the ``arviz`` extra)."""
        try:
            import arviz as az
        except ImportError as exc:
            raise ImportError("to_arviz() needs arviz: pip install 'graphppl[arviz]'") from exc
        posterior = {k: v.detach().cpu().numpy() for k, v in self.draws.items()}
        stats = {k: v.detach().cpu().numpy() for k, v in self.diagnostics.get("sample_stats", {}).items()}
        return az.from_dict(posterior=posterior, sample_stats=stats or None)

    def __repr__(self) -> str:
        sites = ", ".join(self.draws) or "none"
        return (f"Posterior(backend={self.backend!r}, sites=[{sites}], "
                f"log_evidence={self.log_evidence.value:.4f} ({self.log_evidence.kind}))")
