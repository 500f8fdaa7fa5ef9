r"""Exact inference in a linear-Gaussian chain with Gaussian node potentials (information form).

Model (the LDS prior), for a chain :math:`x_0, \dots, x_{T-1} \in \mathbb{R}^D`:

.. math::
    x_0 \sim N(m_0, P_0), \qquad x_t = A_t x_{t-1} + b_t + w_t,\ w_t \sim N(0, Q_t)\ (t \ge 1),

times node potentials :math:`\psi_t(x_t) = \exp(-\tfrac12 x_t^\top J_t x_t + h_t^\top x_t)`
(``J_node: (..., time, D, D)`` symmetric PSD, ``h_node: (..., time, D)``). The kernels return the
posterior :math:`p(x \mid \psi) \propto p(x) \prod_t \psi_t(x_t)` and the log normalizer
:math:`\log Z = \log \int p(x) \prod_t \psi_t(x_t)\, dx`.

Algorithm (all steps are batched over time; no Python loop over t):

1. Filtered covariances by the parallel scan of Särkkä & García-Fernández (2021)
   (:mod:`.kalman_scan`, depth :math:`O(\log T)`), on the batch of the matrices only.
2. Predicted covariances :math:`P_{t|t-1}`, their Cholesky :math:`U_t`, and the update in
   square-root form: :math:`I + U_t^\top J_t U_t = K_t K_t^\top` (spectrum :math:`\ge 1`),
   :math:`V_t = U_t K_t^{-\top}`, :math:`\Sigma_{t|t} = V_t V_t^\top`.
3. Filtered means by an affine scan of
   :math:`\mu_t = (I - \Sigma_{t|t} J_t)(A_t \mu_{t-1} + b_t) + \Sigma_{t|t} h_t`; then with
   :math:`m = m_{t|t-1}` and :math:`r_t = V_t^\top (h_t - J_t m)`,
   :math:`\log Z = \sum_t -\tfrac12 m^\top J_t m + h_t^\top m + \tfrac12 \|r_t\|^2 - \log|K_t|`.
   No precision of the prior is ever formed, so near-singular ``noise_cov`` / ``initial_cov`` are
   fine; only predicted covariances (:math:`\succeq Q`) are factorized.
4. RTS smoothing and backward sampling as a reverse scan of affine maps with
   :math:`G_t = \Sigma_{t|t} A_{t+1}^\top P_{t+1|t}^{-1}` and the conditional covariance in
   square-root (Joseph) form :math:`R_t = [(I - G_t A_{t+1}) V_t,\ G_t\, \mathrm{chol}(Q_{t+1})]`.

Vectors travel as column blocks ``(..., time, D, K)``: the K batch members that share the same
matrices (e.g. many sequences under one set of LDS parameters) are multiplied in one matmul.

Precision: float32 is accurate on long sequences (tested at T = 100,000) when the posterior
covariance stays bounded (a detectable model). Where it grows without bound (a random-walk state
that no potential observes) the float32 scan loses accuracy after ~1e4 steps: use float64 there.

Time-varying vs homogeneous dynamics is decided by ``LDSPrior.time_varying`` (never by ndim).
Batch dims of all inputs broadcast. Everything is differentiable by autograd.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from ppl.checks import broadcast_batch, check_positive_definite, check_psd, check_tensor, check_trailing

from .kalman_scan import (ColumnLayout, affine_combine, associative_scan, column_layout, filter_combine,
                          from_columns, reverse_scan, symmetrize, to_columns, to_matrices)


class LDSPrior(NamedTuple):
    r"""Prior of a linear-Gaussian chain (see the module docstring for the math).

    initial_loc: ``(..., D)`` :math:`m_0`;  initial_cov: ``(..., D, D)`` :math:`P_0`.
    dynamics: :math:`A`, ``(..., D, D)`` if not ``time_varying``, else ``(..., time-1, D, D)`` where
        entry ``t-1`` maps :math:`x_{t-1} \to x_t`.
    noise_cov: :math:`Q`, shaped like ``dynamics`` (homogeneous or per step by the same flag).
    offsets: :math:`b_t` for t = 1..T-1, ``(..., time-1, D)``, or None (zero).
    time_varying: the explicit rule for ``dynamics``/``noise_cov``: False (default) = one matrix for
        all steps; True = a leading time dim of length T-1.
    """

    initial_loc: torch.Tensor
    initial_cov: torch.Tensor
    dynamics: torch.Tensor
    noise_cov: torch.Tensor
    offsets: Optional[torch.Tensor] = None
    time_varying: bool = False


class InfoFilterResult(NamedTuple):
    """filtered_mean: ``(..., time, D)`` E[x_t | psi_{0:t}]; filtered_cov: ``(..., time, D, D)``;
    log_normalizer: ``(...)`` log Z of the whole chain (all T potentials)."""

    filtered_mean: torch.Tensor
    filtered_cov: torch.Tensor
    log_normalizer: torch.Tensor


class SmootherResult(NamedTuple):
    """mean: ``(..., time, D)``; cov: ``(..., time, D, D)``; cross_cov: ``(..., time-1, D, D)`` with
    entry t = Cov(x_t, x_{t+1} | all); log_normalizer: ``(...)``."""

    mean: torch.Tensor
    cov: torch.Tensor
    cross_cov: torch.Tensor
    log_normalizer: torch.Tensor


class _Chain(NamedTuple):
    """Validated inputs in column layout (see :class:`.kalman_scan.ColumnLayout`): matrices have
    batch ``mb`` = layout.mat_pad, vectors are column blocks with batch ``vb`` = layout.mat_shape
    and K trailing columns. m0: (vb, D, K); U0 = chol(P0): (mb, D, D); F, Q, UQ = chol(Q):
    (mb, T-1, D, D); b: (vb, T-1, D, K) or None; J: (mb, T, D, D); h: (vb, T, D, K)."""

    layout: ColumnLayout
    m0: torch.Tensor
    U0: torch.Tensor
    F: torch.Tensor
    Q: torch.Tensor
    UQ: torch.Tensor
    b: Optional[torch.Tensor]
    J: torch.Tensor
    h: torch.Tensor


class _Filtered(NamedTuple):
    """chain; mean: (vb, T, D, K) filtered means; V: (mb, T, D, D) with filtered cov V V^T;
    pred_mean: (vb, T, D, K); pred_chol: (mb, T, D, D) chol of predicted covs; log_normalizer: (vb, K), in
    float64 whatever the inputs' dtype (the sum of T per-step terms, see :func:`run_filter`)."""

    chain: _Chain
    mean: torch.Tensor
    V: torch.Tensor
    pred_mean: torch.Tensor
    pred_chol: torch.Tensor
    log_normalizer: torch.Tensor


