r"""Input–output hidden Markov model (Bengio & Frasconi 1995): inputs drive the transitions.

Generative process, for K hidden states, inputs u_{n,t} \in R^U, n = 1..N sequences of
t = 0..T-1 steps:

.. math::
    B_{ij} \sim N(0, s_w^2), \quad W_{ij} \sim N(0, s_w^2 I_U), \quad
    \mu_k \sim N(0, s_0^2), \quad \sigma_k \sim \mathrm{HalfNormal}(s_0) \\
    P^{(t)}_{ij}(u) = \frac{\exp(B_{ij} + W_{ij}^\top u_{n,t})}{\sum_{j'} \exp(B_{ij'} + W_{ij'}^\top u_{n,t})}, \quad
    z_{n,0} \sim \mathrm{Cat}(\tfrac1K 1_K), \quad
    z_{n,t} \mid z_{n,t-1} \sim \mathrm{Cat}\big(P^{(t)}_{z_{n,t-1},:}(u_{n,t})\big) \\
    y_{n,t} \mid z_{n,t} \sim N(\mu_{z_{n,t}}, \sigma_{z_{n,t}}^2)

The transition into step t uses the input u_{n,t} (u_{n,0} is unused). Softmax rows are
invariant to adding a constant to every entry of a row, so only the row-centred logits are
identified: recovery compares the centred input weights W_{ij} - \bar W_{i\cdot}.

Shapes: ``y: (T,)`` with ``u: (T, U)``, or ``y: (N, T)`` with ``u: (N, T, U)`` (a plate
``"sequences"`` over N); ``trans_bias: (K, K)``; ``trans_weights: (K, K, U)``; ``loc, scale: (K,)``;
the chain ``z: (..., T)``.

Backend the compiler chooses: ``exact`` (rule ``exact-chains``: z is marginalized by the
forward algorithm with time-varying transitions ``(..., T-1, K, K)``, its children tabulated
state by state; the globals are MAP estimates on the exact marginal likelihood).
"""
from __future__ import annotations

import contextlib
import math

import torch

import ppl
from ppl import dist

from . import Simulated
from ._util import best_permutation

EXPECTED_BACKEND = "exact"


def _check_inputs(y, u, K) -> None:
    """Raise ValueError naming the argument when the data or an option is malformed."""
    if isinstance(K, bool) or not isinstance(K, int) or K < 1:
        raise ValueError(f"K must be an integer >= 1, got {K!r}")
    if not isinstance(y, torch.Tensor) or not y.is_floating_point() or y.dim() not in (1, 2):
        got = (tuple(y.shape), y.dtype) if isinstance(y, torch.Tensor) else type(y).__name__
        raise ValueError(f"y must be a floating tensor of shape (T,) or (N, T), got {got}")
    if not isinstance(u, torch.Tensor) or u.dim() != y.dim() + 1 or u.shape[:-1] != y.shape:
        got = tuple(u.shape) if isinstance(u, torch.Tensor) else type(u).__name__
        raise ValueError(f"u must have shape {tuple(y.shape)} + (input_dim,) to match y, got {got}")
    if not u.is_floating_point() or not bool(torch.isfinite(u).all()):
        raise ValueError("u must be a finite floating tensor")


