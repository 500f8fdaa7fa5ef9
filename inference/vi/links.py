r"""Observed children of the vi backend: expected sufficient statistics for their conjugate global and their
expected log-likelihood table under q.

A child's density depends on the discrete local z (K states, shape ``zshape``) only through a global indexed by
z (``rate[z]``, ``loc[z]``, ...). With responsibilities ``r: (K, *zshape)`` = q(z = k) and data weights ``w``
(mask times scale), the statistics are sums over the data of ``r w t(y)``, and the table is

.. math:: \ell_k(n) = w_n\, E_{q(\theta)}[\log p(y_n \mid \theta_k)] \quad (K, *zshape),

summed over the child's own dims beyond ``zshape`` (``E``: elementwise dims, or the event dim of a
MultivariateNormal). Both are exact, in closed form:

- Categorical(probs = Dirichlet row): :math:`E\log p = E\log\theta_{k, y}`;
- Poisson(rate = Gamma): :math:`y E\log\lambda - E\lambda - \log y!`;
- Bernoulli(probs = Beta): :math:`y E\log p + (1-y) E\log(1-p)`;
- Normal(loc = Normal(m, v), known scale s): :math:`-\tfrac12\log 2\pi s^2 - ((y - m)^2 + v) / 2s^2`;
- MultivariateNormal(loc = N(m, V), known precision Lambda):
  :math:`\log N(y \mid m, \Lambda^{-1}) - \tfrac12 \mathrm{tr}(\Lambda V)`;
- MultivariateNormal(loc, cov = NIW): :math:`-\tfrac D2 \log 2\pi - \tfrac12 E\log|\Sigma| - \tfrac12 y^\top
  E[\Sigma^{-1}] y + y^\top E[\Sigma^{-1}\mu] - \tfrac12 E[\mu^\top\Sigma^{-1}\mu]`;
- "fixed": a child whose parameters depend on z but on no global: its tabulated log-density.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ppl.expfam import niw

from .families import beta_expectations, dirichlet_expected_log, gamma_expectations


@dataclass(frozen=True)
class Child:
    """An observed site of the model as the coordinate ascent sees it.

    kind: "categorical" | "poisson" | "bernoulli" | "normal" | "gaussian" | "niw" | "fixed".
    glob: the global site it is conjugate to (None for "fixed").
    y: its value, ``(*zshape, *E)`` (``(*zshape)`` for categorical, ``(*zshape, D)`` for gaussian / niw).
    w: weights, y's shape without the event dim of a MultivariateNormal (mask times scale; 0 where missing).
    known: "normal": variance ``s^2`` broadcastable to ``(K, *zshape, *E)``; "gaussian": (precision ``(K, D, D)``,
        log det of the covariance ``(K,)``); "fixed": the table ``(K, *zshape)``; else None.
    nz: ``len(zshape)``.
    yy: for "gaussian" / "niw": the data's outer products flattened, ``(M, D * D)`` (each sweep's scatter
        statistics and quadratic forms are then one matrix product each); else None.
    """

    name: str
    kind: str
    glob: str | None
    y: torch.Tensor
    w: torch.Tensor
    known: object
    nz: int
    yy: torch.Tensor | None = None


def outer_products(y: torch.Tensor) -> torch.Tensor:
    """``y (..., D)`` -> ``y y^T`` flattened over the data: ``(M, D * D)``."""
    y = y.reshape(-1, y.shape[-1])
    return (y[:, :, None] * y[:, None, :]).reshape(y.shape[0], -1)


def _extra(child: Child) -> int:
    """Number of elementwise dims ``E`` after ``zshape``."""
    return child.w.dim() - child.nz


def _expand_r(r: torch.Tensor, child: Child) -> torch.Tensor:
    return r.reshape(r.shape + (1,) * _extra(child))


def _sum_z(x: torch.Tensor, nz: int) -> torch.Tensor:
    """Sum ``(K, *zshape, *E)`` over zshape -> ``(K, *E)``."""
    return x.sum(tuple(range(1, 1 + nz))) if nz else x


def _sum_e(x: torch.Tensor, child: Child) -> torch.Tensor:
    """Sum ``(K, *zshape, *E)`` over E -> ``(K, *zshape)``."""
    extra = _extra(child)
    return x.sum(tuple(range(x.dim() - extra, x.dim()))) if extra else x


def _flat_rw(r: torch.Tensor, child: Child) -> torch.Tensor:
    """``r w`` flattened over the data: ``(K, M)``."""
    return (r * child.w).reshape(r.shape[0], -1)


def stats(child: Child, r: torch.Tensor, q: tuple) -> tuple:
    """Expected sufficient statistics the child adds to its global's prior (layout in ``families``), given
    ``r: (K, *zshape)`` and the global's current ``q`` (only its shape is read)."""
    kind = child.kind
    if kind == "categorical":
        C = q[0].shape[-1]
        onehot = torch.nn.functional.one_hot(child.y.reshape(-1), C).to(r.dtype)
        return (_flat_rw(r, child) @ onehot,)
    if kind in ("gaussian", "niw"):
        rw = _flat_rw(r, child)
        y = child.y.reshape(-1, child.y.shape[-1])
        n, sum_y = rw.sum(-1), rw @ y
        if kind == "niw":
            D = y.shape[-1]
            return ((rw @ child.yy).reshape(-1, D, D), sum_y, n, n)
        prec = child.known[0]
        return ((prec @ sum_y.unsqueeze(-1)).squeeze(-1), n[:, None, None] * prec)
    rw = _expand_r(r, child) * child.w
    if kind == "poisson":
        return _sum_z(rw * child.y, child.nz), _sum_z(rw.expand(rw.shape[:1] + child.w.shape), child.nz)
    if kind == "bernoulli":
        return _sum_z(rw * child.y, child.nz), _sum_z(rw * (1 - child.y), child.nz)
    if kind == "normal":
        rws = rw / child.known
        return _sum_z(rws * child.y, child.nz), _sum_z(rws.expand(r.shape[:1] + rws.shape[1:]), child.nz)
    raise ValueError(f"child '{child.name}': no conjugate statistics for kind {kind!r}")


