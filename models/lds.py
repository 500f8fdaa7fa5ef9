r"""Linear dynamical system (Kalman-filter model), optionally driven by control inputs.

Generative process, for a latent path x_t in R^D, observations y_t in R^P (P >= D) and
optional inputs u_t in R^U, t = 0..T-1:

.. math::
    A_{ij} \sim N(0, 0.5^2), \quad q_i \sim \mathrm{HalfNormal}(1), \quad
    B_{iu} \sim N(0, 1), \quad \tilde C_{pi} \sim N(0, 1), \quad
    d_p \sim N(0, s_0^2), \quad r_p \sim \mathrm{HalfNormal}(1) \\
    x_0 \sim N(0, I_D), \quad
    x_t = A x_{t-1} + B u_t + w_t,\ w_t \sim N(0, \mathrm{diag}(q^2)) \\
    y_t = C x_t + d + v_t,\ v_t \sim N(0, \mathrm{diag}(r^2)), \quad
    C = \begin{bmatrix} I_D \\ \tilde C \end{bmatrix}

Identifiability. An LDS is unchanged by x -> S x (A -> S A S^{-1}, C -> C S^{-1}, ...). Fixing
the top D x D block of C to the identity pins S = I (the first D observations measure the
state directly), so A, B, C~, d, q, r are all identifiable and are compared entry by entry;
any LDS whose top D x D block of C is invertible can be written this way. All globals are
latent sample sites with weak priors (no ``ppl.param``), so ``ppl.condition`` can fix any of
them (e.g. to compute log p(y | parameters), as the peer test does).

Shapes: ``y: (T, P)`` one sequence or ``(N, T, P)`` a batch (a plate ``"sequences"``);
``inputs: (T, U)`` or ``(N, T, U)`` (u_0 is unused: x_0 has its own prior);
``dynamics: (D, D)``, ``state_noise: (D,)``, ``input_matrix: (D, U)``,
``emission_free: (P - D, D)`` (absent when P = D), ``obs_offset: (P,)``, ``obs_noise: (P,)``;
the chain ``x: (..., T, D)``.

Backend the compiler chooses: ``exact`` (rule ``exact-chains``: y is linear-Gaussian in x, so x
is marginalized by the Kalman filter and the globals are MAP estimates on the exact marginal
likelihood; ``post.smoothed_means["x"]`` holds the RTS-smoothed path).

Conjugate variant ``lds_conjugate`` (no inputs or mask): matrix-normal-inverse-Wishart priors on (A, Q) and on
([C d], R) with full covariances; the compiler routes it to ``vi`` (VB-EM: the full posterior over the globals,
the ELBO in closed form; ``conjugate_recovery_errors`` compares in the basis where C's top block is I).
"""
from __future__ import annotations

import contextlib

import torch

import ppl
from ppl import dist

from . import Simulated
from ._util import best_permutation

EXPECTED_BACKEND = "exact"


def _check_mask(y: torch.Tensor, mask) -> torch.Tensor | None:
    """``mask`` as a bool tensor of y's shape ``(..., T, P)``; a per-step mask ``(..., T)`` is broadcast
    over the P outputs. ValueError naming it when malformed."""
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or mask.shape not in (y.shape, y.shape[:-1]):
        got = (tuple(mask.shape), mask.dtype) if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise ValueError(f"mask must be a bool tensor of y's shape {tuple(y.shape)} or {tuple(y.shape[:-1])} "
                         f"(whole steps), got {got}")
    return mask if mask.shape == y.shape else mask.unsqueeze(-1).expand(y.shape)


def _check_inputs(y, D, inputs, mask=None) -> None:
    """Raise ValueError naming the argument when the data or an option is malformed (entries where
    ``mask`` is False are missing: they may hold anything, NaN included)."""
    if isinstance(D, bool) or not isinstance(D, int) or D < 1:
        raise ValueError(f"D must be an integer >= 1, got {D!r}")
    if not isinstance(y, torch.Tensor) or not y.is_floating_point() or y.dim() not in (2, 3):
        got = (tuple(y.shape), y.dtype) if isinstance(y, torch.Tensor) else type(y).__name__
        raise ValueError(f"y must be a floating tensor of shape (T, P) or (N, T, P), got {got}")
    if y.shape[-1] < D:
        raise ValueError(f"y must have P >= D = {D} columns (C's top block is the identity), "
                         f"got P={y.shape[-1]}")
    mask = _check_mask(y, mask)
    if not bool(torch.isfinite(y if mask is None else y[mask]).all()):
        raise ValueError("y must be finite where observed; mark missing entries False in mask=")
    if inputs is None:
        return
    if (not isinstance(inputs, torch.Tensor) or not inputs.is_floating_point() or inputs.dim() != y.dim()
            or inputs.shape[:-1] != y.shape[:-1]):
        got = (tuple(inputs.shape), inputs.dtype) if isinstance(inputs, torch.Tensor) else type(inputs).__name__
        raise ValueError(f"inputs must be a floating tensor of shape {tuple(y.shape[:-1])} + (U,) to match "
                         f"y {tuple(y.shape)}, got {got}")