def transition_probs(bias: torch.Tensor, weights: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    r"""Input-driven transition matrices P^{(t)}_{ij} = \mathrm{softmax}_j(B_{ij} + W_{ij}^\top u_t).

    bias: ``(K, K)``; weights: ``(K, K, U)``; u: ``(..., T, U)``. Returns ``(..., T, K, K)``, rows
    summing to one.
    """
    logits = bias + torch.einsum("...tu,iju->...tij", u, weights)
    return logits.softmax(-1)


@ppl.model
def iohmm(y: torch.Tensor, u: torch.Tensor, K: int = 3, prior_scale: float = 10.0, weight_scale: float = 3.0):
    """Input–output HMM with ``K`` states on ``y: (T,)`` / ``(N, T)`` driven by ``u: (T, U)`` / ``(N, T, U)``."""
    _check_inputs(y, u, K)
    U = u.shape[-1]
    bias = ppl.sample("trans_bias", dist.Normal(y.new_zeros(K, K), weight_scale).to_event(2))
    weights = ppl.sample("trans_weights", dist.Normal(y.new_zeros(K, K, U), weight_scale).to_event(3))
    loc = ppl.sample("loc", dist.Normal(y.new_zeros(K), prior_scale).to_event(1))
    scale = ppl.sample("scale", dist.HalfNormal(y.new_full((K,), prior_scale)).to_event(1))
    u = u.to(y.dtype)
    plate = ppl.plate("sequences", y.shape[0]) if y.dim() == 2 else contextlib.nullcontext()
    with plate:
        z = ppl.markov_chain("z", K, lambda inputs: transition_probs(bias, weights, inputs),
                             length=y.shape[-1], inputs=u)
        emission = dist.Normal(loc[z], scale[z])
        ppl.sample("y", emission.expand(torch.broadcast_shapes(emission.batch_shape, y.shape)).to_event(1), obs=y)


def true_parameters(K: int, U: int, strength: float = 1.5, stickiness: float = 1.0) -> dict[str, torch.Tensor]:
    r"""Known parameters: state j has a preferred input direction v_j (unit vectors spread over the
    first two input dims), W_{ij} = \text{strength}\, v_j for every row i, B = \text{stickiness}\, I;
    means ``4(k - (K-1)/2)``, sds ``0.5``. ``trans_weights: (K, K, U)``, ``trans_bias: (K, K)``."""
    angles = 2 * math.pi * torch.arange(K, dtype=torch.get_default_dtype()) / K
    directions = torch.zeros(K, U)
    directions[:, 0] = angles.cos()
    if U > 1:
        directions[:, 1] = angles.sin()
    k = torch.arange(K, dtype=torch.get_default_dtype())
    return {"trans_weights": strength * directions.expand(K, K, U).clone(), "trans_bias": stickiness * torch.eye(K),
            "loc": 4.0 * (k - (K - 1) / 2), "scale": torch.full((K,), 0.5)}


def _sample_states(probs: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Paths ``(N, T)`` with uniform z_0 and time-varying transitions ``probs: (N, T, K, K)``."""
    N, T, K = probs.shape[0], probs.shape[1], probs.shape[-1]
    z = [torch.randint(K, (N,), generator=gen)]
    for t in range(1, T):
        rows = probs[torch.arange(N), t, z[-1]]
        z.append(torch.multinomial(rows, 1, generator=gen).squeeze(-1))
    return torch.stack(z, -1)


def simulate(seed: int = 0, N: int = 4, T: int = 250, K: int = 3, U: int = 2) -> Simulated:
    """Draw iid standard-normal inputs ``u: (N, T, U)``, states from the input-driven chain of
    ``true_parameters`` and observations ``y: (N, T)``."""
    gen = torch.Generator().manual_seed(seed)
    truth = true_parameters(K, U)
    u = torch.randn(N, T, U, generator=gen)
    z = _sample_states(transition_probs(truth["trans_bias"], truth["trans_weights"], u), gen)
    y = truth["loc"][z] + truth["scale"][z] * torch.randn(N, T, generator=gen)
    return Simulated((y, u), {"K": K}, {**truth, "z": z})


def init_values(y: torch.Tensor, u: torch.Tensor, K: int) -> dict[str, torch.Tensor]:
    """MAP starting values breaking the label symmetry: ``loc`` at the data's ``(k + 1/2)/K``
    quantiles, ``scale`` = sd(y) / K, sticky ``trans_bias = I``, zero ``trans_weights: (K, K, U)``."""
    flat = y.reshape(-1)
    qs = torch.quantile(flat, (torch.arange(K, dtype=y.dtype, device=y.device) + 0.5) / K)
    return {"loc": qs, "scale": flat.std().expand(K) / K,
            "trans_bias": torch.eye(K, dtype=y.dtype, device=y.device),
            "trans_weights": y.new_zeros(K, K, u.shape[-1])}


def infer_options(sim: Simulated) -> dict:
    """MAP by Adam from ``init_values``."""
    (y, u), K = sim.args, sim.kwargs["K"]
    return dict(num_steps=150, lr=0.05, init=init_values(y, u, K))


def centred_weights(weights: torch.Tensor) -> torch.Tensor:
    r"""The identified part of the input weights: W_{ij} - \frac1K \sum_{j'} W_{ij'}, ``(K, K, U)``."""
    return weights - weights.mean(-2, keepdim=True)


def recovery_errors(post, sim: Simulated) -> dict[str, float]:
    """Largest absolute errors under the best relabelling of the states (chosen on ``loc``):
    emission means and sds, and the centred input weights (permuted on rows and columns)."""
    perm = best_permutation(post.mean("loc"), sim.truth["loc"])
    weights = centred_weights(post.mean("trans_weights"))[perm][:, perm]
    truth = sim.truth
    return {"loc": float((post.mean("loc")[perm] - truth["loc"]).abs().max()),
            "scale": float((post.mean("scale")[perm] - truth["scale"]).abs().max()),
            "input_effect": float((weights - centred_weights(truth["trans_weights"])).abs().max())}


TOLERANCES = {
    # 1000 observations, ~330 per state, sd 0.5 and means 4 apart (states nearly certain):
    # sd of a mean 0.5 / sqrt(330) ~ 0.03 -> 0.15; of an sd ~0.02 -> 0.1.
    "loc": 0.15, "scale": 0.1,
    # each row is a multinomial logistic regression on ~330 transitions with 2 inputs (effects of
    # size 1.5): standard errors of the centred coefficients ~0.1-0.15; the max over 18 entries was
    # 0.27-0.38 on seeds 0-4 -> 0.6.
    "input_effect": 0.6,
}
model = iohmm
