r"""Exact local inference of a linear-Gaussian chain by a block-tridiagonal Cholesky (the LDS-SVAE's
fast path on CPU).

For the LDS-SVAE, :math:`q(x) \propto p(x \mid \theta) \prod_t \psi_t(x_t)` is Gaussian on the whole
path :math:`x = (x_0, \dots, x_{T-1})`, with block-tridiagonal precision
:math:`\Lambda_q = \Lambda_p + \mathrm{blockdiag}(J_t)` and linear term :math:`h_q = h_p + h`.
With the prior (see :class:`ppl.inference.exact.kalman_info.LDSPrior`)
:math:`x_0 \sim N(m_0, P_0)`, :math:`x_t = A_t x_{t-1} + b_t + w_t`, :math:`w_t \sim N(0, Q_t)`:

.. math::
    \Lambda_p[t,t] = [t=0] P_0^{-1} + [t \ge 1] Q_t^{-1} + [t \le T-2] A_{t+1}^\top Q_{t+1}^{-1} A_{t+1},
    \qquad \Lambda_p[t,t-1] = -Q_t^{-1} A_t, \\
    h_p[t] = [t=0] P_0^{-1} m_0 + [t \ge 1] Q_t^{-1} b_t - [t \le T-2] A_{t+1}^\top Q_{t+1}^{-1} b_{t+1}.

With :math:`\Lambda_q = L L^\top` and :math:`y = L^{-1} h_q`:
mean :math:`m = L^{-\top} y`, a reparameterized sample :math:`x = L^{-\top}(y + \varepsilon)`, and

.. math::
    \log Z = \log \int p(x) \psi(x) dx = \tfrac12 \|y\|^2 - \sum \log \mathrm{diag}\, L
             + \tfrac12 \log|\Lambda_p| - \tfrac12 c, \qquad
    \log|\Lambda_p| = -\log|P_0| - \sum_t \log|Q_t|, \quad
    c = m_0^\top P_0^{-1} m_0 + \sum_t b_t^\top Q_t^{-1} b_t

(c is :math:`\mu_p^\top \Lambda_p \mu_p`, read off the prior's quadratic at x = 0, so the prior mean is never
formed). The KL is :math:`\mathbb{E}_q[\log\psi] - \log Z` with
:math:`\mathbb{E}_q[\log\psi] = \sum_t -\tfrac12 \mathrm{tr}(J_t \Sigma_{tt}) - \tfrac12 m_t^\top J_t m_t
+ h_t^\top m_t`.

Why not the parallel scan (:mod:`ppl.inference.exact.kalman_info`): for the SVAE's small D every op of the
scan is a tiny batched (D, D) product, so the forward and, worse, the autograd backward are dominated by
per-op overhead (hundreds of ops per step). Grouping ``chunk`` time steps into one block of size
n = chunk * D makes the sweep over time ceil(T / chunk) rounds of about a dozen batched (n, n) ops.
Measured on one CPU thread, forward + backward of the local step: 64 chains x 40 steps, D = 2: ~8 ms
against ~40 ms for the scan; 64 x 50, D = 10: ~65-100 ms against ~250-400 ms (a loaded 2-core machine).
Unlike the scan it forms :math:`Q^{-1}` and :math:`P_0^{-1}`, so it needs well-conditioned noise
covariances; :func:`use_banded` decides (:func:`ppl.inference.svae.local.lds_local` falls back to the scan).
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from ..exact.kalman_info import LDSPrior

MAX_CONDITION_TIMES_EPS = 1e-2
"""Largest cond(Q), cond(P_0) times the dtype's machine epsilon for the banded path (it inverts them):
about 8e4 in float32, 4e13 in float64."""
MAX_CUDA_CHUNKS = 32
"""On CUDA, chains needing more sequential rounds than this use the O(log T)-depth parallel scan."""


class BandedLocal(NamedTuple):
    """x: sample ``(..., T, D)``; mean: ``(..., T, D)``; log_z: ``(...)``; expected_log_potential: ``(...)``."""

    x: torch.Tensor
    mean: torch.Tensor
    log_z: torch.Tensor
    expected_log_potential: torch.Tensor


def use_banded(prior: LDSPrior, T: int, D: int) -> bool:
    """True when ``noise_cov`` and ``initial_cov`` are well conditioned in the working dtype (their
    inverses are formed) and, on CUDA, the chain needs at most ``MAX_CUDA_CHUNKS`` sequential rounds."""
    if prior.noise_cov.device.type == "cuda" and -(-T // chunk_length(D)) > MAX_CUDA_CHUNKS:
        return False
    eps = torch.finfo(prior.noise_cov.dtype).eps
    with torch.no_grad():
        for m in (prior.noise_cov, prior.initial_cov):
            ev = torch.linalg.eigvalsh(m.detach())
            if not bool((ev[..., 0] > 0).all()) or float((ev[..., -1] / ev[..., 0]).max()) * eps > \
                    MAX_CONDITION_TIMES_EPS:
                return False
    return True


def _inverse_and_logdet(m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(M^{-1}, log|M|) of SPD ``m (..., D, D)``."""
    L = torch.linalg.cholesky(m)
    return torch.cholesky_inverse(L), 2 * L.diagonal(dim1=-2, dim2=-1).log().sum(-1)