def emission_matrix(free: torch.Tensor | None, D: int, like: torch.Tensor) -> torch.Tensor:
    """``C = [I_D; free]``: ``(P, D)`` from ``free: (P - D, D)`` (None when P = D)."""
    eye = torch.eye(D, dtype=like.dtype, device=like.device)
    return eye if free is None else torch.cat([eye, free], 0)


def _globals(y: torch.Tensor, D: int, U: int | None, prior_scale: float) -> dict:
    """Sample the global parameters (see the module docstring for their priors and shapes)."""
    P = y.shape[-1]
    out = {"dynamics": ppl.sample("dynamics", dist.Normal(y.new_zeros(D, D), 0.5).to_event(2)),
           "state_noise": ppl.sample("state_noise", dist.HalfNormal(y.new_ones(D)).to_event(1)),
           "obs_offset": ppl.sample("obs_offset", dist.Normal(y.new_zeros(P), prior_scale).to_event(1)),
           "obs_noise": ppl.sample("obs_noise", dist.HalfNormal(y.new_ones(P)).to_event(1))}
    free = None
    if P > D:
        free = ppl.sample("emission_free", dist.Normal(y.new_zeros(P - D, D), 1.0).to_event(2))
    out["emission"] = emission_matrix(free, D, y)
    if U is not None:
        out["input_matrix"] = ppl.sample("input_matrix", dist.Normal(y.new_zeros(D, U), 1.0).to_event(2))
    return out


@ppl.model
def lds(y: torch.Tensor, D: int = 2, inputs: torch.Tensor | None = None, prior_scale: float = 10.0,
        mask: torch.Tensor | None = None):
    """LDS with a ``D``-dim state on ``y: (T, P)`` or ``(N, T, P)``; ``inputs: (..., T, U)`` drive the
    state through ``input_matrix`` B (a driven LDS) when given. ``mask``: bool ``y.shape`` (or
    ``y.shape[:-1]``, whole steps), False marks a missing observation (marginalized; y may be NaN there)."""
    _check_inputs(y, D, inputs, mask)
    mask = _check_mask(y, mask)
    if mask is not None:  # a finite placeholder where y is missing (left out of the density)
        y = torch.where(mask, y, torch.zeros_like(y))
    g = _globals(y, D, None if inputs is None else inputs.shape[-1], prior_scale)
    plate = ppl.plate("sequences", y.shape[0]) if y.dim() == 3 else contextlib.nullcontext()
    with plate:
        noise_cov = torch.diag_embed(g["state_noise"] ** 2)
        x = ppl.gaussian_chain("x", D, g["dynamics"], noise_cov, length=y.shape[-2],
                               inputs=inputs, input_matrix=g.get("input_matrix"))
        loc = x @ g["emission"].transpose(-1, -2) + g["obs_offset"]
        noise = dist.Normal(loc, g["obs_noise"])
        ppl.sample("y", (noise if mask is None else noise.mask(mask)).to_event(2), obs=y)


def conjugate_priors(y: torch.Tensor, D: int, prior_scale: float = 10.0) -> dict:
    """The priors of ``lds_conjugate`` (weak; the state's scale is set by x_0 ~ N(0, I)): (A, Q) ~ MNIW(M = 0,
    column precision I_D, Psi = 0.1 I_D, nu = D + 2); (C | d, R) ~ MNIW(0, diag(1, .., 1, prior_scale^-2),
    0.1 I_P, P + 2) on ``[C | d]`` ``(P, D + 1)``, so the offset d | R ~ N(0, prior_scale^2 R)."""
    P = y.shape[-1]
    eye = lambda n: torch.eye(n, dtype=y.dtype, device=y.device)  # noqa: E731
    col = torch.cat([y.new_ones(D), y.new_full((1,), prior_scale ** -2)])
    return {"dynamics": ppl.MatrixNormalInverseWishart(y.new_zeros(D, D), eye(D), 0.1 * eye(D), D + 2.0),
            "emission": ppl.MatrixNormalInverseWishart(y.new_zeros(P, D + 1), torch.diag(col), 0.1 * eye(P), P + 2.0)}