def _check_prior(prior: LDSPrior, T: int, D: int, like: torch.Tensor) -> None:
    """Shapes, dtype, device and finiteness of the prior's fields (definiteness: see :func:`prepare`)."""
    if not isinstance(prior, LDSPrior):
        raise ValueError(f"prior must be an LDSPrior, got {type(prior).__name__}")
    check_trailing("prior.initial_loc", check_tensor("prior.initial_loc", prior.initial_loc, like), (D,),
                   f"(..., {D})")
    check_trailing("prior.initial_cov", check_tensor("prior.initial_cov", prior.initial_cov, like), (D, D),
                   f"(..., {D}, {D})")
    tv = prior.time_varying
    if not isinstance(tv, bool):
        raise ValueError(f"prior.time_varying must be a bool, got {tv!r}")
    tail, spelled = ((T - 1, D, D), f"(..., time-1={T - 1}, {D}, {D}) (time_varying=True)") if tv else \
        ((D, D), f"(..., {D}, {D}) (time_varying=False)")
    for name in ("dynamics", "noise_cov"):
        check_trailing(f"prior.{name}", check_tensor(f"prior.{name}", getattr(prior, name), like), tail, spelled)
    if prior.offsets is not None:
        check_trailing("prior.offsets", check_tensor("prior.offsets", prior.offsets, like), (T - 1, D),
                       f"(..., time-1={T - 1}, {D})")


