"""Amortized SVI at scale: time per minibatch step and per epoch, and memory flat in N.

A factor model with Laplace local factors (not conjugate: no closed-form local posterior), N points of D = 5
dims, batch 1024: one row per N (10^5 and 10^6; --quick: 10^4 and 10^5). The timed callable is a whole
``ppl.infer`` of STEPS steps (set-up and the final full-data pass, both O(N), included); the note gives the time
per step of the same training loop timed on its own (``training.optimize`` on the backend's objective, after 3
warm-up steps: differencing two whole fits drowned the steps in the O(N) passes' jitter at N = 10^6), per epoch
(N / batch steps) and the process's peak resident memory growth during the fit; the fit touches only the
batch's rows, so the growth does not scale with N. No peer: the per-point guide of the
svi backend would need 2 x N x 2 parameters and a full pass per step.
"""
from __future__ import annotations

import resource
import time

import pyro
import torch

import ppl
from ppl import dist
from ppl.inference import training
from ppl.inference.amortized import backend as amortized

from .harness import Case

BATCH = 1024
STEPS = 30


@ppl.model
def laplace_factors(x):
    """W ~ N(0, 1); s ~ HalfNormal(1); z_n ~ Laplace(0, 1)^2; x_n ~ N(W z_n, s)."""
    N, D = x.shape
    W = ppl.sample("W", dist.Normal(x.new_zeros(D, 2), 1.0).to_event(2))
    s = ppl.sample("s", dist.HalfNormal(x.new_ones(D)).to_event(1))
    with ppl.plate("data", N):
        z = ppl.sample("z", dist.Laplace(x.new_zeros(2), 1.0).to_event(1))
        ppl.sample("x", dist.Normal(z @ W.T, s).to_event(1), obs=x)


def _data(N: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    W = torch.randn(5, 2, generator=g)
    z = torch.distributions.Laplace(0.0, 1.0).sample((N, 2))
    return z @ W.T + 0.3 * torch.randn(N, 5, generator=g)


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def step_time(x: torch.Tensor, steps: int = STEPS) -> float:
    """Seconds per step of the amortized backend's training loop (``training.optimize`` on its objective, the
    loop ``ppl.infer`` runs) on ``x``, after 3 warm-up steps."""
    with pyro.get_param_store().scope():
        plan = ppl.compile(laplace_factors, x, backend="amortized")
        objective = amortized._Objective(laplace_factors, (x,), {}, plan, BATCH, None, None)
        training.optimize(objective, 3, 0.01, False, "warm-up")
        start = time.perf_counter()
        training.optimize(objective, steps, 0.01, False, "timed")
        return (time.perf_counter() - start) / steps


def _fit(x: torch.Tensor, record: dict):
    """A whole fit of STEPS steps (the timed callable); the loop's time per step measured on its own."""
    def run():
        before = _peak_rss_mb()
        ppl.infer(laplace_factors, x, backend="amortized", num_steps=STEPS, batch_size=BATCH, num_samples=10,
                  progress=False)
        record["growth"] = _peak_rss_mb() - before
        record["step"] = step_time(x)
    return run


def cases(quick: bool) -> list[Case]:
    out = []
    for N in ((10_000, 100_000) if quick else (100_000, 1_000_000)):
        record: dict = {}
        x = _data(N)
        case = Case(f"amortized SVI, Laplace factors N={N:,} D=5, {STEPS} steps of batch {BATCH}", _fit(x, record))
        out.append(case)
        case.note = _Note(record, N)
    return out


class _Note(str):
    """The note is filled after the case ran (time per epoch, memory growth)."""

    def __new__(cls, record: dict, N: int):
        obj = super().__new__(cls, "")
        obj.record, obj.N = record, N
        return obj

    def __str__(self) -> str:
        if "step" not in self.record:
            return ""
        epoch = self.record["step"] * self.N / BATCH
        return (f"{self.record['step'] * 1e3:.1f} ms/step, {epoch:.1f} s/epoch; peak RSS growth "
                f"{self.record['growth']:.0f} MB (data {self.N * 5 * 4 / 2**20:.0f} MB)")

    def __format__(self, spec: str) -> str:
        return format(str(self), spec)