@ppl.model
def lds_conjugate(y: torch.Tensor, D: int = 2, prior_scale: float = 10.0):
    r"""LDS with conjugate priors (``conjugate_priors``), routed to backend ``vi``:

    .. math::
        (A, Q) \sim MNIW, \quad ([C\ d], R) \sim MNIW, \quad x_0 \sim N(0, I_D), \quad
        x_t = A x_{t-1} + w_t,\ w_t \sim N(0, Q), \quad y_t \sim N(C x_t + d, R),

    with full Q ``(D, D)``, C ``(P, D)``, R ``(P, P)``, on ``y: (T, P)`` or ``(N, T, P)`` (a plate
    ``"sequences"``); no inputs or mask. ``ppl.compile`` picks ``vi`` (rule ``conjugate-exponential``): VB-EM
    (Kalman smoothing on the expected parameters, closed-form MNIW updates; ``ppl.inference.vi.gaussian_chain``),
    the full posterior over (A, Q) and (C, d, R) and the ELBO. C is not pinned to [I; C~] (that would not be
    conjugate), so the latent basis is free: ``conjugate_recovery_errors`` compares in the basis where C's top
    block is the identity. Values: ``dynamics`` packs ``[A | Q]`` ``(D, 2 D)``, ``emission`` ``[C d | R]``
    ``(P, D + 1 + P)``."""
    _check_inputs(y, D, None)
    prior = conjugate_priors(y, D, prior_scale)
    A, Q = ppl.MatrixNormalInverseWishart.unpack(ppl.sample("dynamics", prior["dynamics"]))
    C, R = ppl.MatrixNormalInverseWishart.unpack(ppl.sample("emission", prior["emission"]), D + 1)
    plate = ppl.plate("sequences", y.shape[0]) if y.dim() == 3 else contextlib.nullcontext()
    with plate:
        x = ppl.gaussian_chain("x", D, A, Q, length=y.shape[-2])
        ppl.sample("y", dist.MultivariateNormal(x @ C[:, :D].transpose(-1, -2) + C[:, D], R).to_event(1), obs=y)


def conjugate_recovery_errors(post, sim: Simulated) -> dict[str, float]:
    """``recovery_errors`` of a ``lds_conjugate`` fit, in the latent basis where C's top D x D block is the identity
    (x -> C_top x: A -> C_top A C_top^-1, C -> C C_top^-1), the basis ``simulate``'s truth is written in: largest
    absolute errors of ``dynamics`` (A), ``emission_free``, ``obs_offset`` and of A's ``eigenvalues``."""
    D = sim.kwargs["D"]
    A = ppl.MatrixNormalInverseWishart.unpack(post.point["dynamics"], D)[0]
    Cd = ppl.MatrixNormalInverseWishart.unpack(post.point["emission"], D + 1)[0]
    top = Cd[:D, :D]
    inv = torch.linalg.inv(top)
    est = {"dynamics": top @ A @ inv, "emission_free": Cd[D:, :D] @ inv, "obs_offset": Cd[:, D]}
    errors = {k: float((v - sim.truth[k].to(v)).abs().max()) for k, v in est.items() if k in sim.truth}
    ev, truth = eigenvalues(est["dynamics"]), eigenvalues(sim.truth["dynamics"].to(A))
    errors["eigenvalues"] = float((ev[best_permutation(ev, truth)] - truth).abs().max())
    return errors


def rotation(theta: float, radius: float) -> torch.Tensor:
    """``radius * [[cos, -sin], [sin, cos]]``: a damped rotation, eigenvalues ``radius e^{+-i theta}``."""
    c, s = torch.cos(torch.tensor(theta)), torch.sin(torch.tensor(theta))
    return radius * torch.stack([torch.stack([c, -s]), torch.stack([s, c])])


def true_parameters(P: int, U: int | None) -> dict[str, torch.Tensor]:
    """The D = 2 system ``simulate`` draws from: a damped rotation (radius 0.95, angle 0.3)."""
    truth = {"dynamics": rotation(0.3, 0.95), "state_noise": torch.tensor([0.3, 0.4]),
             "obs_offset": torch.linspace(-1.0, 1.0, P), "obs_noise": torch.linspace(0.2, 0.4, P)}
    if P > 2:
        rows = [torch.tensor([0.8 - 0.3 * i, 0.5 + 0.2 * i]) for i in range(P - 2)]
        truth["emission_free"] = torch.stack(rows)
    if U is not None:
        truth["input_matrix"] = torch.linspace(-1.0, 1.0, 2 * U).reshape(2, U) + 0.3
    return truth