def _steps(x: torch.Tensor, prior: LDSPrior, T: int) -> torch.Tensor:
    """A per-step matrix field ``(..., D, D)`` (homogeneous) -> ``(..., T-1, D, D)``."""
    return x if prior.time_varying else x.unsqueeze(-3).expand(x.shape[:-2] + (T - 1,) + x.shape[-2:])


def _cat_time(first: torch.Tensor, rest: torch.Tensor, event_ndim: int = 2) -> torch.Tensor:
    """Concatenate ``(..., n_i, *event)`` blocks along time (the dim before the ``event_ndim`` trailing
    dims), broadcasting their batch dims."""
    dim = -1 - event_ndim
    batch = torch.broadcast_shapes(first.shape[:dim], rest.shape[:dim])
    return torch.cat([first.expand(batch + first.shape[dim:]), rest.expand(batch + rest.shape[dim:])], dim)


def _assemble(diag: torch.Tensor, lower: torch.Tensor | None = None) -> torch.Tensor:
    """Dense symmetric block-tridiagonal ``(..., k D, k D)`` from diagonal blocks ``diag (..., k, D, D)``
    and sub-diagonal blocks ``lower (..., k-1, D, D)`` (entry i is block [i+1, i]; None: block diagonal)."""
    k, D = diag.shape[-3], diag.shape[-1]
    grid = torch.diag_embed(diag.movedim(-3, -1))                              # (..., D, D, k, k)
    if lower is not None and k > 1:
        sub = lower.movedim(-3, -1)
        grid = grid + torch.diag_embed(sub, offset=-1) + torch.diag_embed(sub.transpose(-3, -2), offset=1)
    return grid.permute(*range(grid.dim() - 4), -2, -4, -1, -3).reshape(grid.shape[:-4] + (k * D, k * D))


def _pad_time(x: torch.Tensor, pad: int, fill: torch.Tensor, event_ndim: int = 2) -> torch.Tensor:
    """Append ``pad`` copies of ``fill`` (an event) along the time dim of ``x (..., time, *event)``."""
    if pad == 0:
        return x
    tail = fill.expand(x.shape[:-1 - event_ndim] + (pad,) + x.shape[x.dim() - event_ndim:])
    return torch.cat([x, tail], -1 - event_ndim)


def _prior_blocks(prior: LDSPrior, T: int, D: int) -> tuple[torch.Tensor, ...]:
    r"""Natural parameters of the LDS prior as blocks: ``diag (..., T, D, D)`` :math:`\Lambda_p[t,t]`,
    ``lower (..., T-1, D, D)`` :math:`\Lambda_p[t+1,t]`, ``hp (..., T, D)``, and the constant
    :math:`\tfrac12(\log|\Lambda_p| - c)` ``(...)`` of :math:`\log Z` (module docstring)."""
    Qi, logdet_Q = _inverse_and_logdet(prior.noise_cov)                    # inverted before the expand
    Qi = _steps(Qi, prior, T)
    logdet_Q = logdet_Q.sum(-1) if prior.time_varying else (T - 1) * logdet_Q
    P0i, logdet_P0 = _inverse_and_logdet(prior.initial_cov)
    A = _steps(prior.dynamics, prior, T)
    diag = _cat_time(P0i.unsqueeze(-3), Qi) + _cat_time(A.mT @ Qi @ A, torch.zeros_like(P0i).unsqueeze(-3))
    m0 = prior.initial_loc
    P0m0 = (P0i @ m0.unsqueeze(-1)).squeeze(-1)
    hp = _cat_time(P0m0.unsqueeze(-2), P0m0.new_zeros(()).expand(P0m0.shape[:-1] + (T - 1, D)), 1)
    c = (m0 * P0m0).sum(-1)
    if prior.offsets is not None:
        Qb = (Qi @ prior.offsets.unsqueeze(-1)).squeeze(-1)
        zero = torch.zeros_like(Qb[..., :1, :])
        hp = hp + _cat_time(zero, Qb, 1) - _cat_time((A.mT @ Qb.unsqueeze(-1)).squeeze(-1), zero, 1)
        c = c + (prior.offsets * Qb).sum((-1, -2))
    return diag, -Qi @ A, hp, 0.5 * (-logdet_P0 - logdet_Q - c)


