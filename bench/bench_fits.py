"""Whole fits with default settings, side by side with the specialised peers (no hand-made init).

- Gaussian mixture, full covariance: ``ppl.models.gmm`` (routed to ``exact``: z summed out, MAP by L-BFGS,
  3 data-driven restarts) vs scikit-learn's ``GaussianMixture(n_init=3)`` (EM), on Fisher's iris
  (standardized, 150 x 4, K = 3) and on a simulated 2-D mixture.
- Gaussian HMM: ``ppl.models.hmm`` (exact forward-backward, MAP by L-BFGS, 3 restarts) vs hmmlearn's
  ``GaussianHMM`` (Baum-Welch, 100 iterations; hmmlearn has no restarts option), one sequence.
- Real series shipped inside statsmodels, library ``hmm`` with its defaults vs hmmlearn's best of 20 restarts
  (whole fits; hmmlearn's initial distribution fixed to our uniform one): the Nile's annual flows (100 values
  ~450-1400, raw scale), Gaussian, K = 2 (routed to ``exact``); yearly sunspot numbers rounded to counts (309
  values), Poisson, K = 3 (routed to ``vi``; also with ``backend="exact"``, MAP). The note gives both
  log-likelihoods (ours: hmmlearn's ``score`` at our point estimate: the MAP for ``exact``, q's mode for ``vi``,
  whose Dirichlet(1) transition rows are the normalized expected counts) and the gap.

Before timing, each case checks what both reach: the note gives the mean log-likelihood per data point
of both fits (ours: log p(data | MAP), which includes the priors' pull; sklearn/hmmlearn: maximum
likelihood) so a faster but worse fit cannot pass unnoticed.
"""
from __future__ import annotations

import warnings

import torch

import ppl
from bench.harness import Case
from ppl.demo import load_iris_tensor
from ppl.models import gmm as gmm_lib
from ppl.models import hmm as hmm_lib
from tests.models.test_hmm_real_data import nile, our_log_likelihood, peer_best, sunspots


def _iris() -> tuple[torch.Tensor, torch.Tensor]:
    """Standardized measurements as ``ppl.demo`` loads them (float32, ``(150, 4)``) and the species ``(150,)``."""
    x, species, _ = load_iris_tensor()
    return x, species


def _fit_ours(model, args: tuple, kwargs: dict):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return ppl.infer(model, *args, model_kwargs=kwargs, progress=False)


def gmm_case(name: str, x: torch.Tensor, K: int, labels: torch.Tensor | None = None) -> Case:
    from sklearn.mixture import GaussianMixture

    def ours():
        return _fit_ours(gmm_lib.gmm, (x,), {"K": K})

    def peer():
        return GaussianMixture(K, covariance_type="full", n_init=3, random_state=0).fit(x.numpy())

    post, fitted = ours(), peer()
    mine, theirs = post.log_evidence.value / x.shape[0], float(fitted.score(x.numpy()))
    note = f"mean log-lik per point: ours {mine:.4f} (MAP), sklearn {theirs:.4f} (MLE)"
    if labels is not None:
        from sklearn.metrics import adjusted_rand_score
        ari = adjusted_rand_score(labels.numpy(), post.marginals("z").argmax(-1).numpy())
        note += f"; ARI ours {ari:.3f}, sklearn {adjusted_rand_score(labels.numpy(), fitted.predict(x.numpy())):.3f}"
    return Case(f"GMM fit, {name} ({x.shape[0]} x {x.shape[1]}), K={K}, full covariance", ours,
                {"scikit-learn GaussianMixture(n_init=3)": peer}, note=note)


def hmm_case(T: int, K: int) -> Case:
    from hmmlearn.hmm import GaussianHMM
    sim = hmm_lib.simulate(seed=0, N=1, T=T, K=K)
    y = sim.args[0].double()

    def ours():
        return _fit_ours(hmm_lib.hmm, (y,), sim.kwargs)

    def peer():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return GaussianHMM(K, n_iter=100, random_state=0).fit(y.numpy().reshape(-1, 1))

    mine = ours().log_evidence.value / T
    theirs = float(peer().score(y.numpy().reshape(-1, 1))) / T
    return Case(f"Gaussian HMM fit, T={T}, K={K}", ours, {"hmmlearn GaussianHMM (100 EM iterations)": peer},
                note=f"mean log-lik per step: ours {mine:.4f} (MAP), hmmlearn {theirs:.4f} (MLE)")


def real_hmm_case(name: str, y: torch.Tensor, K: int, emission: str, backend: str = "auto") -> Case:
    """Library ``hmm`` with its defaults (``backend``) vs hmmlearn's best of 20 restarts on a real series."""

    def ours():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return ppl.infer(hmm_lib.hmm, y, model_kwargs={"K": K, "emission": emission}, backend=backend,
                             progress=False)

    def peer():
        return peer_best(y, emission, K, restarts=20)

    post, fitted = ours(), peer()
    mine, theirs = our_log_likelihood(post, y, emission, K), float(fitted.score(y.numpy().reshape(-1, 1)))
    MEASURED[f"{name} {emission} {post.backend}"] = theirs - mine
    return Case(f"{emission.capitalize()} HMM fit, {name} (T={y.shape[-1]}), K={K}, defaults, backend {post.backend}",
                ours, {"hmmlearn best of 20 restarts": peer},
                note=f"log-lik ours {mine:.3f}, hmmlearn best of 20 {theirs:.3f}: gap {theirs - mine:.3f} nats")


MEASURED: dict[str, float] = {}   # filled by cases(), read by targets()


def _mixture(N: int, seed: int = 0) -> torch.Tensor:
    (x,), _, _ = gmm_lib.simulate(seed=seed, N=N, K=3, D=2)
    return x.double()


def cases(quick: bool) -> list[Case]:
    real = [real_hmm_case("Nile flows", nile(), 2, "gaussian"), real_hmm_case("sunspots", sunspots(), 3, "poisson"),
            real_hmm_case("sunspots", sunspots(), 3, "poisson", backend="exact")]
    if quick:
        return [gmm_case("iris (the demo)", *_iris()[:1], 3, _iris()[1])] + real
    return [gmm_case("iris (the demo)", _iris()[0], 3, _iris()[1]), gmm_case("simulated", _mixture(2000), 3),
            hmm_case(1000, 3)] + real


def targets(rows: list[dict]) -> list[str]:
    """The issue's demo and real-data HMM numbers, judged on the rows above."""
    out = []
    for r in rows:
        if r["task"].startswith("GMM fit, iris"):
            out.append(f"demo fit (iris) <= 2 s: {'met' if r['ours'] <= 2 else 'NOT met'} (ours {r['ours']:.2f} s, "
                       f"sklearn {r['peer_time']:.3f} s; {r['note']})")
        if "HMM fit" in r["task"] and "defaults" in r["task"]:
            gap = float(r["note"].rsplit("gap ", 1)[1].split()[0])
            ok = gap <= 0.3 and r["ours"] <= r["peer_time"]
            out.append(f"{r['task']}: within 0.3 nats of hmmlearn's best of 20 and no slower: "
                       f"{'met' if ok else 'NOT met'} (gap {gap:.3f} nats, ours {r['ours']:.2f} s, hmmlearn "
                       f"{r['peer_time']:.2f} s)")
    return out
