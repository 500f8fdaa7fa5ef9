"""No-U-Turn sampler over a batched potential: C chains advanced together, one potential call for all of them.

The sampler sees the model only through

    potential_and_grad(z: (A, D)) -> (U: (A,), grad: (A, D))      U(z) = -log p(z | data) + const

evaluated on the ``A <= C`` chains still moving (chains whose trajectory has ended are masked, their
state frozen). It is the multinomial NUTS of Betancourt (2017, "A conceptual introduction to Hamiltonian
Monte Carlo", appendix A), as in Stan and NumPyro: the trajectory doubles forwards or backwards in time;
each new subtree of ``2^j`` leapfrog steps is built iteratively (Phan et al. 2019, NumPyro) with U-turn
checks at the checkpoints of its complete sub-subtrees; the draw is chosen by progressive multinomial
sampling, uniform within a subtree and biased towards the new subtree at each doubling; a subtree with a
U-turn or a divergence (energy error > ``MAX_DELTA_ENERGY``) ends the trajectory and is not drawn from.

With kinetic energy ``K(r) = r' M^-1 r / 2`` (``M^-1`` the inverse mass matrix, diagonal or dense, per
chain), a leapfrog step of size e is ``r <- r - e/2 dU(z); z <- z + e M^-1 r; r <- r - e/2 dU(z)``; the
U-turn criterion between ends with momenta r_-, r_+ and momentum sum rho is
``(M^-1 r_-)'(rho - (r_- + r_+)/2) <= 0 or (M^-1 r_+)'(rho - (r_- + r_+)/2) <= 0``.

Warmup (Stan's): dual averaging of log step size towards a target acceptance statistic (Hoffman & Gelman
2014, gamma 0.05, t0 10, kappa 0.75, mu = log(10 e)); the inverse mass matrix is the regularized sample
variance (or covariance) of the draws of each slow window (init buffer 75, first window 25 doubling,
term buffer 50; 15% / 75% / 10% of a short warmup), after which the step size is re-initialized and its
adaptation restarted. Every chain adapts its own step size and mass matrix.

Cost: for a small model the sampler's time is the number of tensor ops per leapfrog step (a few microseconds
each, whatever their size), so a leaf does one packed leapfrog, one energy, one weight update and all its U-turn
checks against the completed sub-subtrees as one batched op over the checkpoints; the chains' values that a
finished (turned or diverged) subtree no longer needs are left unmasked; the sampler runs under
``torch.inference_mode`` (no autograd bookkeeping per op), calling a potential that needs autograd outside it.

Randomness: chain c draws every random number from its own ``torch.Generator`` (seeded from ``seed`` and
c), a fixed number per iteration, so a chain's draws do not depend on which other chains run beside it,
and a run continued from its ``SamplerState`` gives the draws the uninterrupted run would have.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from ..training import Interrupted, progress_bar

PotentialAndGrad = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]

MAX_DELTA_ENERGY = 1000.0
"""A leapfrog step whose energy exceeds the trajectory's initial energy by more than this diverges."""

INIT_BUFFER, BASE_WINDOW, TERM_BUFFER = 75, 25, 50
"""Stan's warmup windows: fast step-size-only buffer, first slow (mass matrix) window, final fast buffer."""

STAT_NAMES = ("diverging", "tree_depth", "n_steps", "step_size", "accept_prob", "energy")


# ---------------------------------------------------------------- randomness


def chain_seeds(seed: int, num_chains: int) -> list[int]:
    """One 63-bit seed per chain from ``seed`` (NumPy's SeedSequence spawning): chain c's seed depends on
    (seed, c) only, not on how many chains run."""
    children = np.random.SeedSequence(seed % 2 ** 63).spawn(num_chains)
    return [int(child.generate_state(1, np.uint64)[0] >> np.uint64(1)) for child in children]


def make_generators(seeds: list[int], device: torch.device) -> list[torch.Generator]:
    """A ``torch.Generator`` on ``device`` per chain, seeded with ``seeds[c]``."""
    return [torch.Generator(device=device).manual_seed(s) for s in seeds]


# ---------------------------------------------------------------- metric