def _per_state(x: torch.Tensor, child: Child) -> torch.Tensor:
    """A per-state quantity ``(K, *E)`` laid out as ``(K, 1 * nz, *E)``."""
    return x.reshape(x.shape[:1] + (1,) * child.nz + x.shape[1:])


def table(child: Child, q: tuple | None) -> torch.Tensor:
    """``E_q[log p(y | z = k)]`` weighted and summed over the child's own dims: ``(K, *zshape)``."""
    kind, y, w = child.kind, child.y, child.w
    if kind == "fixed":
        return child.known
    if kind == "categorical":
        elog = dirichlet_expected_log(q)
        return elog[:, y.reshape(-1)].reshape(elog.shape[:1] + y.shape) * w
    if kind in ("gaussian", "niw"):
        return _gaussian_table(child, q)
    if kind == "poisson":
        mean, elog = (_per_state(t, child) for t in gamma_expectations(q))
        return _sum_e(w * (y * elog - mean - torch.lgamma(y + 1)), child)
    if kind == "bernoulli":
        elog_p, elog_q = (_per_state(t, child) for t in beta_expectations(q))
        return _sum_e(w * (y * elog_p + (1 - y) * elog_q), child)
    if kind == "normal":
        m, v = (_per_state(t, child) for t in q)
        s2 = child.known
        return _sum_e(w * (-0.5 * torch.log(2 * math.pi * s2) - ((y - m) ** 2 + v) / (2 * s2)), child)
    raise ValueError(f"child '{child.name}': no expected log-likelihood for kind {kind!r}")


def _gaussian_table(child: Child, q: tuple) -> torch.Tensor:
    r"""Expected MultivariateNormal log-density ``(K, *zshape)`` under q(loc) Gaussian or q(loc, cov) NIW, as
    :math:`c_k + y^\top h_k - \tfrac12 y^\top P_k y` with the quadratic form read off ``yy`` by one product."""
    y = child.y.reshape(-1, child.y.shape[-1])
    D = y.shape[-1]
    if child.kind == "niw":
        e = niw.expectations(niw.NIWNatural(*q))
        P, h = e.prec, e.prec_mean
        const = -0.5 * D * math.log(2 * math.pi) - 0.5 * e.logdet_cov - 0.5 * e.quad
    else:
        mean, cov = q
        P, logdet = child.known
        h = (P @ mean.unsqueeze(-1)).squeeze(-1)
        const = (-0.5 * D * math.log(2 * math.pi) - 0.5 * logdet - 0.5 * (mean * h).sum(-1)
                 - 0.5 * (P * cov).sum((-1, -2)))
    out = const[:, None] + h @ y.mT - 0.5 * (P.reshape(P.shape[0], -1) @ child.yy.mT)
    return out.reshape(out.shape[:1] + child.w.shape) * child.w
