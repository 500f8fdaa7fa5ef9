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


def generator_on(generator: torch.Generator | None, device: torch.device) -> torch.Generator | None:
    """``generator`` itself when it is None or lives on ``device``'s type; else a generator there seeded from one
    draw of ``generator`` (so a seeded CPU generator still makes the draws on a GPU reproducible)."""
    if generator is None or generator.device.type == device.type:
        return generator
    seed = int(torch.randint(2 ** 62, (1,), generator=generator, device=generator.device))
    return torch.Generator(device).manual_seed(seed)


def discrete_sample(table, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """``n`` exact posterior paths ``(n, ..., T)`` (forward-filter backward-sample); ``generator`` may live on
    another device than the table (``generator_on``)."""
    return hmm.sample(*discrete_args(table), sample_shape=(n,), time_varying=table.time_varying,
                      generator=generator_on(generator, table.log_lik.device))


def lds_prior(chain_dist, center: torch.Tensor | None = None) -> "kalman.LDSPrior":
    """The LDS prior of a ``GaussianChain`` distribution, per-step parameters expanded to T-1 steps; with a
    ``center`` path ``(..., T, D)``, the prior of ``u = x - center``: initial mean m0 - c_0, offsets
    b_t + A_t c_{t-1} - c_t (same dynamics and noise)."""
    d = chain_dist
    T, D = d.length, d.dim
    A, Q, offsets = d.dynamics, d.noise_cov, d.offsets
    if d.time_varying:
        A = A.expand(A.shape[:-3] + (T - 1, D, D))
        Q = Q.expand(Q.shape[:-3] + (T - 1, D, D))
    loc = d.initial_loc
    if center is not None:
        step_A = A if d.time_varying else A.unsqueeze(-3)
        shift = (step_A @ center[..., :-1, :, None]).squeeze(-1) - center[..., 1:, :]
        offsets = shift if offsets is None else offsets + shift
        loc = loc - center[..., 0, :]
    return kalman.LDSPrior(loc, d.initial_cov, A, Q, offsets, time_varying=d.time_varying)


def gaussian_log_normalizer(table) -> torch.Tensor:
    """log \\int p(u) prod_t exp(-1/2 u_t'J_t u_t + h_t'u_t) du per sequence ``(...)`` (u = x - center; constant
    excluded), in float64: it is added to the table's constant."""
    return kalman.info_log_normalizer64(lds_prior(table.prior, table.center), table.J, table.h)


def gaussian_posterior(table):
    """SmootherResult (mean (..., T, D), cov, cross_cov, log_normalizer) of the chain given its children."""
    post = kalman.info_smoother(lds_prior(table.prior, table.center), table.J, table.h)
    return post if table.center is None else post._replace(mean=post.mean + table.center)


def gaussian_sample(table, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """``n`` exact posterior paths ``(n, ..., T, D)``; ``generator`` may live on another device than the table."""
    u = kalman.info_sample(lds_prior(table.prior, table.center), table.J, table.h, sample_shape=(n,),
                           generator=generator_on(generator, table.h.device))
    return u if table.center is None else u + table.center


def gaussian_filtered_means(table) -> torch.Tensor:
    """Filtered means ``(..., T, D)`` of the chain given its children (detached): a path near the data."""
    with torch.no_grad():
        f = kalman.info_filter(lds_prior(table.prior, table.center), table.J.detach(), table.h.detach())
    return f.filtered_mean if table.center is None else f.filtered_mean + table.center