@dataclass(frozen=True)
class Metric:
    """Inverse mass matrices of C chains: ``inv_mass`` ``(C, D)`` (diagonal) or ``(C, D, D)`` (dense).

    ``chol`` is the lower Cholesky factor L of a dense ``inv_mass`` (``None`` for a diagonal one): momenta
    ``r ~ N(0, M)`` are drawn as ``r = L^-T eps`` (so Cov r = (L L')^-1 = M), eps standard normal."""

    inv_mass: torch.Tensor
    chol: torch.Tensor | None = None

    @staticmethod
    def of(inv_mass: torch.Tensor) -> "Metric":
        """The metric of ``inv_mass`` ``(C, D)`` or ``(C, D, D)``, its Cholesky factor computed once."""
        return Metric(inv_mass, torch.linalg.cholesky(inv_mass) if inv_mass.dim() == 3 else None)

    @property
    def dense(self) -> bool:
        return self.inv_mass.dim() == 3

    def velocity(self, r: torch.Tensor) -> torch.Tensor:
        """``M^-1 r``: ``(C, D)``."""
        if self.dense:
            return torch.einsum("cij,cj->ci", self.inv_mass, r)
        return self.inv_mass * r

    def kinetic(self, r: torch.Tensor) -> torch.Tensor:
        """``K(r) = r' M^-1 r / 2``: ``(C,)``."""
        return 0.5 * (r * self.velocity(r)).sum(-1)

    def momentum(self, eps: torch.Tensor) -> torch.Tensor:
        """A draw of ``r ~ N(0, M)`` from standard normal ``eps`` ``(C, D)``."""
        if self.dense:
            upper = self.chol.transpose(-1, -2)
            return torch.linalg.solve_triangular(upper, eps.unsqueeze(-1), upper=True).squeeze(-1)
        return eps / self.inv_mass.sqrt()


def is_turning(metric: Metric, r_left: torch.Tensor, r_right: torch.Tensor, r_sum: torch.Tensor) -> torch.Tensor:
    """The generalized U-turn criterion ``(C,)`` bool between ends with momenta ``r_left``, ``r_right``
    ``(C, D)`` and momentum sum ``r_sum`` (both ends included; the criterion is symmetric in the ends)."""
    centred = r_sum - 0.5 * (r_left + r_right)
    return ((metric.velocity(r_left) * centred).sum(-1) <= 0) | ((metric.velocity(r_right) * centred).sum(-1) <= 0)


def _checkpoints(n: int) -> tuple[int, int]:
    """(first, last) checkpoint index whose subtree the ``n``-th leaf (0-based) of an iterative subtree
    completes: last = popcount(n >> 1), first = last - (number of trailing ones of n) + 1 (none if first > last)."""
    last = bin(n >> 1).count("1")
    return last - bin((~n & (n + 1)) - 1).count("1") + 1, last


# ---------------------------------------------------------------- one transition