def _draw(truth: dict, T: int, N: int, inputs: torch.Tensor | None, gen: torch.Generator):
    """Path ``x: (N, T, 2)`` and observations ``y: (N, T, P)`` (the generative process, step by step)."""
    A, q = truth["dynamics"], truth["state_noise"]
    C = emission_matrix(truth.get("emission_free"), 2, A)
    x = [torch.randn(N, 2, generator=gen)]
    for t in range(1, T):
        drive = inputs[:, t] @ truth["input_matrix"].T if inputs is not None else 0.0
        x.append(x[-1] @ A.T + drive + q * torch.randn(N, 2, generator=gen))
    x = torch.stack(x, 1)
    noise = truth["obs_noise"] * torch.randn(N, T, C.shape[0], generator=gen)
    return x, x @ C.T + truth["obs_offset"] + noise


def simulate(seed: int = 0, N: int | None = None, T: int = 200, P: int = 3, U: int | None = 1) -> Simulated:
    """Draw ``y: (T, P)`` (or ``(N, T, P)``) from a driven 2-dim LDS (``true_parameters``) with
    i.i.d. N(0, 1) inputs ``(T, U)`` (none when ``U=None``)."""
    if P < 2:
        raise ValueError(f"P must be >= 2 (the state has D = 2 dims), got {P}")
    gen = torch.Generator().manual_seed(seed)
    truth = true_parameters(P, U)
    n = 1 if N is None else N
    inputs = None if U is None else torch.randn(n, T, U, generator=gen)
    x, y = _draw(truth, T, n, inputs, gen)
    squeeze = (lambda v: v[0]) if N is None else (lambda v: v)
    kwargs = {"D": 2} if inputs is None else {"D": 2, "inputs": squeeze(inputs)}
    return Simulated((squeeze(y),), kwargs, {**truth, "x": squeeze(x)})


def infer_options(sim: Simulated) -> dict:
    """MAP by Adam from the prior medians; 250 steps at lr 0.05 converge on these sizes (the
    objective changes by < 0.5 nats between 200 and 400 steps; lr 0.1 oscillates)."""
    return dict(num_steps=250, lr=0.05)


def eigenvalues(A: torch.Tensor) -> torch.Tensor:
    """Eigenvalues of ``A: (D, D)`` as ``(D, 2)`` rows (real, imaginary)."""
    ev = torch.linalg.eigvals(A)
    return torch.stack([ev.real, ev.imag], -1)


def recovery_errors(post, sim: Simulated) -> dict[str, float]:
    """Largest absolute error of each global (identifiable: C's top block is fixed), and of A's
    eigenvalues (similarity-invariant), matched by the best permutation."""
    errors = {name: float((post.mean(name) - truth.to(post.mean(name))).abs().max())
              for name, truth in sim.truth.items() if name != "x"}
    A = post.mean("dynamics")
    est, truth = eigenvalues(A), eigenvalues(sim.truth["dynamics"].to(A))
    errors["eigenvalues"] = float((est[best_permutation(est, truth)] - truth).abs().max())
    return errors


# T = 200 steps; the state's stationary sd is ~1 (radius 0.95, q ~ 0.35).
TOLERANCES = {
    "dynamics": 0.1,        # regression of x_t on x_{t-1}: sd ~ 1 / sqrt(10 T) ~ 0.022, blurred by obs noise
    "eigenvalues": 0.1,     # a smooth function of A: same order as its entries
    "state_noise": 0.15,    # sd ~ q / sqrt(2T) ~ 0.02, confounded with obs noise -> ~0.04
    "obs_noise": 0.1,       # sd ~ r / sqrt(2T) ~ 0.015, same confounding
    "obs_offset": 0.35,     # the mean of a persistent AR(2)-like path: long-run sd ~ sqrt(1.4 / T) ~ 0.085
    "emission_free": 0.15,  # regression of y_3 on (y_1, y_2): sd ~ 0.4 / sqrt(T) / 1 ~ 0.03
    "input_matrix": 0.15,   # regression on u_t ~ N(0, 1): sd ~ q / sqrt(T) ~ 0.03
}
model = lds