def _block_cholesky_solve(B: torch.Tensor, O: torch.Tensor, hq: torch.Tensor, generator=None):
    r"""Mean, a sample and the diagonal covariance blocks of :math:`N(\Lambda^{-1} h, \Lambda^{-1})` for a
    block-tridiagonal :math:`\Lambda` with diagonal blocks ``B (..., M, n, n)``, sub-diagonal blocks
    ``O (..., M-1, n, n)`` (entry c is block [c+1, c]) and linear term ``hq (..., M, n)``.

    Block elimination (a block Cholesky in which only the Schur complements :math:`S_c` are factorized):

    .. math::
        S_c = B_c - O_{c-1} S_{c-1}^{-1} O_{c-1}^\top, \quad r_c = h_c - O_{c-1} u_{c-1}, \quad u_c = S_c^{-1} r_c,

    then backward, with :math:`K_c = S_c^{-1} O_c^\top`:
    :math:`m_c = u_c - K_c m_{c+1}`, :math:`x_c = u_c + L_c^{-\top}\varepsilon_c - K_c x_{c+1}`
    (:math:`S_c = L_c L_c^\top`; x is an exact, reparameterized sample) and
    :math:`\Sigma_{cc} = S_c^{-1} + K_c \Sigma_{c+1,c+1} K_c^\top`. Also
    :math:`\tfrac12 h^\top \Lambda^{-1} h = \tfrac12 \sum_c r_c^\top u_c` and
    :math:`\log|\Lambda|^{1/2} = \sum_c \log|L_c|`. Only the sequential parts are in the loops (about a
    dozen ops per block); the noise solves and log-determinants are batched over blocks.

    Returns ``mean, x: (..., M, n)``, ``Sigma: (..., M, n, n)``, ``half_quad, log_det_L: (...)``.
    """
    M, n = B.shape[-3], B.shape[-1]
    batch = torch.broadcast_shapes(B.shape[:-3], hq.shape[:-2])
    Bh = torch.cat([B.expand(batch + B.shape[-3:]), hq.expand(batch + hq.shape[-2:]).unsqueeze(-1)], -1).unbind(-3)
    Os = O.unbind(-3)
    Ls, Sinvs, Ks, rs, us = [], [], [], [], []
    for c in range(M):  # forward elimination: [S_c | r_c] = [B_c | h_c] - O_{c-1} [K_{c-1} | u_{c-1}]
        Sr = Bh[c] - Os[c - 1] @ Ku if c else Bh[c]
        S, r = Sr[..., :n], Sr[..., n:]
        L, _ = torch.linalg.cholesky_ex(S)
        Sinv = torch.cholesky_inverse(L)
        Ku = Sinv @ (torch.cat([Os[c].mT.expand(Sr.shape[:-2] + (n, n)), r], -1) if c < M - 1 else r)
        Ls.append(L), Sinvs.append(Sinv), rs.append(r), us.append(Ku[..., n:] if c < M - 1 else Ku)
        if c < M - 1:
            Ks.append(Ku[..., :n])
    L = torch.stack(Ls, -3)
    diag = L.diagonal(dim1=-2, dim2=-1)
    if not bool(torch.isfinite(diag).all()) or bool((diag <= 0).any()):
        raise ValueError(f"LDS posterior precision (prior + recognition potentials J), batch {tuple(B.shape[:-3])}, "
                         "is not numerically positive definite; check noise_cov, initial_cov and J")
    u = torch.stack(us, -3)
    eps = torch.randn(u.shape, dtype=u.dtype, device=u.device, generator=generator)
    noise = torch.linalg.solve_triangular(L.mT, eps, upper=True)
    start = torch.cat([u, u + noise], -1).unbind(-3)
    zs, Sigmas = [None] * M, [None] * M
    for c in reversed(range(M)):            # back substitution and the diagonal blocks of the inverse
        zs[c], Sigmas[c] = start[c], Sinvs[c]
        if c < M - 1:
            zs[c] = zs[c] - Ks[c] @ zs[c + 1]
            Sigmas[c] = Sigmas[c] + Ks[c] @ Sigmas[c + 1] @ Ks[c].mT
    mean, x = torch.stack(zs, -3).unbind(-1)
    half_quad = 0.5 * (torch.stack(rs, -3) * u).sum((-1, -2, -3))
    return mean, x, torch.stack(Sigmas, -3), half_quad, diag.log().sum((-1, -2))


