r"""Exact local inference of a linear-Gaussian chain by a block-tridiagonal Cholesky in nested-dissection
order (the LDS-SVAE's fast path on CPU).

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

How: nested dissection in time (:func:`_solve_chain`). The chain is cut into chunks of k steps; the
interiors of all chunks are eliminated at once (one batched dense factorization of (k - 1) D dims), which
leaves a chain of ceil(T / k) separators with the same block-tridiagonal form, solved the same way down to
one dense factorization. L is thus the Cholesky factor of :math:`\Lambda_q` in the dissection order, and the
sample is exact and reparameterized. The dense factorizations carry a hand-written backward
(:class:`_SPDFactor`, batched products only); everything else is autograd.

Why not the parallel scan (:mod:`ppl.inference.exact.kalman_info`) or a sweep over time: for the SVAE's
small D every op of the scan is a tiny batched (D, D) product, so the forward and, worse, the autograd
backward are dominated by per-op overhead (hundreds of ops per step); a sequential sweep over chunks of
time needs O(T / k) rounds of a dozen ops. The dissection needs a few levels of about 30 batched ops.
Measured on one CPU thread (float32, forward + backward of the local step with a sample-dependent loss,
medians, a 2-core machine shared with other jobs): 64 chains x 40 steps, D = 2: 5.1 ms (sweep over
chunks: 7.6 ms, scan: 24 ms); 32 x 50, D = 6: 10.9 ms (17.0, 64); 64 x 50, D = 10: 39 ms (45, 200).
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
MAX_CUDA_DIMS = 512
"""On CUDA, chains of more than this many dims (T * D) use the O(log T)-depth parallel scan. The bound is
the envelope of the earlier sweep-over-chunks path (32 rounds of 16-dim blocks), kept: the dissection
launches fewer kernels than that sweep, but has not been timed against the scan on CUDA for longer chains."""


class BandedLocal(NamedTuple):
    r"""x: sample ``(..., T, D)``; mean: ``(..., T, D)``; log_z: ``(...)``; expected_log_potential: ``(...)``;
    with ``moments=True``: cov ``(..., T, D, D)`` :math:`\Sigma_{tt}` and cross ``(..., T-1, D, D)``
    :math:`\Sigma_{t+1,t}` (else None)."""

    x: torch.Tensor
    mean: torch.Tensor
    log_z: torch.Tensor
    expected_log_potential: torch.Tensor
    cov: torch.Tensor | None = None
    cross: torch.Tensor | None = None


def use_banded(prior: LDSPrior, T: int, D: int) -> bool:
    """True when ``noise_cov`` and ``initial_cov`` are well conditioned in the working dtype (their
    inverses are formed) and, on CUDA, the chain has at most ``MAX_CUDA_DIMS`` dims (T * D)."""
    if prior.noise_cov.device.type == "cuda" and T * D > MAX_CUDA_DIMS:
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


def _prior_blocks(prior: LDSPrior, T: int, D: int, expected=None) -> tuple[torch.Tensor, ...]:
    r"""Natural parameters of the LDS prior as blocks: ``diag (..., T, D, D)`` :math:`\Lambda_p[t,t]`,
    ``lower (..., T-1, D, D)`` :math:`\Lambda_p[t+1,t]`, ``hp (..., T, D)``, and the constant
    :math:`\tfrac12(\log|\Lambda_p| - c)` ``(...)`` of :math:`\log Z` (module docstring).

    ``expected`` (``ppl.expfam.mniw.MNIWExpectations``, no offsets; fields ``(..., D, D)`` and ``(...)`` for a
    homogeneous chain, ``(..., T-1, D, D)`` and ``(..., T-1)`` per step when ``prior.time_varying``, e.g. the
    :math:`q(z)`-weighted blocks of a switching chain): the transition factors are
    :math:`\exp E_q\log N(x_t \mid A_tx_{t-1}, Q_t)`, i.e.
    :math:`Q^{-1} \to E[Q^{-1}]`, :math:`Q^{-1}A \to E[Q^{-1}A]`, :math:`A^\top Q^{-1}A \to E[A^\top Q^{-1}A]`,
    :math:`\log|Q| \to E\log|Q|` (``prior.dynamics``/``noise_cov`` are then not read)."""
    if expected is not None:
        if prior.offsets is not None:
            raise ValueError("expected MNIW dynamics need a chain without inputs")
        if prior.time_varying:
            Qi, QiA, AQA = expected.Qinv, expected.Qinv_A, expected.At_Qinv_A
            logdet_Q = expected.logdet_Q.sum(-1)
        else:
            Qi = expected.Qinv.unsqueeze(-3).expand(expected.Qinv.shape[:-2] + (T - 1, D, D))
            QiA = expected.Qinv_A.unsqueeze(-3).expand(Qi.shape)
            AQA = expected.At_Qinv_A.unsqueeze(-3).expand(Qi.shape)
            logdet_Q = (T - 1) * expected.logdet_Q
    else:
        Qi, logdet_Q = _inverse_and_logdet(prior.noise_cov)                    # inverted before the expand
        Qi = _steps(Qi, prior, T)
        logdet_Q = logdet_Q.sum(-1) if prior.time_varying else (T - 1) * logdet_Q
        A = _steps(prior.dynamics, prior, T)
        QiA, AQA = Qi @ A, A.mT @ Qi @ A
    P0i, logdet_P0 = _inverse_and_logdet(prior.initial_cov)
    diag = _cat_time(P0i.unsqueeze(-3), Qi) + _cat_time(AQA, torch.zeros_like(P0i).unsqueeze(-3))
    m0 = prior.initial_loc
    P0m0 = (P0i @ m0.unsqueeze(-1)).squeeze(-1)
    hp = _cat_time(P0m0.unsqueeze(-2), P0m0.new_zeros(()).expand(P0m0.shape[:-1] + (T - 1, D)), 1)
    c = (m0 * P0m0).sum(-1)
    if prior.offsets is not None:
        Qb = (Qi @ prior.offsets.unsqueeze(-1)).squeeze(-1)
        zero = torch.zeros_like(Qb[..., :1, :])
        hp = hp + _cat_time(zero, Qb, 1) - _cat_time((A.mT @ Qb.unsqueeze(-1)).squeeze(-1), zero, 1)
        c = c + (prior.offsets * Qb).sum((-1, -2))
    return diag, -QiA, hp, 0.5 * (-logdet_P0 - logdet_Q - c)


class _Chain(NamedTuple):
    """Solution of a block-tridiagonal Gaussian chain (:func:`_solve_chain`): ``mean, x: (..., T, D)``,
    ``cov: (..., T, D, D)`` (:math:`\\Sigma_{tt}`), ``cross: (..., T-1, D, D)`` (:math:`\\Sigma_{t+1,t}`, or None
    when not asked for), ``half_quad, log_det_L: (...)``, ``info``: list of ``cholesky_ex`` infos."""

    mean: torch.Tensor
    x: torch.Tensor
    cov: torch.Tensor
    cross: torch.Tensor | None
    half_quad: torch.Tensor
    log_det_L: torch.Tensor
    info: list


def _diag_blocks(S: torch.Tensor, k: int, D: int, offset: int = 0) -> torch.Tensor:
    """Blocks ``[i + offset, i]`` of ``S (..., k D, k D)``: ``(..., k - offset, D, D)``."""
    S = S.reshape(S.shape[:-2] + (k, D, k, D))[..., offset:, :, :k - offset, :]
    return S.diagonal(dim1=-4, dim2=-2).movedim(-1, -3)


class _SPDFactor(torch.autograd.Function):
    r"""``(Lambda^{-1}, L^{-T} e, log|L|)`` of SPD ``Lambda (..., n, n)`` (``Lambda = L L^T``) and
    ``e (..., n, r)``, with a backward of a few batched products (no triangular solves): with
    :math:`L^{-1}` kept from the forward,
    :math:`\bar\Lambda = L^{-\top}\,[\Phi(L^\top \bar L) - L^{-1} \bar S L^{-\top} + \tfrac12 \bar\ell I]\,L^{-1}`
    (symmetrized), where :math:`\bar L = -\mathrm{tril}(v\, (L^{-1}\bar v)^\top)` is the adjoint of the
    factor through :math:`v = L^{-\top} e` and :math:`\Phi` keeps the lower triangle with the diagonal
    halved (Murray 2016, *Differentiation of the Cholesky decomposition*). Returns the infos of
    ``cholesky_ex`` as a fourth, non-differentiable output."""

    @staticmethod
    def forward(ctx, Lam, e):
        L, info = torch.linalg.cholesky_ex(Lam)
        Li = torch.linalg.solve_triangular(L, torch.eye(L.shape[-1], dtype=L.dtype, device=L.device).expand(L.shape),
                                           upper=False)
        Sinv, v = Li.mT @ Li, Li.mT @ e
        ctx.save_for_backward(L, Li, v)
        ctx.mark_non_differentiable(info)
        return Sinv, v, L.diagonal(dim1=-2, dim2=-1).log().sum(-1), info

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, S_bar, v_bar, l_bar, _):
        L, Li, v = ctx.saved_tensors
        n = L.shape[-1]
        inner = torch.zeros_like(L)
        if S_bar is not None:
            inner = inner - Li @ S_bar @ Li.mT
        if l_bar is not None:
            inner = inner + 0.5 * l_bar[..., None, None] * torch.eye(n, dtype=L.dtype, device=L.device)
        e_bar = None
        if v_bar is not None:
            L_bar = -(v @ (Li @ v_bar).mT if v.shape[-1] > 1 else v * (Li @ v_bar).mT).tril()
            P = (L.mT @ L_bar).tril()
            inner = inner + P - 0.5 * torch.diag_embed(P.diagonal(dim1=-2, dim2=-1))
            e_bar = Li @ v_bar if ctx.needs_input_grad[1] else None
        G = Li.mT @ inner @ Li
        return 0.5 * (G + G.mT), e_bar


def _solve_dense(diag, lower, hq, eps, cross: bool) -> _Chain:
    """One dense factorization of the assembled ``(..., T D, T D)`` precision (:func:`_solve_chain`'s base case)."""
    T, D = diag.shape[-3], diag.shape[-1]
    S, noise, log_det, info = _SPDFactor.apply(_assemble(diag, lower), eps.reshape(eps.shape[:-2] + (T * D, 1)))
    h = hq.reshape(hq.shape[:-2] + (T * D, 1))
    m = S @ h
    mean, x = m.reshape(hq.shape), (m + noise).reshape(hq.shape)
    return _Chain(mean, x, _diag_blocks(S, T, D), _diag_blocks(S, T, D, 1) if cross else None,
                  0.5 * (h * m).sum((-1, -2)), log_det, [info])


def _solve_chain(diag, lower, hq, eps, chunk: int | None, dense_max: int, cross: bool = False) -> _Chain:
    r"""Mean, reparameterized sample ``mean + L^{-T} eps``, diagonal (and, if ``cross``, sub-diagonal)
    covariance blocks, :math:`\tfrac12 h^\top \Lambda^{-1} h` and :math:`\log|L|` of the Gaussian chain with
    block-tridiagonal precision :math:`\Lambda` (diagonal blocks ``diag (..., T, D, D)``, sub-diagonal
    blocks ``lower (..., T-1, D, D)``, entry t = block [t+1, t]) and linear term ``hq (..., T, D)``;
    ``eps (..., T, D)`` standard normal. All inputs share the batch dims.

    Nested dissection in time: the chain is cut into M = ceil(T / k) chunks of k = ``chunk`` steps (None:
    :func:`chunk_length`; then a chain of at most ``dense_max`` dims is solved densely); the
    last step of each chunk is a separator :math:`s_c` and the k - 1 steps before it the interior
    :math:`I_c`, coupled only to :math:`s_{c-1}` and :math:`s_c`. With
    :math:`E_c = [\Lambda_{I_c s_{c-1}}, \Lambda_{I_c s_c}]` and :math:`W_c = \Lambda_{I_c I_c}^{-1} [E_c, h_{I_c}]`
    (one batched dense solve over all chunks), the separators form a chain of M steps with
    precision :math:`\Lambda_{ss} - E^\top \Lambda_{II}^{-1} E` (still block tridiagonal) and linear term
    :math:`h_s - E^\top \Lambda_{II}^{-1} h_I`, solved by recursion (default chunks; dense once it has at
    most ``dense_max`` dims, or at most one chunk). Then, with :math:`z_c = (x_{s_{c-1}}, x_{s_c})` and
    :math:`C_c = \mathrm{Cov}(z_c)`:
    :math:`x_{I_c} = \Lambda_{II}^{-1} h_I - \Lambda_{II}^{-1} E_c z_c + L_{I}^{-\top} \varepsilon_{I_c}`
    (exact: :math:`p(x_I \mid x_s)`), :math:`\mathrm{Cov}(x_{I_c}) = \Lambda_{II}^{-1}
    + (\Lambda_{II}^{-1} E_c) C_c (\Lambda_{II}^{-1} E_c)^\top`, and
    :math:`h^\top \Lambda^{-1} h`, :math:`\log|\Lambda|` split into interior and separator parts.
    Sequential depth O(log T / log k) levels of about 30 batched ops each (no loop over time).
    """
    T, D = diag.shape[-3], diag.shape[-1]
    k, batch = chunk_length(D) if chunk is None else chunk, diag.shape[:-3]
    if T <= k or (chunk is None and T * D <= dense_max):
        return _solve_dense(diag, lower, hq, eps, cross)
    F = torch.nn.functional
    pad = -T % k
    M, nI = (T + pad) // k, (k - 1) * D
    if pad:
        diag = torch.cat([diag, torch.eye(D, dtype=diag.dtype, device=diag.device).expand(batch + (pad, D, D))], -3)
        hq, eps = F.pad(hq, (0, 0, 0, pad)), F.pad(eps, (0, 0, 0, pad))
    dg_I, dg_s = diag.reshape(batch + (M, k, D, D)).split([k - 1, 1], -3)
    # lower[c, i] = block [ck+i+1, ck+i]: interior sub-diagonal, [s_c, last of I_c], [first of I_{c+1}, s_c]
    lw_I, nxt, link = F.pad(lower, (0, 0, 0, 0, 0, pad + 1)).reshape(batch + (M, k, D, D)).split([k - 2, 1, 1], -3)
    prev = F.pad(link.squeeze(-3), (0, 0, 0, 0, 1, -1))                              # [first of I_c, s_{c-1}]
    h_I, h_s = hq.reshape(batch + (M, k, D)).split([k - 1, 1], -2)
    e_I, e_s = eps.reshape(batch + (M, k, D)).split([k - 1, 1], -2)
    Sinv, noise, log_det_I, info = _SPDFactor.apply(_assemble(dg_I, lw_I), e_I.reshape(batch + (M, nI, 1)))
    R = torch.cat([F.pad(prev, (0, 0, 0, nI - D)), F.pad(nxt.squeeze(-3).mT, (0, 0, nI - D, 0)),
                   h_I.reshape(batch + (M, nI, 1))], -1)                              # [E_c | h_I] (..., M, nI, 2D+1)
    W = Sinv @ R
    (G_pp, G_pn, g_p), (G_np, G_nn, g_n), (_, _, quad) = (
        r.split([D, D, 1], -1) for r in (R.mT @ W).split([D, D, 1], -2))             # R^T Lambda_II^{-1} R
    up = lambda v: F.pad(v, (0, 0, 0, 0, -1, 1))  # noqa: E731  (chunk c+1's term at c; zero at the end)
    red = _solve_chain(dg_s.squeeze(-3) - G_nn - up(G_pp), -G_np[..., 1:, :, :],
                       h_s.squeeze(-2) - (g_n + up(g_p)).squeeze(-1), e_s.squeeze(-2), None, dense_max,
                       cross=True)
    mx = torch.stack([red.mean, red.x], -1)                                           # (..., M, D, 2)
    W_E, w_h = W.split([2 * D, 1], -1)
    z = torch.cat([F.pad(mx, (0, 0, 0, 0, 1, -1)), mx], -2)                           # (x_{s_{c-1}}, x_{s_c})
    mxI = w_h - W_E @ z + F.pad(noise, (1, 0))
    Cpp = F.pad(red.cov, (0, 0, 0, 0, 1, -1))
    Cnp = F.pad(red.cross, (0, 0, 0, 0, 1, 0))                                        # Cov(x_{s_c}, x_{s_{c-1}})
    C = torch.cat([torch.cat([Cpp, Cnp.mT], -1), torch.cat([Cnp, red.cov], -1)], -2)  # Cov(z_c) (..., M, 2D, 2D)
    WC = W_E @ C
    SI = Sinv + WC @ W_E.mT                                                           # Cov(x_{I_c})
    mean, x = (torch.cat([v.reshape(batch + (M, k - 1, D)), r.unsqueeze(-2)], -2).reshape(batch + (M * k, D))
               for v, r in zip(mxI.unbind(-1), (red.mean, red.x)))
    cov = torch.cat([_diag_blocks(SI, k - 1, D), red.cov.unsqueeze(-3)], -3).reshape(batch + (M * k, D, D))
    out_cross = None
    if cross:  # [ck, ck-1] = -Cov(x_{I_c} first, z_c) p-part; [ck+i+1, ck+i] interior; [s_c, I_c last]
        blocks = [-WC[..., None, :D, :D], _diag_blocks(SI, k - 1, D, 1), -WC[..., None, nI - D:, D:].mT]
        out_cross = torch.cat(blocks, -3).reshape(batch + (M * k, D, D))[..., 1:T, :, :]
    if pad:
        mean, x, cov = mean[..., :T, :], x[..., :T, :], cov[..., :T, :, :]
    half_quad = 0.5 * quad.sum((-1, -2, -3)) + red.half_quad
    log_det = log_det_I.sum(-1) + red.log_det_L
    return _Chain(mean, x, cov, out_cross, half_quad, log_det, [info] + red.info)


DENSE_MAX = 40
"""Chains of at most this many dims (T * D) are solved by one dense Cholesky (:func:`_solve_chain`)."""


def chunk_length(D: int, target: int = 8) -> int:
    """Time steps per chunk of :func:`_solve_chain`: interiors of ceil(``target`` / D) steps, plus the
    separator (the fastest or tied among the settings measured at D = 2 and D = 6 on CPU)."""
    return max(1, -(-target // D)) + 1


def banded_lds_local(prior: LDSPrior, J: torch.Tensor, h: torch.Tensor, generator=None,
                     chunk: int | None = None, dense_max: int = DENSE_MAX, expected=None,
                     moments: bool = False) -> BandedLocal:
    r"""Exact q(x) of a linear-Gaussian chain under potentials ``J (..., T, D, D)``,
    ``h (..., T, D)``: a reparameterized sample, the mean, :math:`\log Z` and :math:`\mathbb{E}_q[\log \psi]`
    (module docstring), by nested dissection in time (:func:`_solve_chain`, first-level chunks of ``chunk``
    >= 2 steps, default :func:`chunk_length`; chains of at most ``dense_max`` dims: one dense Cholesky).

    The chain's precision is block tridiagonal in time. Eliminating the interiors of all chunks at once
    (one batched dense factorization of (chunk - 1) D dims) leaves a chain of ceil(T / chunk) separators,
    solved the same way; so a chain of any length costs a few levels of about 30 batched ops each, forward
    and backward, rather than O(T) rounds of tiny ops (CPU op overhead). Exact; the sample is
    :math:`m + L^{-\top}\varepsilon` for the Cholesky factor L of the precision in the dissection order.
    Cost O(N T chunk^2 D^3).

    ``expected``: optional ``MNIWExpectations`` of a conjugate q(A, Q) (:func:`_prior_blocks`): the prior
    factor becomes :math:`\exp E_{q(A,Q)}\log p(x \mid A, Q)` and ``log_z`` its normalizer with the potentials
    (so :math:`E_q[\log\psi] - \log Z = E_q\log q(x) - E_{q(x)q(A,Q)}\log p(x \mid A, Q)`).
    ``moments``: also return the marginal and lag-one covariances (``cov``, ``cross``).
    """
    T, D = h.shape[-2], h.shape[-1]
    if chunk is not None and chunk < 2:
        raise ValueError(f"banded_lds_local: chunk must be >= 2 time steps, got {chunk}")
    diag, lower, hp, const = _prior_blocks(prior, T, D, expected)            # unbatched where the prior is
    hq = hp + h
    batch = torch.broadcast_shapes(diag.shape[:-3], lower.shape[:-3], J.shape[:-3], hq.shape[:-2])
    diag = (diag + J).expand(batch + (T, D, D))
    lower = lower.expand(batch + (T - 1, D, D))
    hq = hq.expand(batch + (T, D))
    eps = torch.randn(hq.shape, dtype=hq.dtype, device=hq.device, generator=generator)
    sol = _solve_chain(diag, lower, hq, eps, chunk, dense_max, cross=moments)
    info = torch.stack([i.reshape(-1).amax() if i.numel() else i.new_zeros(()) for i in sol.info])
    if bool((info > 0).any() | ~torch.isfinite(sol.log_det_L).all()):                 # one sync
        raise ValueError(f"LDS posterior precision (prior + recognition potentials J), batch {tuple(batch)}, "
                         "is not numerically positive definite; check noise_cov, initial_cov and J")
    second = sol.cov + sol.mean.unsqueeze(-1) * sol.mean.unsqueeze(-2)
    elp = -0.5 * (J * second).sum((-1, -2, -3)) + (h * sol.mean).sum((-1, -2))
    if moments:
        return BandedLocal(sol.x, sol.mean, sol.half_quad - sol.log_det_L + const, elp, sol.cov, sol.cross)
    return BandedLocal(sol.x, sol.mean, sol.half_quad - sol.log_det_L + const, elp)
