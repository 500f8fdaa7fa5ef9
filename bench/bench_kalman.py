"""Kalman kernels (``ppl.inference.exact.kalman``) against pykalman and Pyro's ``GaussianHMM``.

Every case computes the same quantity on the same data: a stable random LDS with state dim D = 4
and observation dim N = 2 over B sequences of T steps. Smoothing compares with pykalman in float64
(ours in float64 too); pykalman's ``smooth`` takes one sequence, so its batch time is a Python
loop over the sequences. The log-likelihood compares with Pyro's ``GaussianHMM.log_prob`` in
float32 (both torch, ``--threads`` threads). Pyro applies one transition before the first
observation: its ``initial_dist`` N(mu, S) is matched by our x_0 ~ N(A mu, A S A^T + Q).
"""
from __future__ import annotations

import warnings
from typing import NamedTuple

import numpy as np
import pyro.distributions as dist
import torch

from bench.harness import Case
from ppl.inference.exact.kalman import LDSPrior, kalman_smoother, log_likelihood


class Problem(NamedTuple):
    """LDS parameters (Pyro's initial state mu, S one step before x_0) and y: (batch, time, N)."""

    mu: torch.Tensor
    S: torch.Tensor
    A: torch.Tensor
    Q: torch.Tensor
    C: torch.Tensor
    d: torch.Tensor
    R: torch.Tensor
    y: torch.Tensor


def make_problem(B: int, T: int, D: int = 4, N: int = 2, dtype=torch.float64, seed: int = 0) -> Problem:
    """Random stable LDS (A = 0.95 x orthogonal) and observations simulated from it."""
    g = torch.Generator().manual_seed(seed)
    A = 0.95 * torch.linalg.qr(torch.randn(D, D, generator=g, dtype=torch.float64))[0]
    Q, R = 0.1 * torch.eye(D, dtype=torch.float64), 0.5 * torch.eye(N, dtype=torch.float64)
    C, d = torch.randn(N, D, generator=g, dtype=torch.float64), torch.randn(N, generator=g, dtype=torch.float64)
    x = torch.zeros(B, D, dtype=torch.float64)
    ys = []
    for _ in range(T):
        x = x @ A.T + torch.randn(B, D, generator=g, dtype=torch.float64) @ Q.sqrt()
        ys.append(x @ C.T + d + torch.randn(B, N, generator=g, dtype=torch.float64) @ R.sqrt())
    p = Problem(torch.zeros(D, dtype=torch.float64), torch.eye(D, dtype=torch.float64), A, Q, C, d, R,
                torch.stack(ys, 1))
    return Problem(*(t.to(dtype) for t in p))


def our_prior(p: Problem) -> LDSPrior:
    """x_0 ~ N(A mu, A S A^T + Q): the distribution Pyro's GaussianHMM gives the first observed state."""
    return LDSPrior(p.mu @ p.A.T, p.A @ p.S @ p.A.T + p.Q, p.A, p.Q)


def ours_smoother(p: Problem, mask=None):
    """Callable: our RTS smoother (means, covariances, cross-covariances, log p(y)) on the batch."""
    prior = our_prior(p)
    return lambda: kalman_smoother(prior, p.C, p.d, p.R, p.y, mask)


def pykalman_smoother(p: Problem, mask=None):
    """pykalman's ``smooth`` on each sequence in turn (missing steps as a numpy masked array)."""
    from pykalman import KalmanFilter
    prior = our_prior(p)
    kf = KalmanFilter(transition_matrices=p.A.numpy(), observation_matrices=p.C.numpy(),
                      transition_covariance=p.Q.numpy(), observation_covariance=p.R.numpy(),
                      observation_offsets=p.d.numpy(), initial_state_mean=prior.initial_loc.numpy(),
                      initial_state_covariance=prior.initial_cov.numpy())
    ys = [y.numpy() for y in p.y]
    if mask is not None:
        ys = [np.ma.masked_array(y, mask=~m[:, None].expand(y.shape).numpy()) for y, m in zip(ys, mask)]

    def run():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return [kf.smooth(y) for y in ys]
    return run


def with_grad(p: Problem) -> Problem:
    """The parameters as fresh leaves requiring grad (y stays data)."""
    return Problem(*(t.detach().clone().requires_grad_(True) for t in p[:7]), p.y)


def ours_loglik(p: Problem, grad: bool):
    """Callable: our log p(y) summed over the batch, plus backward w.r.t. the 7 parameters."""
    def run():
        q = with_grad(p) if grad else p
        ll = log_likelihood(our_prior(q), q.C, q.d, q.R, q.y).sum()
        if grad:
            ll.backward()
        return ll
    return run