def chunk_length(D: int, target: int = 16) -> int:
    """Time steps per block of :func:`banded_lds_local`: blocks of about ``target`` latent dims (measured
    fastest at D = 2 and D = 10 on CPU)."""
    return max(1, round(target / D))


def banded_lds_local(prior: LDSPrior, J: torch.Tensor, h: torch.Tensor, generator=None,
                     chunk: int | None = None) -> BandedLocal:
    r"""Exact q(x) of a linear-Gaussian chain under potentials ``J (..., T, D, D)``,
    ``h (..., T, D)``: a reparameterized sample, the mean, :math:`\log Z` and :math:`\mathbb{E}_q[\log \psi]`
    (module docstring), by a block-tridiagonal Cholesky over chunks of ``chunk`` time steps
    (:func:`_block_cholesky_solve` on blocks of size n = chunk * D; default :func:`chunk_length`).

    The chain's precision is block tridiagonal in time; grouping ``chunk`` steps gives a block-tridiagonal
    matrix of M = ceil(T / chunk) blocks of size n, solved in 2M rounds of batched (n, n) ops: few large
    ops rather than T tiny ones (CPU op overhead) or one (T D)^3 factorization. T is padded to a multiple
    of ``chunk`` with independent N(0, I) nodes (no coupling, no potential), which add nothing to log Z.
    Cost O(N T chunk^2 D^3).
    """
    T, D = h.shape[-2], h.shape[-1]
    k = chunk or chunk_length(D)
    pad = -T % k
    M = (T + pad) // k
    diag, lower, hp, const = _prior_blocks(prior, T, D)                      # unbatched where the prior is
    zero = h.new_zeros(D, D)
    diag = _pad_time(diag, pad, torch.eye(D, dtype=h.dtype, device=h.device))
    lower = _pad_time(lower, pad + 1, zero)
    lower = lower.reshape(lower.shape[:-3] + (M, k, D, D))                   # [c, i]: block [ck+i+1, ck+i]
    J_pad = _pad_time(J, pad, zero)
    B = (_assemble(diag.reshape(diag.shape[:-3] + (M, k, D, D)), lower[..., :k - 1, :, :])
         + _assemble(J_pad.reshape(J_pad.shape[:-3] + (M, k, D, D))))
    O = torch.nn.functional.pad(lower[..., :M - 1, k - 1, :, :], ((k - 1) * D, 0, 0, (k - 1) * D))  # block [0, k-1]
    hq = _pad_time(hp + h, pad, zero[0], 1)
    mean, x, Sigma, half_quad, log_det = _block_cholesky_solve(B, O, hq.reshape(hq.shape[:-2] + (M, k * D)),
                                                               generator)
    batch = Sigma.shape[:-3]
    Sigma_tt = Sigma.reshape(batch + (M, k, D, k, D)).diagonal(dim1=-4, dim2=-2).movedim(-1, -3)
    Sigma_tt = Sigma_tt.reshape(batch + (M * k, D, D))[..., :T, :, :]
    mean, x = (v.reshape(batch + (M * k, D))[..., :T, :] for v in (mean, x))
    second = Sigma_tt + mean.unsqueeze(-1) * mean.unsqueeze(-2)
    elp = -0.5 * (J * second).sum((-1, -2, -3)) + (h * mean).sum((-1, -2))
    return BandedLocal(x, mean, half_quad - log_det + const, elp)