def _cholesky(x: torch.Tensor, what: str) -> torch.Tensor:
    """Lower Cholesky factor, or a ValueError saying which intermediate lost definiteness."""
    L, info = torch.linalg.cholesky_ex(x)
    if bool((info > 0).any()):
        raise ValueError(f"{what} is not numerically positive definite (shape {tuple(x.shape)}); "
                         "check the scales of noise_cov, initial_cov and J_node")
    return L


def prepare(prior: LDSPrior, J_node: torch.Tensor, h_node: torch.Tensor, check_j: bool = True) -> _Chain:
    """Validate and broadcast the inputs into a :class:`_Chain` (column layout).

    prior: :class:`LDSPrior`; J_node: ``(..., time, D, D)`` symmetric PSD (checked unless
    ``check_j=False``); h_node: ``(..., time, D)``; batch dims broadcast with the prior's."""
    h = check_tensor("h_node", h_node)
    if h.dim() < 2 or h.shape[-2] < 1:
        raise ValueError(f"h_node must have shape (..., time>=1, D), got {tuple(h.shape)}")
    T, D = h.shape[-2], h.shape[-1]
    check_trailing("J_node", check_tensor("J_node", J_node, h), (T, D, D), f"(..., time={T}, {D}, {D})")
    if check_j:
        check_psd("J_node", J_node)
    _check_prior(prior, T, D, h)
    U0 = check_positive_definite("prior.initial_cov", prior.initial_cov)
    UQ = check_positive_definite("prior.noise_cov", prior.noise_cov)
    lead = 3 if prior.time_varying else 2
    cb = broadcast_batch(initial_cov=prior.initial_cov.shape[:-2], dynamics=prior.dynamics.shape[:-lead],
                         noise_cov=prior.noise_cov.shape[:-lead], J_node=J_node.shape[:-3])
    offsets_batch = prior.offsets.shape[:-2] if prior.offsets is not None else torch.Size()
    lay = column_layout(broadcast_batch(matrices=cb, initial_loc=prior.initial_loc.shape[:-1],
                                        offsets=offsets_batch, h_node=h.shape[:-2]), cb)

    def per_step(x):
        x = x if prior.time_varying else x.unsqueeze(-3).expand(x.shape[:-2] + (T - 1, D, D))
        return to_matrices(lay, x, 3)
    b = None if prior.offsets is None else to_columns(lay, prior.offsets, 2)
    return _Chain(lay, to_columns(lay, prior.initial_loc, 1), to_matrices(lay, U0, 2), per_step(prior.dynamics),
                  per_step(prior.noise_cov), per_step(UQ), b, to_matrices(lay, J_node, 3), to_columns(lay, h, 2))