def pyro_loglik(p: Problem, grad: bool):
    """Callable: Pyro ``GaussianHMM.log_prob`` summed over the batch, plus backward if ``grad``."""

    def run():
        q = with_grad(p) if grad else p
        hmm = dist.GaussianHMM(dist.MultivariateNormal(q.mu, q.S), q.A.T,
                               dist.MultivariateNormal(torch.zeros_like(q.mu), q.Q), q.C.T,
                               dist.MultivariateNormal(q.d, q.R), duration=q.y.shape[-2])
        ll = hmm.log_prob(q.y).sum()
        if grad:
            ll.backward()
        return ll
    return run


def missing_steps(p: Problem, fraction: float = 0.2, seed: int = 1) -> torch.Tensor:
    """``(batch, time)`` bool mask, True = observed, with ``fraction`` of the steps missing."""
    return torch.rand(p.y.shape[:-1], generator=torch.Generator().manual_seed(seed)) >= fraction


def check_agreement(p64: Problem, p32: Problem) -> None:
    """Ours vs the peers on the benchmark inputs (fails loudly if the rows compare different things).

    Smoothed means and covariances vs pykalman (float64 both, with and without missing steps):
    absolute 1e-8 (both are exact float64 recursions; measured differences ~1e-12). Summed
    log p(y) vs Pyro in float32: relative 1e-4 (float32 sums of B*T terms of order 1).
    """
    one = Problem(*p64[:7], p64.y[:1])
    means, covs = pykalman_smoother(one)()[0]
    sm = ours_smoother(one)()
    assert np.allclose(sm.mean[0].numpy(), means, atol=1e-8) and np.allclose(sm.cov[0].numpy(), covs, atol=1e-8)
    mask = missing_steps(one)
    means, covs = pykalman_smoother(one, mask)()[0]
    sm = ours_smoother(one, mask)()
    assert np.allclose(sm.mean[0].numpy(), means, atol=1e-8) and np.allclose(sm.cov[0].numpy(), covs, atol=1e-8)
    ours, pyro = ours_loglik(p32, False)(), pyro_loglik(p32, False)()
    assert abs(ours - pyro) <= 1e-4 * abs(pyro), f"log-likelihoods differ: {ours.item()} vs {pyro.item()}"


def cases(quick: bool) -> list[Case]:
    """Smoother vs pykalman (batch 1, B, B with missing steps), log-likelihood (and its gradient) vs
    Pyro GaussianHMM."""
    B, T = (8, 100) if quick else (64, 1000)
    p64 = make_problem(B, T)
    p32 = Problem(*(t.float() for t in p64))
    check_agreement(p64, p32)
    one = Problem(*p64[:7], p64.y[:1])
    one32 = Problem(*p32[:7], p32.y[:1])
    mask = missing_steps(p64)
    return [
        Case(f"Kalman smoother D=4 N=2 T={T} batch 1", ours_smoother(one),
             {"pykalman smooth": pykalman_smoother(one)}, "float64 both"),
        Case(f"Kalman smoother D=4 N=2 T={T} batch {B}", ours_smoother(p64),
             {"pykalman smooth": pykalman_smoother(p64)},
             f"float64 both; pykalman takes one sequence: a loop over the {B} sequences"),
        Case(f"Kalman smoother, 20% steps missing, D=4 N=2 T={T} batch {B}", ours_smoother(p64, mask),
             {"pykalman smooth": pykalman_smoother(p64, mask)},
             "float64 both; the mask makes the covariances per-sequence (work-bound for ours)"),
        Case(f"LDS log-likelihood D=4 N=2 T={T} batch 1", ours_loglik(one32, False),
             {"Pyro GaussianHMM": pyro_loglik(one32, False)}, "float32 both"),
        Case(f"LDS log-likelihood D=4 N=2 T={T} batch {B}", ours_loglik(p32, False),
             {"Pyro GaussianHMM": pyro_loglik(p32, False)}, "float32 both; log p(y) summed over the batch"),
        Case(f"LDS log-likelihood + grad D=4 N=2 T={T} batch {B}", ours_loglik(p32, True),
             {"Pyro GaussianHMM": pyro_loglik(p32, True)},
             "float32 both; backward w.r.t. all 7 LDS parameters"),
    ]


def targets(rows: list[dict]) -> list[str]:
    """Verdict on the issue's Kalman target (full-size runs only): smoother at batch 64, T = 1000
    >= 10x faster than pykalman."""
    task = "Kalman smoother D=4 N=2 T=1000 batch 64"
    r = next((r["ratio"] for r in rows if r["task"] == task and r["peer"] == "pykalman smooth"), None)
    if r is None:
        return []
    return [f"Kalman smoother batch 64 >= 10x faster than pykalman: {'met' if r >= 10 else 'NOT met'} ({r:.1f}x)"]