@dataclass(frozen=True)
class AllChains:
    """Marks a potential to be evaluated on all C chains at every leapfrog step, not only on the chains still
    moving: for a potential whose rows differ per chain (one data set per chain, as in simulation-based
    calibration) or a vectorized density where a subset saves nothing. Chains already stopped are evaluated at
    their current point and the result discarded."""

    fn: PotentialAndGrad
    needs_autograd: bool = True
    """False for a recorded graph that computes its gradient explicitly (see ``Recorded``)."""

    def __call__(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.fn(z)


@dataclass(frozen=True)
class Recorded:
    """Marks a potential that needs no autograd (a recorded graph computing its gradient explicitly): the sampler
    calls it inside its ``torch.inference_mode`` (cheaper ops), on inference tensors. Any other potential is
    called with inference mode off, on a copy of ``z`` (autograd cannot record inference tensors)."""

    fn: PotentialAndGrad
    needs_autograd = False

    def __call__(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.fn(z)


def _outside_inference_mode(potential_and_grad: PotentialAndGrad) -> PotentialAndGrad:
    """``potential_and_grad`` as the sampler calls it from inside ``torch.inference_mode``: unchanged when it needs
    no autograd (``Recorded``, ``AllChains(..., needs_autograd=False)``), else run with inference mode off on a
    copy of its input (still an ``AllChains`` if it was one)."""
    if not getattr(potential_and_grad, "needs_autograd", True):
        return potential_and_grad

    def call(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.inference_mode(False):
            return potential_and_grad(z.clone())

    return AllChains(call, needs_autograd=False) if isinstance(potential_and_grad, AllChains) else Recorded(call)


def _evaluate(potential_and_grad: PotentialAndGrad, z: torch.Tensor, rows: torch.Tensor, current: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """(U ``(C,)``, grad ``(C, D)``) of the chains where ``rows`` ``(C,)`` is True (zeros elsewhere, or, for an
    ``AllChains`` potential, its values at ``current`` ``(C, D)``)."""
    if isinstance(potential_and_grad, AllChains):
        u, grad = potential_and_grad(torch.where(rows.unsqueeze(-1), z, current))
        if u.dtype != z.dtype or grad.dtype != z.dtype:
            u, grad = u.to(z.dtype), grad.to(z.dtype)
        return u, grad
    if bool(rows.all()):
        u, grad = potential_and_grad(z)
        return u.to(z.dtype), grad.to(z.dtype)
    idx = rows.nonzero().squeeze(-1)
    u, grad = potential_and_grad(z[idx])
    return (z.new_zeros(z.shape[:1]).index_put((idx,), u.to(z.dtype)),
            torch.zeros_like(z).index_put((idx,), grad.to(z.dtype)))


def pack(z: torch.Tensor, r: torch.Tensor, u: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """A phase-space point of C chains as one ``(C, 3D + 1)`` tensor ``[z, r, grad, U]`` (one ``where``
    moves all of it)."""
    return torch.cat([z, r, grad, u.unsqueeze(-1)], -1)


def _leapfrog(potential_and_grad: PotentialAndGrad, metric: Metric, p: torch.Tensor, step: torch.Tensor,
              rows: torch.Tensor, D: int) -> torch.Tensor:
    """One leapfrog step of signed size ``step`` ``(C, 1)`` from packed points ``p`` ``(C, 3D + 1)`` for the
    chains in ``rows`` ``(C,)``. The other rows of the result are scratch, not a leapfrog step: the potential is
    not evaluated there (``AllChains``: evaluated at their current position, which they keep), and the tree
    builder ignores them."""
    half = 0.5 * step
    r_half = p[:, D:2 * D] - half * p[:, 2 * D:3 * D]
    z = p[:, :D] + step * metric.velocity(r_half)
    if isinstance(potential_and_grad, AllChains):
        z = torch.where(rows.unsqueeze(-1), z, p[:, :D])
        u, grad = potential_and_grad(z)
        if u.dtype != z.dtype or grad.dtype != z.dtype:
            u, grad = u.to(z.dtype), grad.to(z.dtype)
    else:
        u, grad = _evaluate(potential_and_grad, z, rows, p[:, :D])
    return torch.cat([z, r_half - half * grad, grad, u.unsqueeze(-1)], -1)


@dataclass(frozen=True)
class Noise:
    """The random numbers of one transition of C chains: ``momentum`` ``(C, D)`` standard normal,
    ``uniform`` ``(C, 2 max_depth + 2^max_depth)`` (directions, subtree merges, then one per leapfrog step)."""

    momentum: torch.Tensor
    uniform: torch.Tensor


def draw_noise(generators: list[torch.Generator], dim: int, max_depth: int, dtype, device) -> Noise:
    """A fixed number of random numbers per chain, each from the chain's own generator."""
    n_uniform = 2 * max_depth + 2 ** max_depth
    eps = torch.stack([torch.randn(dim, generator=g, dtype=dtype, device=device) for g in generators])
    uni = torch.stack([torch.rand(n_uniform, generator=g, dtype=dtype, device=device) for g in generators])
    return Noise(eps, uni)


def transition(potential_and_grad: PotentialAndGrad, z: torch.Tensor, u: torch.Tensor, grad: torch.Tensor,
               step_size: torch.Tensor, metric: Metric, noise: Noise, max_depth: int
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """One NUTS transition of C chains from ``z`` ``(C, D)`` with potential ``u`` ``(C,)`` and its gradient.

    Returns (z, u, grad) of the draw and per-chain statistics ``(C,)``: "diverging", "tree_depth" (doublings
    tried), "n_steps" (leapfrog steps), "accept_prob" (mean over the steps of ``min(1, exp(H0 - H))``, the
    statistic step-size adaptation targets) and "energy" (H at the draw)."""
    C, D = z.shape
    dtype, device = z.dtype, z.device
    r0 = metric.momentum(noise.momentum)
    h0 = u + metric.kinetic(r0)
    left = right = proposal = pack(z, r0, u, grad)
    log_w = torch.zeros(C, dtype=dtype, device=device)      # log sum of exp(H0 - H) over the tree
    rho = r0
    active = torch.ones(C, dtype=torch.bool, device=device)
    depth = torch.zeros(C, dtype=torch.long, device=device)
    n_steps = torch.zeros(C, dtype=torch.long, device=device)
    sum_accept = torch.zeros(C, dtype=dtype, device=device)
    diverging = torch.zeros(C, dtype=torch.bool, device=device)
    ckpt_v = torch.zeros(max(max_depth, 1), C, D, dtype=dtype, device=device)   # velocities M^-1 r at checkpoints
    ckpt_c = torch.zeros_like(ckpt_v)          # (momentum sum up to the checkpoint) - (its momentum) / 2
    log_u = noise.uniform.log()
    minus_inf = torch.tensor(-math.inf, dtype=dtype, device=device)
    for j in range(max_depth):
        if not bool(active.any()):
            break
        forward = noise.uniform[:, j] < 0.5
        step = torch.where(forward, step_size, -step_size).unsqueeze(-1)
        end = torch.where(forward.unsqueeze(-1), right, left)
        sub_proposal, sub_sum = end, torch.zeros_like(rho)
        sub_log_w = torch.full((C,), -math.inf, dtype=dtype, device=device)
        building = active
        leaf_u = log_u[:, 2 * max_depth + 2 ** j - 1:2 * max_depth + 2 ** (j + 1) - 1]
        for n in range(2 ** j):
            # ``building``: the chains whose subtree has neither turned nor diverged so far. The values of the
            # other chains below are not used: their subtree is invalid, its sums, weights and draw discarded.
            if n and not bool(building.any()):
                break
            end = _leapfrog(potential_and_grad, metric, end, step, building, D)
            r = end[:, D:2 * D]
            v = metric.velocity(r)
            neg_delta = h0 - end[:, -1] - 0.5 * (r * v).sum(-1)       # H0 - H; NaN fails the test below
            alive = building & (neg_delta >= -MAX_DELTA_ENERGY)
            diverging = diverging | (building ^ alive)
            leaf_log_w = torch.where(alive, neg_delta, minus_inf)
            sum_accept = sum_accept + leaf_log_w.clamp(max=0.0).exp()
            n_steps = n_steps + building
            new_log_w = torch.logaddexp(sub_log_w, leaf_log_w)
            take = leaf_u[:, n] < leaf_log_w - new_log_w             # False where the leaf's weight is 0
            sub_proposal = torch.where(take.unsqueeze(-1), end, sub_proposal)
            sub_log_w = new_log_w
            sub_sum = sub_sum + r
            centred = sub_sum - 0.5 * r
            first, last = _checkpoints(n)
            if first > last:                                          # n even: a checkpoint, nothing completed
                ckpt_v[last], ckpt_c[last] = v, centred
                building = alive
            else:   # the subtrees from checkpoints first..last to this leaf: all their U-turn checks at once
                centred = centred - ckpt_c[first:last + 1]                                # (k, C, D)
                dots = torch.minimum((ckpt_v[first:last + 1] * centred).sum(-1), (v * centred).sum(-1))
                building = alive & ~(dots <= 0).any(0)
        valid = building
        depth = depth + active
        take = valid & (log_u[:, max_depth + j] < sub_log_w - log_w)
        proposal = torch.where(take.unsqueeze(-1), sub_proposal, proposal)
        log_w = torch.where(valid, torch.logaddexp(log_w, sub_log_w), log_w)
        rho = torch.where(valid.unsqueeze(-1), rho + sub_sum, rho)
        right = torch.where((valid & forward).unsqueeze(-1), end, right)
        left = torch.where((valid & ~forward).unsqueeze(-1), end, left)
        active = valid & ~is_turning(metric, left[:, D:2 * D], right[:, D:2 * D], rho)
    stats = {"diverging": diverging, "tree_depth": depth, "n_steps": n_steps,
             "accept_prob": sum_accept / n_steps.clamp(min=1).to(dtype),
             "energy": proposal[:, -1] + metric.kinetic(proposal[:, D:2 * D])}
    return proposal[:, :D], proposal[:, -1], proposal[:, 2 * D:3 * D], stats


# ---------------------------------------------------------------- warmup


def find_step_size(potential_and_grad: PotentialAndGrad, z: torch.Tensor, u: torch.Tensor, grad: torch.Tensor,
                   metric: Metric, eps: torch.Tensor, step_size: torch.Tensor, max_iter: int = 100) -> torch.Tensor:
    """Stan's step-size initialization, per chain ``(C,)``: from ``step_size``, double (or halve) it until one
    leapfrog step from ``z`` with momentum ``metric.momentum(eps)`` crosses an acceptance of 0.8."""
    r = metric.momentum(eps)
    h0 = u + metric.kinetic(r)
    D = z.shape[-1]
    start = pack(z, r, u, grad)
    all_rows = torch.ones_like(u, dtype=torch.bool)

    def log_accept(step):
        p = _leapfrog(potential_and_grad, metric, start, step.unsqueeze(-1), all_rows, D)
        d = h0 - p[:, -1] - metric.kinetic(p[:, D:2 * D])
        return torch.where(torch.isfinite(d), d, torch.full_like(d, -math.inf))

    threshold = math.log(0.8)
    direction = torch.where(log_accept(step_size) > threshold, 2.0, 0.5).to(step_size.dtype)
    searching = torch.ones_like(all_rows)
    for _ in range(max_iter):
        if not bool(searching.any()):
            break
        step_size = torch.where(searching, step_size * direction, step_size)
        la = log_accept(step_size)
        crossed = torch.where(direction > 1, la <= threshold, la > threshold)
        searching = searching & ~crossed & (step_size > 1e-10) & (step_size < 1e7)
    return step_size


@dataclass
class DualAveraging:
    """Nesterov dual averaging of log step size (Hoffman & Gelman 2014, Alg. 5), per chain ``(C,)``:
    ``H_t = (1 - 1/(t + t0)) H_{t-1} + (target - a_t)/(t + t0)``, ``log e_t = mu - sqrt(t)/gamma H_t``,
    ``log e_bar_t = t^-kappa log e_t + (1 - t^-kappa) log e_bar_{t-1}``, mu = log(10 e_0)."""

    mu: torch.Tensor
    log_step: torch.Tensor
    log_step_avg: torch.Tensor
    h_bar: torch.Tensor
    t: int = 0
    gamma: float = 0.05
    t0: float = 10.0
    kappa: float = 0.75

    @staticmethod
    def start(step_size: torch.Tensor) -> "DualAveraging":
        zero = torch.zeros_like(step_size)
        return DualAveraging(torch.log(10 * step_size), step_size.log(), zero, zero.clone())

    def update(self, accept_prob: torch.Tensor, target: float) -> None:
        """One step with the acceptance statistics ``(C,)``."""
        self.t += 1
        w = 1.0 / (self.t + self.t0)
        self.h_bar = (1 - w) * self.h_bar + w * (target - accept_prob)
        self.log_step = self.mu - math.sqrt(self.t) / self.gamma * self.h_bar
        eta = self.t ** -self.kappa
        self.log_step_avg = eta * self.log_step + (1 - eta) * self.log_step_avg


def slow_windows(num_warmup: int) -> list[tuple[int, int]]:
    """Stan's mass-matrix windows ``[(start, end), ...]`` (end exclusive) over ``num_warmup`` iterations:
    after an initial buffer of 75, windows of 25, 50, 100, ... (the last one stretched to the start of the
    final buffer of 50); 15% / 75% / 10% when the warmup is shorter than 150; none below 20 iterations."""
    if num_warmup < 20:
        return []
    init, base, term = INIT_BUFFER, BASE_WINDOW, TERM_BUFFER
    if init + base + term > num_warmup:
        init, term = int(0.15 * num_warmup), int(0.1 * num_warmup)
        base = num_warmup - init - term
    windows, start, size, stop = [], init, base, num_warmup - term
    while start < stop:
        end = start + size
        if end + 2 * size > stop:
            end = stop
        windows.append((start, end))
        start, size = end, 2 * size
    return windows


def estimate_inv_mass(draws: torch.Tensor, dense: bool) -> torch.Tensor:
    """Stan's regularized estimate from window draws ``(C, n, D)``: ``n/(n+5) S + 1e-3 5/(n+5) I`` with S the
    sample covariance ``(C, D, D)`` (dense) or variance ``(C, D)``."""
    n = draws.shape[1]
    centred = draws - draws.mean(1, keepdim=True)
    shrink, jitter = n / (n + 5.0), 1e-3 * 5.0 / (n + 5.0)
    if dense:
        cov = centred.transpose(1, 2) @ centred / max(n - 1, 1)
        eye = torch.eye(draws.shape[-1], dtype=draws.dtype, device=draws.device)
        return shrink * cov + jitter * eye
    return shrink * centred.pow(2).sum(1) / max(n - 1, 1) + jitter


# ---------------------------------------------------------------- the sampler


@dataclass
class SamplerState:
    """Where a run stopped, enough to continue it: positions ``z`` ``(C, D)``, adapted ``step_size`` ``(C,)``,
    inverse mass matrix ``(C, D)`` or ``(C, D, D)``, each chain's generator state, and the options the
    transitions use. Plain tensors: it pickles."""

    z: torch.Tensor
    step_size: torch.Tensor
    inv_mass: torch.Tensor
    rng_states: list[torch.Tensor]
    max_tree_depth: int
    target_accept: float


@dataclass
class NUTSRun:
    """A run's draws ``(C, N, D)`` (unconstrained), statistics name -> ``(C, N)`` (``STAT_NAMES``), the state
    to continue from, and whether the user stopped it (then N is the number of draws reached)."""

    draws: torch.Tensor
    stats: dict[str, torch.Tensor]
    state: SamplerState
    interrupted: bool = False


def _check_options(num_samples, warmup_steps, target_accept, max_tree_depth) -> None:
    for name, value, low in (("num_samples", num_samples, 1), ("warmup_steps", warmup_steps, 0),
                             ("max_tree_depth", max_tree_depth, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"NUTS: {name} must be an integer >= {low}, got {value!r}")
    if not isinstance(target_accept, (int, float)) or not 0 < target_accept < 1:
        raise ValueError(f"NUTS: target_accept must be a number in (0, 1), got {target_accept!r}")


def _warmup(potential_and_grad, z, u, grad, generators, num_warmup, dense, target_accept, max_depth, bar):
    """Adapt step size and inverse mass matrix over ``num_warmup`` transitions; returns (z, u, grad, step, metric)."""
    C, D = z.shape
    metric = Metric.of(torch.eye(D, dtype=z.dtype, device=z.device).expand(C, D, D).clone() if dense
                       else torch.ones(C, D, dtype=z.dtype, device=z.device))
    noise = draw_noise(generators, D, max_depth, z.dtype, z.device)
    step = find_step_size(potential_and_grad, z, u, grad, metric, noise.momentum, torch.ones_like(u))
    adapt = DualAveraging.start(step)
    windows = slow_windows(num_warmup)
    ends = {end: start for start, end in windows}
    starts = {start for start, _ in windows}
    window: list[torch.Tensor] = []
    for i in range(num_warmup):
        noise = draw_noise(generators, D, max_depth, z.dtype, z.device)
        z, u, grad, stats = transition(potential_and_grad, z, u, grad, step, metric, noise, max_depth)
        adapt.update(stats["accept_prob"], target_accept)
        step = adapt.log_step.exp()
        if i in starts:
            window = []
        if any(s <= i < e for s, e in windows):
            window.append(z)
        if i + 1 in ends:
            metric = Metric.of(estimate_inv_mass(torch.stack(window, 1), dense))
            noise = draw_noise(generators, D, max_depth, z.dtype, z.device)
            step = find_step_size(potential_and_grad, z, u, grad, metric, noise.momentum, step)
            adapt = DualAveraging.start(step)
        bar.update()
    final = adapt.log_step_avg.exp() if adapt.t > 0 else step
    return z, u, grad, final, metric


def sample(potential_and_grad: PotentialAndGrad, init: torch.Tensor | None, num_samples: int,
           warmup_steps: int = 1000, seed: int = 0, seeds: list[int] | None = None, dense_mass: bool = False,
           target_accept: float = 0.8, max_tree_depth: int = 10, state: SamplerState | None = None,
           progress: bool = False) -> NUTSRun:
    """Run C chains of NUTS: ``warmup_steps`` adaptation transitions, then ``num_samples`` draws.

    potential_and_grad: ``z (A, D) -> (U (A,), dU/dz (A, D))``, ``U = -log density`` (up to a constant),
        called on the ``A <= C`` chains still moving (wrap it in ``AllChains`` to have it called on all C).
    init: starting points ``(C, D)`` (ignored when continuing from ``state``).
    seed / seeds: chain c uses ``seeds[c]`` if given, else ``chain_seeds(seed, C)[c]``.
    dense_mass: adapt a dense (else diagonal) inverse mass matrix.
    state: a previous run's ``SamplerState``: continue from it with its step size, mass matrix and random
        streams, without warmup (``warmup_steps`` must be 0).

    Ctrl-C during the draws returns the draws reached with ``interrupted=True`` (an ``Interrupted`` warning);
    during warmup there is nothing to return and KeyboardInterrupt propagates.
    """
    _check_options(num_samples, warmup_steps, target_accept, max_tree_depth)
    if state is not None:
        if warmup_steps:
            raise ValueError(f"NUTS: continuing from a SamplerState runs no warmup, got warmup_steps={warmup_steps}")
        z = state.z
        generators = make_generators([0] * z.shape[0], z.device)
        for g, s in zip(generators, state.rng_states):
            g.set_state(s)
        max_tree_depth, target_accept = state.max_tree_depth, state.target_accept
    else:
        if init is None or init.dim() != 2:
            raise ValueError(f"NUTS: init must be a (chains, dim) tensor, got "
                             f"{None if init is None else tuple(init.shape)}")
        z = init
        seeds = chain_seeds(seed, z.shape[0]) if seeds is None else list(seeds)
        if len(seeds) != z.shape[0]:
            raise ValueError(f"NUTS: seeds has {len(seeds)} entries for {z.shape[0]} chains")
        generators = make_generators(seeds, z.device)
    potential_and_grad = _outside_inference_mode(potential_and_grad)
    bar = progress_bar("NUTS", warmup_steps + num_samples, progress)
    # inference mode: the sampler's many small tensor ops skip autograd's bookkeeping (~25% cheaper each)
    with torch.inference_mode():
        draws, stats, state_out, interrupted = _run(potential_and_grad, z, state, generators, num_samples,
                                                    warmup_steps, dense_mass, target_accept, max_tree_depth, bar)
    # out of inference mode: the results become ordinary tensors (copies)
    out_stats = {k: torch.stack([s[k] for s in stats], 1) for k in STAT_NAMES}
    last_z, step, inv_mass, rng_states = state_out
    new_state = SamplerState(last_z.clone(), step.clone(), inv_mass.clone(), [s.clone() for s in rng_states],
                             max_tree_depth, float(target_accept))
    return NUTSRun(torch.stack(draws, 1), out_stats, new_state, interrupted)


def _run(potential_and_grad, z, state, generators, num_samples, warmup_steps, dense_mass, target_accept,
         max_tree_depth, bar):
    """``sample``'s loop (under inference mode): (draws, per-draw stats, (last z, step size, inverse mass,
    generator states), interrupted)."""
    u, grad = potential_and_grad(z)
    if not bool(torch.isfinite(u).all()):
        bar.close()
        bad = torch.nonzero(~torch.isfinite(u)).flatten().tolist()
        raise ValueError(f"NUTS: the potential is not finite at the initial point of chain(s) {bad}")
    D = z.shape[1]
    try:
        if state is None:
            z, u, grad, step, metric = _warmup(potential_and_grad, z, u, grad, generators, warmup_steps,
                                               dense_mass, target_accept, max_tree_depth, bar)
        else:
            step, metric = state.step_size, Metric.of(state.inv_mass)
        draws, stats, interrupted = [], [], False
        rng_states = [g.get_state() for g in generators]
        last_z = z
        try:
            for _ in range(num_samples):
                noise = draw_noise(generators, D, max_tree_depth, z.dtype, z.device)
                z, u, grad, st = transition(potential_and_grad, z, u, grad, step, metric, noise, max_tree_depth)
                st["step_size"] = step
                draws.append(z)
                stats.append(st)
                rng_states, last_z = [g.get_state() for g in generators], z
                bar.update()
        except KeyboardInterrupt:
            if not draws:
                raise KeyboardInterrupt("NUTS: interrupted before the first draw") from None
            interrupted = True
            warnings.warn(f"NUTS: interrupted by the user after {len(draws)} of {num_samples} draws; the result "
                          "holds the draws reached (post.interrupted is True)", Interrupted, stacklevel=3)
    finally:
        bar.close()
    return draws, stats, (last_z, step, metric.inv_mass, rng_states), interrupted
