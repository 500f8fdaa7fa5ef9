r"""Factorial HMM: M independent K-state Markov chains that jointly emit one observation per step.

Generative process, for chains m = 1..M, n = 1..N sequences of t = 0..T-1 steps:

.. math::
    P^{(m)}_{k,:} \sim \mathrm{Dir}(1_K), \quad W_{m,k} \sim N(0, s_0^2), \quad
    \sigma \sim \mathrm{HalfNormal}(s_0) \\
    z^{(m)}_{n,0} \sim \mathrm{Cat}(\tfrac1K 1_K), \quad
    z^{(m)}_{n,t} \mid z^{(m)}_{n,t-1} \sim \mathrm{Cat}(P^{(m)}_{z^{(m)}_{n,t-1},:}) \\
    y_{n,t} \mid z_{n,t} \sim N\Big(\sum_{m=1}^{M} W_{m, z^{(m)}_{n,t}},\ \sigma^2\Big)

Implementation. The collapse machinery marginalizes ONE ``markov_chain`` per child, so the M
chains are written exactly as one chain over the product space of K^M joint states
s = \sum_m z^{(m)} K^{M-1-m} (chain 1 is the most significant digit), with transition
P^{(1)} \otimes \cdots \otimes P^{(M)} (Kronecker product, built inside the model from the
per-chain Dirichlet rows; independence of the chains is exactly this factorization) and
joint means \mu_s = \sum_m W_{m, z^{(m)}(s)}. Forward-backward costs O(T K^{2M}): fine for
small K^M (at most ``MAX_JOINT_STATES``), not for many chains; ``chain_states`` maps a joint
path back to the per-chain paths.

Identifiability: only the sum of the per-chain offsets is identified (adding c to W_1 and
subtracting it from W_2 changes nothing), and chains and states are exchangeable; recovery
compares the centred means W_{m,k} - \bar W_m, the total offset \sum_m \bar W_m and the
per-chain transitions under the best relabelling of chains and states.

Shapes: ``y: (T,)`` or ``(N, T)`` (a plate ``"sequences"``); ``trans: (M, K, K)``;
``means: (M, K)``; ``scale: ()``; the joint chain ``z: (..., T)`` with values in [0, K^M).

Backend the compiler chooses: ``vi`` (rule ``conjugate-exponential``; ``inference/vi/linear_chain.py``): the
joint chain's log transition is linear in the logs of the Dirichlet rows and its means are linear in ``means``,
so coordinate ascent updates q(trans) (Dirichlet, from the expected joint transition counts mapped to each
chain's) and q(means) (Gaussian, a Bayesian linear regression on the expected joint states) in closed form, with
forward-backward over the joint states inside; ``scale`` (HalfNormal, not conjugate) is point-estimated in the
same loop. ``backend="exact"`` marginalizes the joint chain the same way with every global a MAP estimate.
"""
from __future__ import annotations

import contextlib
import itertools

import torch

import ppl
from ppl import dist

from . import Simulated
from .hmm import sticky_transition

EXPECTED_BACKEND = "vi"
MAX_JOINT_STATES = 256


