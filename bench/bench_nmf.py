"""Poisson NMF (``models/nmf.py``) in backend "vi" (``inference/vi/nmf.py``: closed-form VB with latent sources)
side by side with the svi route (``svi_options``: 500 Adam steps, AutoNormal) and scikit-learn's
``NMF(beta_loss="kullback-leibler", solver="mu", init="nndsvda")`` (maximum likelihood: the same Poisson
likelihood, no priors), on ``nmf.simulate`` data.

Sizes: 60 x 40, K = 3 (the model file's default simulation) and 1000 x 500, K = 10 (``--quick``: 300 x 200,
K = 6). Ours: ``vi_nmf.fit`` with the vi backend's defaults (3 starts screened by 25 sweeps each, at most 500
sweeps, relative ELBO tolerance 1e-6) on the structure the probe found; scikit-learn at tol 1e-6 and at most 2000
iterations (its default tol 1e-4 stops ~100 iterations in, at 3x our rate error on the larger matrix); svi on the
small matrix only (a whole ``ppl.infer`` call). The notes give each fit's relative Frobenius error of the rate
matrix against the truth (ours and svi's: the posterior mean E[W H]; scikit-learn's: W H) and our ELBO.
``targets`` adds each row's process CPU time of its last timed call (the fair comparison under load).
"""
from __future__ import annotations

import time
import warnings
from typing import Any, Callable

import torch

import ppl
from bench.harness import Case
from ppl.inference.training import NotConverged
from ppl.inference.vi import nmf as vi_nmf
from ppl.models import nmf

MEASURED: dict[str, float] = {}   # key -> process CPU seconds of the last timed call, read by targets()


def structure(sim) -> vi_nmf.NMFStructure:
    plan = ppl.compile(nmf.model, *sim.args, **sim.kwargs)
    return vi_nmf.analyse(nmf.model, sim.args, sim.kwargs, plan.facts, plan.graph)


def fit_ours(s: vi_nmf.NMFStructure) -> vi_nmf.NMFFit:
    """The vi backend's default fit (500 sweeps, tol 1e-6, 3 screened starts, seed 0)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotConverged)
        best, _ = vi_nmf.fit(s, 500, 1e-6, 3, 0, False)
    return best


def fit_sklearn(X: torch.Tensor, K: int):
    from sklearn.decomposition import NMF
    model = NMF(n_components=K, beta_loss="kullback-leibler", solver="mu", init="nndsvda", tol=1e-6, max_iter=2000,
                random_state=0)
    W = model.fit_transform(X.numpy())     # float32, as ours (simulate draws float32 counts)
    return torch.as_tensor(W @ model.components_).double(), model.n_iter_


def svi_options(sim) -> dict:
    """The svi route's settings (500 Adam steps from ``nmf.init_values``; models/nmf.py's ``infer_options`` before
    vi took the model)."""
    return dict(num_steps=500, lr=0.05, num_samples=100, init=nmf.init_values(sim.args[0], sim.kwargs["K"]))


def fit_svi(sim):
    return ppl.infer(nmf.model, *sim.args, model_kwargs=sim.kwargs, backend="svi", progress=False,
                     **svi_options(sim))


def cpu_timed(key: str, fn: Callable[[], Any]) -> Callable[[], Any]:
    """``fn`` recording the process CPU time of its last call in ``MEASURED[key]``."""
    def timed():
        start = time.process_time()
        out = fn()
        MEASURED[key] = time.process_time() - start
        return out
    return timed


def case(N: int, M: int, K: int, with_svi: bool) -> Case:
    sim = nmf.simulate(seed=0, N=N, M=M, K=K)
    s = structure(sim)
    truth = sim.truth["rate"].double()
    ours = fit_ours(s)
    rate = (ours.state.left.mean @ ours.state.right.mean).double()
    theirs, iters = fit_sklearn(sim.args[0], K)
    note = (f"rate error ours {nmf.relative_error(rate, truth):.4f} ({len(ours.history)} sweeps, ELBO "
            f"{ours.elbo:.1f}), sklearn KL-MU {nmf.relative_error(theirs, truth):.4f} ({iters} iterations)")
    tag = f"{N}x{M}"
    peers = {"sklearn NMF KL mu": cpu_timed(f"sklearn {tag}", lambda: fit_sklearn(sim.args[0], K))}
    if with_svi:
        post = fit_svi(sim)
        note += f", svi {nmf.recovery_errors(post, sim)['rate']:.4f} (ELBO estimate {post.log_evidence.value:.1f})"
        peers["svi (ppl.infer, 500 Adam steps)"] = cpu_timed(f"svi {tag}", lambda: fit_svi(sim))
    return Case(f"Poisson NMF fit {tag}, K={K} (vi fit on the probed structure)",
                cpu_timed(f"ours {tag}", lambda: fit_ours(s)), peers, note)


def cases(quick: bool) -> list[Case]:
    big = (300, 200, 6) if quick else (1000, 500, 10)
    return [case(60, 40, 3, True), case(*big, False)]


def targets(rows: list[dict]) -> list[str]:
    """Process CPU time of the last timed call of each row (no numeric target in the issue for NMF)."""
    if not MEASURED:
        return []
    return ["Poisson NMF process CPU time of the last timed call: "
            + ", ".join(f"{k} {v:.3f} s" for k, v in sorted(MEASURED.items()))]
