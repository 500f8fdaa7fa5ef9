"""Probabilistic CCA / factor analysis (``models/cca.py``) in backend "vi" (``inference/vi/factor_analysis.py``:
VB factor analysis, q(z) and q(loading, loc) in closed form, the noise point-estimated in the loop) side by side
with the svi route (``cca.svi_infer_options``: 150 Adam steps, AutoNormal, from principal components) and
scikit-learn's ``FactorAnalysis(2)`` (maximum likelihood, diagonal noise, no priors; it fits the stacked views and
has no full-covariance-per-view variant, so for ``noise="full"`` it is a timing reference only).

Each row: ``cca.simulate(seed, noise=...)`` (N = 400, D1 = D2 = 3, k = 2), one whole ``ppl.infer`` call per
backend (compile included) with the library's options, process CPU and wall seconds, the recovery errors of
``cca.recovery_errors`` (the implied joint covariance, relative Frobenius; the largest error of the view means)
and the mean log-likelihood per row of each fit's point (vi: the posterior means of the loadings and locs with
the noise point estimate; svi: its guide's point; scikit-learn's ML fit; diagonal noise only), with the error of
the sample covariance itself for reference. torch uses one thread. The first timed
call of a process imports torch._dynamo (torch.optim does so on its first step, ~2.5 s), so a warm-up fit of each
backend runs first.

    python -m bench.bench_factor            # seeds 0-2, both noises
"""
from __future__ import annotations

import argparse
import os
import time
import warnings

import torch

import ppl
from ppl.models import cca


def timed(fn):
    """(fn(), wall seconds, process CPU seconds)."""
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - wall, time.process_time() - cpu


def point_loglik(post, x: torch.Tensor) -> float:
    """Mean log-likelihood per row of the stacked views at the posterior's point (diagonal noise)."""
    W = torch.cat([post.point["loading1"], post.point["loading2"]]).double()
    mu = torch.cat([post.point["loc1"], post.point["loc2"]]).double()
    psi = torch.cat([post.point["scale1"], post.point["scale2"]]).double() ** 2
    return float(torch.distributions.MultivariateNormal(mu, W @ W.T + torch.diag(psi)).log_prob(x).mean())


def sample_error(x: torch.Tensor, sim) -> float:
    """Relative Frobenius error of the sample covariance itself against the true joint covariance."""
    truth = sim.truth["joint_cov"].double()
    return float(torch.linalg.norm(torch.cov(x.T, correction=0) - truth) / torch.linalg.norm(truth))


def sklearn_fit(x: torch.Tensor):
    from sklearn.decomposition import FactorAnalysis
    return FactorAnalysis(2).fit(x.numpy())


def row(seed: int, noise: str) -> str:
    sim = cca.simulate(seed=seed, noise=noise)
    x = torch.cat(sim.args, 1).double()
    vi, w_vi, c_vi = timed(lambda: ppl.infer(cca.model, *sim.args, model_kwargs=sim.kwargs, progress=False,
                                             **cca.infer_options(sim)))
    svi, w_svi, c_svi = timed(lambda: ppl.infer(cca.model, *sim.args, model_kwargs=sim.kwargs, progress=False,
                                                backend="svi", **cca.svi_infer_options(sim)))
    fa, w_sk, c_sk = timed(lambda: sklearn_fit(x))
    e_vi, e_svi = cca.recovery_errors(vi, sim), cca.recovery_errors(svi, sim)
    text = (f"{noise:4} seed {seed}: vi ({vi.plan.backend}, {len(vi.history)} sweeps) cpu {c_vi:5.2f}s wall "
            f"{w_vi:5.2f}s cov {e_vi['joint_cov']:.3f} loc {e_vi['loc']:.3f} | svi cpu {c_svi:5.2f}s wall {w_svi:5.2f}s"
            f" cov {e_svi['joint_cov']:.3f} loc {e_svi['loc']:.3f} | sklearn FA cpu {c_sk:.3f}s | cpu svi/vi "
            f"{c_svi / c_vi:.2f}, vi/sklearn {c_vi / c_sk:.0f}")
    if noise == "diag":
        text += (f" | loglik/row vi {point_loglik(vi, x):.5f} svi {point_loglik(svi, x):.5f} sklearn "
                 f"{float(fa.score(x.numpy())):.5f} sample cov err {sample_error(x, sim):.3f}")
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    warm = cca.simulate(seed=9, N=60)
    ppl.infer(cca.model, *warm.args, model_kwargs=warm.kwargs, progress=False, num_samples=10)
    ppl.infer(cca.model, *warm.args, model_kwargs=warm.kwargs, progress=False, backend="svi", num_steps=5)
    sklearn_fit(torch.cat(warm.args, 1).double())
    print(f"load average {os.getloadavg()[0]:.2f}")
    for noise in ("full", "diag"):
        for seed in range(args.seeds):
            print(row(seed, noise), flush=True)
    print(f"load average {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
