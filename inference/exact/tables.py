"""Run the exact kernels on the factors of a collapsed chain (``ppl.handlers`` tables).

A ``DiscreteTable`` goes to the HMM kernels, a ``GaussianTable`` to the information-form
Kalman kernels. These adapters only reshape; the math lives in ``hmm.py`` and ``kalman.py``.
"""
from __future__ import annotations

import torch

from . import hmm, kalman


def discrete_args(table) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(log_init (..., K), log_trans, log_lik (..., T, K)) broadcast to common batch dims."""
    log_lik = table.log_lik
    batch = log_lik.shape[:-2]
    log_init = table.log_init.expand(batch + table.log_init.shape[-1:])
    tail = 3 if table.time_varying else 2
    log_trans = table.log_trans.expand(batch + table.log_trans.shape[-tail:])
    return log_init, log_trans, log_lik


def discrete_log_normalizer(table) -> torch.Tensor:
    """log sum_z p(z) p(children | z): ``(...)`` per sequence."""
    return hmm.log_normalizer(*discrete_args(table), time_varying=table.time_varying)


def discrete_posterior(table):
    """HMMPosterior (log_normalizer, marginals (..., T, K), pairwise) of the chain given its children."""
    return hmm.posterior(*discrete_args(table), time_varying=table.time_varying)


def discrete_viterbi(table) -> torch.Tensor:
    """Most probable path ``(..., T)``."""
    return hmm.viterbi(*discrete_args(table), time_varying=table.time_varying).states


def discrete_sample(table, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """``n`` exact posterior paths ``(n, ..., T)`` (forward-filter backward-sample)."""
    return hmm.sample(*discrete_args(table), sample_shape=(n,), time_varying=table.time_varying,
                      generator=generator)


def lds_prior(chain_dist) -> "kalman.LDSPrior":
    """The LDS prior of a ``GaussianChain`` distribution, per-step parameters expanded to T-1 steps."""
    d = chain_dist
    T, D = d.length, d.dim
    A, Q, offsets = d.dynamics, d.noise_cov, d.offsets
    if d.time_varying:
        A = A.expand(A.shape[:-3] + (T - 1, D, D))
        Q = Q.expand(Q.shape[:-3] + (T - 1, D, D))
    return kalman.LDSPrior(d.initial_loc, d.initial_cov, A, Q, offsets, time_varying=d.time_varying)


def gaussian_log_normalizer(table) -> torch.Tensor:
    """log \\int p(x) prod_t exp(-1/2 x_t'J_t x_t + h_t'x_t) dx per sequence ``(...)`` (constant excluded)."""
    return kalman.info_filter(lds_prior(table.prior), table.J, table.h).log_normalizer


def gaussian_posterior(table):
    """SmootherResult (mean (..., T, D), cov, cross_cov, log_normalizer) of the chain given its children."""
    return kalman.info_smoother(lds_prior(table.prior), table.J, table.h)


def gaussian_sample(table, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """``n`` exact posterior paths ``(n, ..., T, D)``."""
    return kalman.info_sample(lds_prior(table.prior), table.J, table.h, sample_shape=(n,), generator=generator)
