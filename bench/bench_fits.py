"""Whole fits with default settings, side by side with the specialised peers (no hand-made init).

- Gaussian mixture, full covariance: ``ppl.models.gmm`` (routed to ``exact``: z summed out, MAP by L-BFGS,
  3 data-driven restarts) vs scikit-learn's ``GaussianMixture(n_init=3)`` (EM), on Fisher's iris
  (standardized, 150 x 4, K = 3) and on a simulated 2-D mixture.
- Gaussian HMM: ``ppl.models.hmm`` (exact forward-backward, MAP by L-BFGS, 3 restarts) vs hmmlearn's
  ``GaussianHMM`` (Baum-Welch, 100 iterations; hmmlearn has no restarts option), one sequence.

Before timing, each case checks what both reach: the note gives the mean log-likelihood per data point
of both fits (ours: log p(data | MAP), which includes the priors' pull; sklearn/hmmlearn: maximum
likelihood) so a faster but worse fit cannot pass unnoticed.
"""
from __future__ import annotations

import warnings

import torch

import ppl
from bench.harness import Case
from ppl.models import gmm as gmm_lib
from ppl.models import hmm as hmm_lib


def _iris() -> torch.Tensor:
    from sklearn.datasets import load_iris
    x = torch.tensor(load_iris().data, dtype=torch.float64)
    return (x - x.mean(0)) / x.std(0)


def _fit_ours(model, args: tuple, kwargs: dict):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return ppl.infer(model, *args, model_kwargs=kwargs, progress=False)


def gmm_case(name: str, x: torch.Tensor, K: int) -> Case:
    from sklearn.mixture import GaussianMixture

    def ours():
        return _fit_ours(gmm_lib.gmm, (x,), {"K": K})

    def peer():
        return GaussianMixture(K, covariance_type="full", n_init=3, random_state=0).fit(x.numpy())

    mine, theirs = ours().log_evidence.value / x.shape[0], float(peer().score(x.numpy()))
    return Case(f"GMM fit, {name} ({x.shape[0]} x {x.shape[1]}), K={K}, full covariance", ours,
                {"scikit-learn GaussianMixture(n_init=3)": peer},
                note=f"mean log-lik per point: ours {mine:.4f} (MAP), sklearn {theirs:.4f} (MLE)")


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


def _mixture(N: int, seed: int = 0) -> torch.Tensor:
    (x,), _, _ = gmm_lib.simulate(seed=seed, N=N, K=3, D=2)
    return x.double()


def cases(quick: bool) -> list[Case]:
    if quick:
        return [gmm_case("simulated", _mixture(150), 3), hmm_case(200, 3)]
    return [gmm_case("iris", _iris(), 3), gmm_case("simulated", _mixture(2000), 3), hmm_case(1000, 3)]
