r"""Structured latents as first-class random variables: ``markov_chain``, ``gaussian_chain``,
``switching_chain``.

Each block is one sample site whose value is a whole chain. Under plain Pyro it samples
ancestrally and scores its path (so SVI/NUTS can always run it); exact backends read the
chain's factors off the site and marginalize it by message passing (``ppl.handlers``).
A mixture needs no block: a ``Categorical`` site inside a plate.
"""
from __future__ import annotations

import functools

import torch

from .chain_dists import GaussianChain, MarkovChain
from .checks import check_positive_definite
from .primitives import ModelInputError, sample

BLOCK_KEY = "ppl_block"


def _require_int(name: str, arg: str, value, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ModelInputError(f"site '{name}': {arg} must be an integer >= {minimum}, got {value!r}")
    return value


def _values(x: torch.Tensor) -> torch.Tensor:
    """The values behind ``x`` for a check read on the host, detached: ``x`` itself, or under ``torch.func``
    transforms (``vmap``, ``grad``: a NUTS potential evaluated on all chains at once) the physical tensor, its
    vmapped dims moved to the front, so the check reads every chain's values at once instead of failing on a
    host read of a batched tensor. Trailing dims are the logical ones (the checks reduce over dim -1)."""
    while torch._C._functorch.is_functorch_wrapped_tensor(x):
        batched = torch._C._functorch.is_batchedtensor(x)
        bdim = torch._C._functorch.maybe_get_bdim(x) if batched else None
        x = torch._C._functorch.get_unwrapped(x)
        if bdim is not None:
            x = x.movedim(bdim, 0)
    return x.detach()


def _check_stochastic(name: str, arg: str, probs: torch.Tensor, K: int) -> None:
    """Raise if ``probs`` is not ``(..., K)`` non-negative with rows summing to one (read through ``_values``:
    the same check inside ``vmap`` / ``grad``)."""
    if probs.shape[-1:] != (K,):
        raise ModelInputError(f"site '{name}': {arg} must have trailing dim num_states={K}, got shape {tuple(probs.shape)}")
    probs_shape, probs = probs.shape, _values(probs)
    if not bool(torch.isfinite(probs).all()) or bool((probs < 0).any()):
        raise ModelInputError(f"site '{name}': {arg} must be finite and non-negative")
    sums = probs.sum(-1)
    tol = 1e-4 if probs.dtype in (torch.float32, torch.float16, torch.bfloat16) else 1e-8
    if not bool(torch.allclose(sums, torch.ones_like(sums), atol=tol * K)):
        worst = float((sums - 1).abs().max())
        raise ModelInputError(f"site '{name}': rows of {arg} (shape {tuple(probs_shape)}) must sum to one; "
                              f"largest deviation {worst:.3g}")


def _transition_table(name, K, T, transition, inputs):
    """Return ``(probs, time_varying)``: ``(..., K, K)`` or ``(..., T-1, K, K)`` transition probabilities."""
    if callable(transition) and not isinstance(transition, torch.Tensor):
        if inputs is None:
            raise ModelInputError(f"site '{name}': a transition function needs inputs=(..., {T}, input_dim)")
        if inputs.dim() < 2 or inputs.shape[-2] != T:
            raise ModelInputError(f"site '{name}': inputs must be (..., length={T}, input_dim), got {tuple(inputs.shape)}")
        table = transition(inputs)
        if not isinstance(table, torch.Tensor) or table.shape[-3:] != (T, K, K):
            got = tuple(table.shape) if isinstance(table, torch.Tensor) else type(table).__name__
            raise ModelInputError(f"site '{name}': transition(inputs) must return (..., {T}, {K}, {K}), got {got}")
        _check_stochastic(name, "transition(inputs)", table, K)
        return table[..., 1:, :, :], True
    if not isinstance(transition, torch.Tensor) or transition.dim() < 2 or transition.shape[-2:] != (K, K):
        got = tuple(transition.shape) if isinstance(transition, torch.Tensor) else type(transition).__name__
        raise ModelInputError(f"site '{name}': transition must be (..., num_states, num_states) = (..., {K}, {K}), got {got}")
    _check_stochastic(name, "transition", transition, K)
    return transition, False


def markov_chain(name: str, num_states: int, transition, initial: torch.Tensor | None = None, *,
                 length: int, inputs: torch.Tensor | None = None, obs: torch.Tensor | None = None) -> torch.Tensor:
    r"""A discrete Markov chain z_{0:T-1} over ``num_states`` states: one random variable.

    p(z) = \text{initial}_{z_0} \prod_{t=1}^{T-1} \text{transition}^{(t)}_{z_{t-1}, z_t}

    Args:
        num_states: K.
        transition: ``(..., K, K)`` row-stochastic matrix, or a function mapping
            ``inputs: (..., T, input_dim)`` to ``(..., T, K, K)`` (input-driven chain; entry t is the
            transition into step t, entry 0 is unused).
        initial: ``(..., K)`` probabilities of z_0; None means uniform.
        length: T.
        obs: optional observed path ``(..., T)``.
    Returns:
        ``(..., T)`` int64 states when sampled. Under an exact interpreter the value is the
        enumerated support ``arange(K)`` in a new leftmost dim, so sites that depend on it
        are evaluated at every state at once.
    """
    K = _require_int(name, "num_states", num_states)
    T = _require_int(name, "length", length)
    probs, time_varying = _transition_table(name, K, T, transition, inputs)
    if initial is None:
        initial = torch.full((K,), 1.0 / K, dtype=probs.dtype, device=probs.device)
    elif not isinstance(initial, torch.Tensor):
        raise ModelInputError(f"site '{name}': initial must be a tensor of shape (..., {K}), got {type(initial).__name__}")
    _check_stochastic(name, "initial", initial, K)
    dtype = torch.promote_types(initial.dtype, probs.dtype)  # float32 and float64 parameters: promoted
    fn = MarkovChain(initial.to(dtype).log(), probs.to(dtype).log(), T, time_varying=time_varying)
    return sample(name, fn, obs=obs, infer={BLOCK_KEY: "markov_chain"})


def _check_square(name: str, arg: str, value, D: int, switched: bool) -> None:
    """Raise unless ``value`` is ``(D, D)``, or ``(K, D, D)`` when the chain is switched."""
    ndims = (2, 3) if switched else (2,)
    if not isinstance(value, torch.Tensor) or value.dim() not in ndims or value.shape[-2:] != (D, D):
        got = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
        want = f"({D}, {D})" + (f" or (num_states, {D}, {D})" if switched else "")
        raise ModelInputError(f"site '{name}': {arg} must have shape {want}, got {got}")
    if not bool(torch.isfinite(_values(value)).all()):
        raise ModelInputError(f"site '{name}': {arg} contains NaN or inf")


def _check_covariance(name: str, arg: str, value: torch.Tensor) -> None:
    """ModelInputError naming the site and the argument unless ``value (..., D, D)`` is symmetric positive
    definite (the Kalman kernels factorize it; the error would otherwise come from inside them)."""
    try:
        check_positive_definite(arg, _values(value))
    except ValueError as exc:
        raise ModelInputError(f"site '{name}': {exc}") from None


def _select(table: torch.Tensor, switch: torch.Tensor | None, T: int) -> tuple[torch.Tensor, bool]:
    """Per-step parameters: ``table[switch_t]`` for t >= 1 when switched, else the shared matrix."""
    if switch is None or table.dim() == 2:
        return table, False
    steps = switch[..., 1:] if switch.shape[-1] == T else switch  # size-1 time dim broadcasts
    return table[steps.long()], True


def gaussian_chain(name: str, dim: int, dynamics: torch.Tensor, noise_cov: torch.Tensor,
                   initial_loc: torch.Tensor | None = None, initial_cov: torch.Tensor | None = None, *,
                   length: int, inputs: torch.Tensor | None = None, input_matrix: torch.Tensor | None = None,
                   switch: torch.Tensor | None = None, obs: torch.Tensor | None = None) -> torch.Tensor:
    r"""A linear-Gaussian chain x_{0:T-1} in R^D (the latent path of an LDS): one random variable.

    x_0 \sim N(\text{initial\_loc}, \text{initial\_cov}),\quad
    x_t = A_t x_{t-1} + B u_t + w_t,\ w_t \sim N(0, Q_t), \quad t = 1..T-1

    Args:
        dim: D.
        dynamics: A, ``(D, D)``; or ``(K, D, D)`` with ``switch``: A_t = dynamics[switch_t].
        noise_cov: Q, ``(D, D)`` or ``(K, D, D)`` (switched like ``dynamics``).
        initial_loc: ``(D,)``, default zeros; initial_cov: ``(D, D)``, default identity.
        length: T.
        inputs: u, ``(..., T, U)`` control inputs with ``input_matrix`` B ``(D, U)``; u_0 is not used
            (the initial state has its own distribution).
        switch: ``(..., T)`` states of a ``markov_chain`` selecting dynamics per step.
        obs: optional observed path ``(..., T, D)``.
    Returns:
        ``(..., T, D)`` path.
    """
    D = _require_int(name, "dim", dim)
    T = _require_int(name, "length", length)
    _check_square(name, "dynamics", dynamics, D, switch is not None)
    _check_square(name, "noise_cov", noise_cov, D, switch is not None)
    ref = dynamics
    initial_loc = torch.zeros(D, dtype=ref.dtype, device=ref.device) if initial_loc is None else initial_loc
    initial_cov = torch.eye(D, dtype=ref.dtype, device=ref.device) if initial_cov is None else initial_cov
    if initial_loc.shape[-1:] != (D,):
        raise ModelInputError(f"site '{name}': initial_loc must be (..., {D}), got {tuple(initial_loc.shape)}")
    if initial_cov.shape[-2:] != (D, D):
        raise ModelInputError(f"site '{name}': initial_cov must be (..., {D}, {D}), got {tuple(initial_cov.shape)}")
    offsets = _input_offsets(name, D, T, inputs, input_matrix)
    # float32 and float64 parameters (e.g. a float64 prior draw and a float32 constant): promoted, as torch does
    tensors = [t for t in (dynamics, noise_cov, initial_loc, initial_cov, offsets) if isinstance(t, torch.Tensor)]
    dtype = functools.reduce(torch.promote_types, [t.dtype for t in tensors])
    dynamics, noise_cov, initial_loc, initial_cov = (t.to(dtype) for t in (dynamics, noise_cov, initial_loc,
                                                                            initial_cov))
    offsets = None if offsets is None else offsets.to(dtype)
    _check_covariance(name, "noise_cov", noise_cov)
    _check_covariance(name, "initial_cov", initial_cov)
    A, tv_a = _select(dynamics, switch, T)
    Q, tv_q = _select(noise_cov, switch, T)
    time_varying = tv_a or tv_q
    if time_varying:
        A = A if tv_a else A.expand(Q.shape[:-2] + (D, D))
        Q = Q if tv_q else Q.expand(A.shape[:-2] + (D, D))
    fn = GaussianChain(initial_loc, initial_cov, A, Q, T, offsets=offsets, time_varying=time_varying)
    return sample(name, fn, obs=obs, infer={BLOCK_KEY: "gaussian_chain"})


def _input_offsets(name, D, T, inputs, input_matrix):
    """``B u_t`` for t = 1..T-1: ``(..., T-1, D)``, or None without inputs."""
    if inputs is None and input_matrix is None:
        return None
    if inputs is None or input_matrix is None:
        raise ModelInputError(f"site '{name}': inputs and input_matrix must be given together")
    if input_matrix.dim() != 2 or input_matrix.shape[0] != D:
        raise ModelInputError(f"site '{name}': input_matrix must be ({D}, input_dim), got {tuple(input_matrix.shape)}")
    U = input_matrix.shape[1]
    if inputs.dim() < 2 or inputs.shape[-2:] != (T, U):
        raise ModelInputError(f"site '{name}': inputs must be (..., {T}, {U}), got {tuple(inputs.shape)}")
    return inputs[..., 1:, :] @ input_matrix.transpose(-1, -2)


def switching_chain(name: str, num_states: int, dim: int, transition, dynamics: torch.Tensor,
                    noise_cov: torch.Tensor, *, length: int, initial: torch.Tensor | None = None,
                    initial_loc: torch.Tensor | None = None, initial_cov: torch.Tensor | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """A switching linear dynamical system's latents: ``markov_chain`` ``{name}_z`` selecting the
    dynamics of ``gaussian_chain`` ``{name}_x``.

    Args:
        transition: ``(K, K)``; dynamics, noise_cov: ``(K, D, D)`` (noise_cov may be ``(D, D)``).
    Returns:
        ``(z, x)``: ``(..., T)`` states and ``(..., T, D)`` path.
    """
    z = markov_chain(f"{name}_z", num_states, transition, initial, length=length)
    x = gaussian_chain(f"{name}_x", dim, dynamics, noise_cov, initial_loc, initial_cov, length=length, switch=z)
    return z, x


def block_kind(msg_or_node: dict) -> str | None:
    """The block a site belongs to ("markov_chain", "gaussian_chain") or None for a plain site."""
    return (msg_or_node.get("infer") or {}).get(BLOCK_KEY)


__all__ = ["markov_chain", "gaussian_chain", "switching_chain", "block_kind", "MarkovChain", "GaussianChain"]