def _check_inputs(y, M, K) -> None:
    """Raise ValueError naming the argument when the data or an option is malformed."""
    for name, value in (("M", M), ("K", K)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    if K ** M > MAX_JOINT_STATES:
        raise ValueError(f"K**M = {K ** M} joint states exceed MAX_JOINT_STATES={MAX_JOINT_STATES}; "
                         f"use fewer chains M={M} or states K={K}")
    if not isinstance(y, torch.Tensor) or not y.is_floating_point() or y.dim() not in (1, 2):
        got = (tuple(y.shape), y.dtype) if isinstance(y, torch.Tensor) else type(y).__name__
        raise ValueError(f"y must be a floating tensor of shape (T,) or (N, T), got {got}")


def kron_transitions(trans: torch.Tensor) -> torch.Tensor:
    r"""Joint transition ``(K^M, K^M)`` = P^{(1)} \otimes \cdots \otimes P^{(M)} from ``trans: (M, K, K)``.

    Entry ``[s, s']`` is \prod_m P^{(m)}[z^{(m)}(s), z^{(m)}(s')] with chain 1 the most significant digit.
    """
    joint = trans[0]
    for m in range(1, trans.shape[0]):
        rows, K = joint.shape[0], trans.shape[-1]
        joint = (joint[:, None, :, None] * trans[m][None, :, None, :]).reshape(rows * K, rows * K)
    return joint


def chain_states(joint: torch.Tensor, M: int, K: int) -> torch.Tensor:
    """Per-chain states ``(..., M)`` of joint states ``joint: (...)`` (digits base K, chain 1 first)."""
    powers = K ** torch.arange(M - 1, -1, -1, device=joint.device)
    return torch.div(joint.long().unsqueeze(-1), powers, rounding_mode="floor") % K


def chain_marginals(joint: torch.Tensor, M: int, K: int) -> torch.Tensor:
    r"""Per-chain posterior marginals ``(..., T, M, K)`` from joint ones ``joint: (..., T, K^M)``
    (e.g. ``post.marginals("z")``): p(z^{(m)}_t = k) = \sum_{s : z^{(m)}(s) = k} p(s_t = s)."""
    grid = joint.reshape(joint.shape[:-1] + (K,) * M)
    lead = joint.dim() - 1
    per_chain = [grid.sum(tuple(lead + j for j in range(M) if j != m)) if M > 1 else grid for m in range(M)]
    return torch.stack(per_chain, -2)


def joint_means(means: torch.Tensor) -> torch.Tensor:
    r"""\mu_s = \sum_m W_{m, z^{(m)}(s)}: ``(K^M,)`` from ``means: (M, K)``."""
    M, K = means.shape
    digits = chain_states(torch.arange(K ** M, device=means.device), M, K)  # (K^M, M)
    return means[torch.arange(M, device=means.device), digits].sum(-1)


@ppl.model
def factorial_hmm(y: torch.Tensor, M: int = 2, K: int = 2, prior_scale: float = 10.0):
    """Factorial HMM with ``M`` chains of ``K`` states on ``y: (T,)`` or ``(N, T)``, written as one
    chain over the K^M joint states."""
    _check_inputs(y, M, K)
    trans = ppl.sample("trans", dist.Dirichlet(y.new_ones(M, K, K)).to_event(2))
    means = ppl.sample("means", dist.Normal(y.new_zeros(M, K), prior_scale).to_event(2))
    scale = ppl.sample("scale", dist.HalfNormal(y.new_tensor(prior_scale)))
    loc = joint_means(means)
    plate = ppl.plate("sequences", y.shape[0]) if y.dim() == 2 else contextlib.nullcontext()
    with plate:
        z = ppl.markov_chain("z", K ** M, kron_transitions(trans), length=y.shape[-1])
        d = dist.Normal(loc[z], scale)
        ppl.sample("y", d.expand(torch.broadcast_shapes(d.batch_shape, y.shape)).to_event(1), obs=y)


def true_parameters(M: int, K: int) -> dict[str, torch.Tensor]:
    """Chain m: stickiness ``0.95 - 0.1 m / max(M - 1, 1)``; means ``4 * 0.4^m (k / (K-1) - 1/2)``
    (every joint state has a distinct mean), chain 1 shifted by +1; noise sd 0.4."""
    frac = torch.arange(K, dtype=torch.get_default_dtype()) / max(K - 1, 1) - 0.5
    means = torch.stack([4.0 * 0.4 ** m * frac for m in range(M)])
    means[0] += 1.0
    return {"means": means, "scale": torch.tensor(0.4),
            "stay": torch.tensor([0.95 - 0.1 * m / max(M - 1, 1) for m in range(M)])}


def _sample_chains(trans: torch.Tensor, N: int, T: int, gen: torch.Generator) -> torch.Tensor:
    """Independent per-chain paths ``(N, T, M)`` with uniform initial states; ``trans: (M, K, K)``."""
    M, K, _ = trans.shape
    z = [torch.randint(K, (N, M), generator=gen)]
    chains = torch.arange(M).expand(N, M)
    for _ in range(1, T):
        rows = trans[chains, z[-1]].reshape(N * M, K)
        z.append(torch.multinomial(rows, 1, generator=gen).reshape(N, M))
    return torch.stack(z, 1)


def simulate(seed: int = 0, N: int | None = 4, T: int = 150, M: int = 2, K: int = 2) -> Simulated:
    """Draw ``y: (N, T)`` (``(T,)`` with ``N=None``) from M independent sticky chains (``true_parameters``;
    off-diagonal rows split by a seeded Dirichlet draw as in ``ppl.models.hmm.sticky_transition``)."""
    gen = torch.Generator().manual_seed(seed)
    truth = true_parameters(M, K)
    trans = torch.stack([sticky_transition(K, gen, float(s)) for s in truth.pop("stay")])
    states = _sample_chains(trans, 1 if N is None else N, T, gen)  # (N, T, M)
    loc = truth["means"][torch.arange(M), states].sum(-1)
    y = loc + truth["scale"] * torch.randn(loc.shape, generator=gen)
    powers = K ** torch.arange(M - 1, -1, -1)
    z = (states * powers).sum(-1)
    if N is None:
        y, z, states = y[0], z[0], states[0]
    return Simulated((y,), {"M": M, "K": K}, {**truth, "trans": trans, "z": z, "chain_states": states})


def infer_options(sim: Simulated) -> dict:
    """The vi backend's defaults (3 data-driven starts screened by 10 sweeps, coordinate ascent to relative change
    1e-6)."""
    return {}


def _relabel(x: torch.Tensor, chains: tuple, states: tuple, per_state_dims: int) -> torch.Tensor:
    """Reorder ``x: (M, K, ...)`` by a chain permutation and per-chain state permutations (applied to
    the first ``per_state_dims`` state dims: 1 for means, 2 for transitions)."""
    out = []
    for m, c in enumerate(chains):
        perm = list(states[m])
        block = x[c][perm]
        out.append(block[:, perm] if per_state_dims == 2 else block)
    return torch.stack(out)


def best_relabelling(means: torch.Tensor, truth: torch.Tensor) -> tuple[tuple, tuple]:
    """(chain permutation, per-chain state permutations) minimizing the largest error of the centred
    means ``W - mean_k W``; exhaustive over M! K!^M relabellings."""
    M, K = truth.shape
    centre = lambda w: w - w.mean(-1, keepdim=True)  # noqa: E731
    options = itertools.product(itertools.permutations(range(M)),
                                itertools.product(itertools.permutations(range(K)), repeat=M))
    return min(options, key=lambda o: float((centre(_relabel(means, *o, 1)) - centre(truth)).abs().max()))


def recovery_errors(post, sim: Simulated) -> dict[str, float]:
    """Largest errors under the best relabelling of chains and states: centred means, total offset
    ``sum_m mean_k W_m`` (the identified part of the offsets), per-chain transitions, noise sd."""
    est_means, est_trans = post.mean("means"), post.mean("trans")
    truth = {k: v.to(est_means) for k, v in sim.truth.items() if k in ("means", "trans", "scale")}
    chains, states = best_relabelling(est_means, truth["means"])
    means = _relabel(est_means, chains, states, 1)
    centre = lambda w: w - w.mean(-1, keepdim=True)  # noqa: E731
    return {"means": float((centre(means) - centre(truth["means"])).abs().max()),
            "offset": float((means.mean(-1).sum() - truth["means"].mean(-1).sum()).abs()),
            "trans": float((_relabel(est_trans, chains, states, 2) - truth["trans"]).abs().max()),
            "scale": float((post.mean("scale") - truth["scale"]).abs())}


TOLERANCES = {
    # 600 observations, joint states 1.5 sds of noise apart (sigma = 0.4): each centred mean is a contrast
    # of ~300 vs ~300 points, sd ~ 0.4 / sqrt(150) ~ 0.03 -> 0.15; the offset, sd ~ 0.4 / sqrt(600) plus
    # the persistence of the chains -> 0.15; noise sd: sd ~ 0.4 / sqrt(1200) ~ 0.012 -> 0.06.
    "means": 0.15, "offset": 0.15, "scale": 0.06,
    # ~300 visits per state and chain: a transition entry has sd ~ sqrt(0.05 * 0.95 / 300) ~ 0.013 for the
    # sticky chain, ~0.02 for the faster one -> 0.08.
    "trans": 0.08,
}
model = factorial_hmm
