"""Posterior: the one result type every backend returns, a typed record of data.

It holds posterior draws of the latent sites (``draws``: site -> ``(chains, draws, *value_shape)``),
exact or plug-in marginals of discrete latents and chains, point estimates, the log evidence
(labelled exact or a lower bound), the training history and diagnostics, the plan that produced
it, and what it was fitted to (model, data). It holds no closure: exact chain draws and amortized
encoding are ``StateFunction``s, a module-level function applied to stored state, so a Posterior
pickles, ``torch.save``s and loads in a fresh process (the model must be importable by name).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Callable, NamedTuple

import pyro
import torch
from pyro.distributions import constraints
from pyro.infer import Predictive

from .primitives import copy_modules, without_data


class LogEvidence(NamedTuple):
    """log p(data) or a bound on it. ``kind`` says which: "exact", "exact at point estimate", "elbo"."""

    value: float
    kind: str

    def __float__(self) -> float:
        return float(self.value)


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


@dataclass(frozen=True)
class StateFunction:
    """``fn(state, *args, **kwargs)`` for a module-level ``fn``: pickles as a reference plus ``state``.

    Backends store what a Posterior computes on demand (exact chain draws, amortized encoding) this way
    instead of as closures, which cannot be pickled.
    """

    fn: Callable[..., Any]
    state: Any

    def __post_init__(self):
        qualname = getattr(self.fn, "__qualname__", "")
        if "<locals>" in qualname or "<lambda>" in qualname or not getattr(self.fn, "__module__", None):
            raise TypeError(f"StateFunction needs a module-level function (it is pickled by name), got {qualname!r}")

    def __call__(self, *args, **kwargs):
        return self.fn(self.state, *args, **kwargs)


@dataclass(frozen=True)
class MCMCStats:
    """What the MCMC sampler wrote.

    r_hat:       site -> split R-hat ``(*value_shape)`` (only with 2+ chains)
    ess:         site -> effective sample size ``(*value_shape)``: Pyro's ``pyro.ops.stats.effective_sample_size``
                 over all chains (Geyer's initial monotone sequence of the autocorrelations, on the raw draws). It
                 is not rank-normalized, so it differs from ArviZ's default bulk ESS; that one, computed by ArviZ
                 on the same draws, is ``arviz.ess(post.to_arviz())``
    divergences: number of divergent transitions after warmup, all chains
    per_draw:    statistic -> ``(chains, draws)``: "diverging" (bool), "step_size", "accept_prob"
                 (exported as ArviZ ``sample_stats``)
    """

    r_hat: dict[str, torch.Tensor]
    ess: dict[str, torch.Tensor]
    divergences: int
    per_draw: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass
class Posterior:
    """Result of ``ppl.infer``.

    plan:           the Plan that was run
    draws:          site -> ``(chains, draws, *value_shape)`` posterior draws of latents (a point estimate is
                    one chain of one draw)
    log_evidence:   LogEvidence
    discrete:       site -> probabilities ``(*batch, K)`` (``(*batch, T, K)`` for chains)
    map_paths:      chain site -> most probable path ``(*batch, T)`` (Viterbi), where exact
    point:          site -> point estimate of each global latent: MAP (exact), guide median (svi),
                    posterior mean (mcmc), the fitted value or conjugate q's mean (svae), the mode of q
                    (vi: mixtures, HMMs, Poisson factorizations; q's mean where a factor has no mode) or
                    q's mean (vi: LDA, LDS, switching LDS)
    smoothed_means: latent Gaussian chain or SVAE node -> posterior mean ``(*node_shape, D)`` given the data
                    (Kalman/RTS smoother at the point estimate; E_q[x] for the svae)
    history:        training objective per step (negative ELBO or negative log joint)
    params:         learned ``ppl.param`` / ``ppl.module`` values (constrained), name -> tensor
    mcmc:           MCMCStats (backend "mcmc"): split R-hat, ESS (Pyro's estimator, see ``MCMCStats``),
                    divergences, per-draw sampler statistics; else None
    elbo_terms:     the ELBO term by term (backends "svae" and "vi"; empty otherwise): term -> list of floats,
                    one entry per optimization step (svae: the one-sample estimate the step was taken on) or
                    coordinate-ascent sweep (vi); ``history[i]`` is minus step i's ELBO. svae: "recon"
                    E_q[log p(data | latents)], "local_kl" KL(q(local latents) || p(local latents | globals)),
                    "global_term" log p(point-estimated globals), "global_kl" KL(q || prior) of the conjugate
                    globals; ELBO = recon - local_kl + global_term - global_kl. vi: expected log-densities,
                    entropies and -KL terms, named after their sites; ELBO = their sum
    networks:       site -> trained recognition network (backend "svae")
    model, args, kwargs: what was fitted; ``predictive`` reruns the model on them
    local_sampler:  StateFunction ``(n, generator) -> {site: (n, ...)}``: exact or q draws of local latents
    encoder:        StateFunction ``(*new_args, **new_kwargs) -> {site: Local}``: amortized inference
    interrupted:    True when the fit was stopped by the user (Ctrl-C): everything here is the state reached
    """

    plan: Any
    draws: dict[str, torch.Tensor]
    log_evidence: LogEvidence
    discrete: dict[str, torch.Tensor] = field(default_factory=dict)
    map_paths: dict[str, torch.Tensor] = field(default_factory=dict)
    point: dict[str, torch.Tensor] = field(default_factory=dict)
    smoothed_means: dict[str, torch.Tensor] = field(default_factory=dict)
    history: list[float] = field(default_factory=list)
    params: dict[str, torch.Tensor] = field(default_factory=dict)
    param_constraints: dict[str, Any] = field(default_factory=dict)
    mcmc: MCMCStats | None = None
    elbo_terms: dict[str, list[float]] = field(default_factory=dict)
    networks: dict[str, torch.nn.Module] = field(default_factory=dict)
    model: Callable | None = None
    args: tuple = ()
    kwargs: dict[str, Any] = field(default_factory=dict)
    local_sampler: StateFunction | None = None
    encoder: StateFunction | None = None
    interrupted: bool = False

    @property
    def backend(self) -> str:
        """Name of the backend that produced this Posterior."""
        return self.plan.backend

    def _flat(self) -> dict[str, torch.Tensor]:
        return {k: v.reshape((-1,) + v.shape[2:]) for k, v in self.draws.items()}

    @contextlib.contextmanager
    def fitted_params(self):
        """A fresh Pyro parameter store holding the learned ``params``, so the model runs with them
        (in this process or a new one) without touching the caller's store."""
        with pyro.get_param_store().scope():
            store = pyro.get_param_store()
            for name, value in self.params.items():
                store.setdefault(name, value.clone(), self.param_constraints.get(name, constraints.real))
            yield

    def sample(self, n: int = 1000, seed: int = 0) -> dict[str, torch.Tensor]:
        """``n`` joint posterior draws: site -> ``(n, *value_shape)``, chains included where available."""
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise ValueError(f"sample(n): n must be an integer >= 1, got {n!r}")
        flat = self._flat()
        gen = torch.Generator().manual_seed(seed)
        out = {}
        if flat:
            total = next(iter(flat.values())).shape[0]
            idx = torch.randint(total, (n,), generator=gen) if n > total else torch.randperm(total, generator=gen)[:n]
            out = {k: v[idx.to(v.device)] for k, v in flat.items()}
        if self.local_sampler is not None:
            with self.fitted_params():
                out.update(self.local_sampler(n, gen))
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
        flat = self._flat()
        if site not in flat:
            raise KeyError(f"no draws of site '{site}' (backend '{self.backend}'); sites with draws: "
                           f"{', '.join(flat) or 'none'}")
        return flat[site].mean(0)

    def predictive(self, n: int = 100, seed: int = 0) -> dict[str, torch.Tensor]:
        """Posterior predictive: ``n`` replicated data sets (every site, observed ones redrawn), latents from
        ``sample(n, seed)``, the learned parameters in place, sites fixed by ``ppl.condition`` at their given
        values: site -> ``(n, *value_shape)``."""
        if self.model is None:
            raise RuntimeError(f"this Posterior (backend '{self.backend}') does not hold its model")
        latent = {s.name for s in self.plan.graph.latent()}
        given = {k: v for k, v in self.sample(n, seed).items() if k in latent}
        pred = Predictive(without_data(self.model), posterior_samples=given, num_samples=n, parallel=False)
        with torch.random.fork_rng(), torch.no_grad(), self.fitted_params():
            torch.manual_seed(seed)
            return pred(*self.args, **self.kwargs)

    def encode(self, *args, **kwargs) -> dict:
        """Local posteriors on new data ``model(*args, **kwargs)`` by the trained recognition networks
        (amortized inference; backend "svae"): site -> Local(x, kl, mean, probs). The model runs with the fitted
        weights whatever networks ``kwargs`` hold (copies of them are loaded; the trained ones: ``self.kwargs``)."""
        if self.encoder is None:
            raise RuntimeError(f"backend '{self.backend}' has no amortized encoder; encode() needs backend 'svae' "
                               "or 'amortized'")
        memo: dict = {}  # running the model loads the fitted weights into its modules: into copies, not the caller's
        args, kwargs = copy_modules(args, memo), copy_modules(kwargs, memo)
        with self.fitted_params():
            return self.encoder(*args, **kwargs)

    def to_arviz(self):
        """An ``arviz.InferenceData``: ``posterior`` holds the draws ``(chain, draw, ...)``; with MCMC,
        ``sample_stats`` holds what the sampler wrote per draw (diverging, step_size, accept_prob) and the
        attributes hold ``post.mcmc``'s R-hat and ESS per site (``r_hat_<site>``, ``ess_<site>``: Pyro's
        estimators). ArviZ's own diagnostics of the same draws come from ArviZ: ``arviz.ess(idata)`` (bulk ESS),
        ``arviz.rhat(idata)``, ``arviz.summary(idata)``. Requires the ``arviz`` extra."""
        try:
            import arviz as az
        except ImportError as exc:
            raise ImportError("to_arviz() needs arviz: pip install 'graphppl[arviz]'") from exc
        posterior = {k: v.detach().cpu().numpy() for k, v in self.draws.items()}
        stats, attrs = None, {"backend": self.backend, "log_evidence": self.log_evidence.value,
                              "log_evidence_kind": self.log_evidence.kind}
        if self.mcmc is not None:
            stats = {k: v.detach().cpu().numpy() for k, v in self.mcmc.per_draw.items()} or None
            attrs["divergences"] = self.mcmc.divergences
            attrs.update({f"r_hat_{k}": v.detach().cpu().double().numpy().tolist() for k, v in self.mcmc.r_hat.items()})
            attrs.update({f"ess_{k}": v.detach().cpu().double().numpy().tolist() for k, v in self.mcmc.ess.items()})
        return az.from_dict(posterior=posterior, sample_stats=stats, attrs=attrs)

    def save(self, path) -> None:
        """Write this Posterior to ``path`` (``torch.save``: draws, plan, learned parameters, networks, data).
        The model is stored by reference: loading needs it importable under the same module and name."""
        torch.save(self, path)

    @staticmethod
    def load(path, map_location=None) -> "Posterior":
        """Read a Posterior written by ``save`` (or ``torch.save``). Loading unpickles Python objects:
        open only files you trust."""
        post = torch.load(path, map_location=map_location, weights_only=False)
        if not isinstance(post, Posterior):
            raise TypeError(f"{path!r} holds a {type(post).__name__}, not a ppl.Posterior")
        return post

    def __repr__(self) -> str:
        sites = ", ".join(self.draws) or "none"
        stopped = ", interrupted" if self.interrupted else ""
        return (f"Posterior(backend={self.backend!r}, sites=[{sites}], "
                f"log_evidence={self.log_evidence.value:.4f} ({self.log_evidence.kind}){stopped})")