def _absorb(U: torch.Tensor, J: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Condition N(m, U U^T) on a potential with precision J, in square-root form.

    Returns ``K`` with :math:`I + U^\top J U = K K^\top` and ``V`` :math:`= U K^{-\top}`
    (posterior covariance :math:`V V^\top`). ``U, J: (..., D, D)`` -> ``K, V: (..., D, D)``.
    """
    eye = torch.eye(U.shape[-1], dtype=U.dtype, device=U.device)
    K = _cholesky(symmetrize(eye + U.mT @ J @ U), "I + U^T J U (J_node)")
    V = torch.linalg.solve_triangular(K, U.mT, upper=False).mT
    return K, V


def _transition_elements(c: _Chain) -> tuple[torch.Tensor, ...]:
    r"""Covariance parts of the scan elements for steps t = 1..T-1: p(x_t | x_{t-1}, psi_t) has
    covariance :math:`C = (Q^{-1} + J_t)^{-1}` and mean :math:`(I - C J_t) A_t x_{t-1} + \dots`;
    psi_t carries precision :math:`A_t^\top (J_t - J_t C J_t) A_t` about :math:`x_{t-1}`."""
    J, F = c.J[..., 1:, :, :], c.F
    _, V = _absorb(c.UQ, J)
    eye = torch.eye(F.shape[-1], dtype=F.dtype, device=F.device)
    C = V @ V.mT
    JV = J @ V
    J_hat = symmetrize(J - JV @ JV.mT)
    return (eye - C @ J) @ F, C, symmetrize(F.mT @ J_hat @ F)


def _first_element(c: _Chain) -> tuple[torch.Tensor, ...]:
    """Covariance part of the scan element for t = 0: filtered Sigma_0, no dependence on the past."""
    J0 = c.J[..., 0, :, :]
    _, V = _absorb(c.U0, J0)
    zeros = torch.zeros_like(J0)
    return zeros, V @ V.mT, zeros


def _cat_time(*parts: torch.Tensor) -> torch.Tensor:
    """Concatenate ``(..., n_i, M, N)`` blocks along time (dim -3), broadcasting their batch dims."""
    batch = torch.broadcast_shapes(*(x.shape[:-3] for x in parts))
    return torch.cat([x.expand(batch + x.shape[-3:]) for x in parts], -3)


def _prepend(first: torch.Tensor, rest: torch.Tensor) -> torch.Tensor:
    """One step ``first: (..., M, N)`` before ``rest: (..., time, M, N)``."""
    return _cat_time(first.unsqueeze(-3), rest)


def _filtered_means(c: _Chain, V: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Filtered and predicted means, ``(vb, T, D, K)`` each, from the filtered covariances
    :math:`\Sigma_t = V_t V_t^\top` by an affine scan of
    :math:`\mu_t = (I - \Sigma_t J_t)(A_t \mu_{t-1} + b_t) + \Sigma_t h_t` (with :math:`\mu_{-1}`
    term :math:`m_0` at t = 0)."""
    S = V @ V.mT
    I_SJ = torch.eye(S.shape[-1], dtype=S.dtype, device=S.device) - S @ c.J
    b = c.b if c.b is not None else torch.zeros_like(c.h[..., 1:, :, :])
    v = S @ c.h + I_SJ @ _prepend(c.m0, b)
    if c.h.shape[-3] == 1:
        return v, c.m0.unsqueeze(-3)
    M = _prepend(torch.zeros_like(S[..., 0, :, :]), I_SJ[..., 1:, :, :] @ c.F)
    _, mean = associative_scan(affine_combine, (M, v), (2, 2))
    return mean, _prepend(c.m0, c.F @ mean[..., :-1, :, :] + b)


def run_filter(chain: _Chain) -> _Filtered:
    """Parallel filter (covariances, then means), square-root update and log Z for all steps at once.

    Returns a :class:`_Filtered`: means ``(vb, T, D, K)``, covariance factors ``(mb, T, D, D)`` in
    the chain's column layout (:func:`filter_result` brings them to the caller's batch shape).
    log Z is summed over steps in a float64 accumulator: each step's term is of order
    :math:`h_t^\top m_t \approx y_t^\top R^{-1} y_t / 2`, so with float32 data far from 0 (a random walk)
    the float32 sum of 1e5 terms (~1e9) was off by whole nats and ~12 nats after the large constant of
    the potentials was added back (``ppl.inference.chains.collapsed_log_normalizer``)."""
    if chain.h.shape[-3] > 1:
        elems = tuple(_prepend(f, r) for f, r in zip(_first_element(chain), _transition_elements(chain)))
        _, Sigma, _ = associative_scan(filter_combine, elems, (2, 2, 2))
        P = symmetrize(chain.F @ Sigma[..., :-1, :, :] @ chain.F.mT + chain.Q)
        pred_chol = _prepend(chain.U0, _cholesky(P, "predicted covariance (in float32 this happens on long "
                                                 "chains whose posterior variance grows without bound: "
                                                 "use float64)"))
    else:
        pred_chol = chain.U0.unsqueeze(-3)
    K, V = _absorb(pred_chol, chain.J)
    mean, pred_mean = _filtered_means(chain, V)
    Jm = chain.J @ pred_mean
    r = V.mT @ (chain.h - Jm)
    log_z = (-0.5 * (pred_mean * Jm).sum(-2) + (chain.h * pred_mean).sum(-2) + 0.5 * (r * r).sum(-2)
             - K.diagonal(dim1=-2, dim2=-1).log().sum(-1, keepdim=True))
    return _Filtered(chain, mean, V, pred_mean, pred_chol, log_z.sum(-2, dtype=torch.float64))


def _backward_maps(f: _Filtered) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    r"""Affine backward maps :math:`x_t = G_t x_{t+1} + c_t + R_t \varepsilon_t` of p(x_t | x_{t+1}, psi).

    Returns ``G: (mb, T, D, D)`` (zero at the last step), ``R: (mb, T, D, 2D)`` with conditional
    covariance :math:`R R^\top` (Joseph form, PSD by construction), ``c: (vb, T, D, K)``.
    """
    V_last = f.V[..., -1:, :, :]
    G_last, c_last = torch.zeros_like(V_last), f.mean[..., -1:, :, :]
    R_last = torch.cat([V_last, torch.zeros_like(V_last)], -1)
    if f.mean.shape[-3] == 1:
        return G_last, R_last, c_last
    ch, V = f.chain, f.V[..., :-1, :, :]
    G = torch.cholesky_solve(ch.F @ V @ V.mT, f.pred_chol[..., 1:, :, :]).mT
    eye = torch.eye(V.shape[-1], dtype=V.dtype, device=V.device)
    R = torch.cat([(eye - G @ ch.F) @ V, G @ ch.UQ], -1)
    c = f.mean[..., :-1, :, :] - G @ f.pred_mean[..., 1:, :, :]
    return _cat_time(G, G_last), _cat_time(R, R_last), _cat_time(c, c_last)


def matrices_out(lay: ColumnLayout, m: torch.Tensor) -> torch.Tensor:
    """Matrices ``(mb, time, D, D)`` -> ``(mat_batch padded to the batch's ndim, time, D, D)``."""
    pad = torch.Size((1,) * (len(lay.batch) - len(lay.mat_batch)) + tuple(lay.mat_batch))
    return m.reshape(pad + m.shape[-3:])


def _cov_out(lay: ColumnLayout, cov: torch.Tensor) -> torch.Tensor:
    """Matrices ``(mb, time, D, D)`` -> ``(batch, time, D, D)`` (an expanded view where shared)."""
    return matrices_out(lay, cov).expand(lay.batch + cov.shape[-3:])


def info_filter(prior: LDSPrior, J_node: torch.Tensor, h_node: torch.Tensor) -> InfoFilterResult:
    r"""Filter a linear-Gaussian chain with Gaussian node potentials.

    Args:
        prior: :class:`LDSPrior` (batch dims broadcast with the potentials').
        J_node: ``(..., time, D, D)`` symmetric PSD potential precisions :math:`J_t`.
        h_node: ``(..., time, D)`` potential linear terms :math:`h_t`.
    Returns:
        :class:`InfoFilterResult`: ``filtered_mean (..., time, D)`` and ``filtered_cov
        (..., time, D, D)`` of :math:`p(x_t \mid \psi_{0:t})`, and ``log_normalizer (...)``
        :math:`\log \int p(x) \prod_t \psi_t(x_t) dx`.
    """
    return filter_result(run_filter(prepare(prior, J_node, h_node)))


def filter_result(f: _Filtered) -> InfoFilterResult:
    """Filtered moments of a :class:`_Filtered`, in the caller's batch layout: filtered_mean
    ``(..., time, D)``, filtered_cov ``(..., time, D, D)``, log_normalizer ``(...)``."""
    lay = f.chain.layout
    return InfoFilterResult(from_columns(lay, f.mean, 2), _cov_out(lay, f.V @ f.V.mT),
                            from_columns(lay, f.log_normalizer.to(f.mean.dtype), 0))


def info_log_normalizer64_eager(prior: LDSPrior, J_node: torch.Tensor, h_node: torch.Tensor) -> torch.Tensor:
    r"""log Z ``(...)`` as :func:`info_filter` computes it, but returned in float64 whatever the inputs' dtype:
    for callers that add it to another large term (the constant of the potentials, of the same size and the
    opposite sign) and need the digits that a float32 result would round away (ulp 64 at 1e9). Plain torch
    code (autograd to any order); ``kalman.info_log_normalizer64`` runs it as one operator (``ops``)."""
    f = run_filter(prepare(prior, J_node, h_node))
    return from_columns(f.chain.layout, f.log_normalizer, 0)


def info_smoother(prior: LDSPrior, J_node: torch.Tensor, h_node: torch.Tensor) -> SmootherResult:
    r"""Posterior marginals of a linear-Gaussian chain with Gaussian node potentials (RTS smoother).

    Args: as :func:`info_filter`.
    Returns:
        :class:`SmootherResult`: ``mean (..., time, D)``, ``cov (..., time, D, D)`` of
        :math:`p(x_t \mid \psi_{0:T-1})`, ``cross_cov (..., time-1, D, D)`` with entry t
        :math:`= \mathrm{Cov}(x_t, x_{t+1} \mid \psi)`, and ``log_normalizer (...)``.
    """
    return smooth(run_filter(prepare(prior, J_node, h_node)))


def smooth(f: _Filtered) -> SmootherResult:
    """RTS smoothing of a :class:`_Filtered` by a reverse scan of affine maps: mean ``(..., time, D)``,
    cov ``(..., time, D, D)``, cross_cov ``(..., time-1, D, D)``, log_normalizer ``(...)``."""
    G, R, c = _backward_maps(f)
    _, cov, mean = reverse_scan(affine_combine, (G, R @ R.mT, c), (2, 2, 2))
    cross = G[..., :-1, :, :] @ cov[..., 1:, :, :]
    lay = f.chain.layout
    return SmootherResult(from_columns(lay, mean, 2), _cov_out(lay, cov), _cov_out(lay, cross),
                          from_columns(lay, f.log_normalizer.to(mean.dtype), 0))


def info_sample(prior: LDSPrior, J_node: torch.Tensor, h_node: torch.Tensor, sample_shape=(),
                generator: Optional[torch.Generator] = None) -> torch.Tensor:
    r"""Exact posterior samples :math:`x \sim p(x \mid \psi)` by backward sampling.

    Reparameterized: :math:`x_{T-1} = m_{T-1|T-1} + V_{T-1} \varepsilon`,
    :math:`x_t = G_t x_{t+1} + c_t + R_t \varepsilon_t` with standard normal noise drawn from
    ``generator``, so samples are differentiable w.r.t. ``J_node``, ``h_node`` and the prior.

    Args: as :func:`info_filter`, plus ``sample_shape`` (tuple) and an optional ``torch.Generator``
    (on the inputs' device).
    Returns:
        ``(*sample_shape, ..., time, D)`` samples.
    """
    return sample(run_filter(prepare(prior, J_node, h_node)), sample_shape, generator)


def sample(f: _Filtered, sample_shape=(), generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Backward sampling from a :class:`_Filtered`: ``(*sample_shape, ..., time, D)``."""
    G, R, c = _backward_maps(f)
    lay = f.chain.layout
    big = column_layout(torch.Size(sample_shape) + lay.batch, lay.mat_batch)
    c = to_columns(big, from_columns(lay, c, 2), 2)
    eps = torch.randn(c.shape[:-2] + (R.shape[-1], c.shape[-1]), generator=generator, dtype=c.dtype,
                      device=c.device)
    _, x = reverse_scan(affine_combine, (G, c + R @ eps), (2, 2))
    return from_columns(big, x, 2)
