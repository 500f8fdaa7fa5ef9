"""Random test inputs drawn from seeded generators, and the Monte Carlo comparison the tests share.

- :func:`spd`: random symmetric positive definite matrices;
- :func:`random_niw`, :func:`random_mniw`: natural parameters of random NIW / MNIW distributions;
- :func:`mc_close`: a sample mean within z standard errors of the exact value;
- :func:`left_right_hmm_data`: a long path of a chain with structural zeros and its Gaussian data.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from ppl.expfam import mniw, niw

F64 = torch.float64


def spd(g: torch.Generator, *batch: int, dim: int, scale: float = 1.0, floor: float = 0.3,
        dtype: torch.dtype = F64) -> Tensor:
    """Random symmetric positive definite ``(*batch, dim, dim)``: ``scale * X X^T / dim + floor * I`` with
    ``X`` standard normal from ``g`` (eigenvalues at least ``floor``)."""
    x = torch.randn(*batch, dim, dim, generator=g, dtype=dtype)
    return scale * x @ x.mT / dim + floor * torch.eye(dim, dtype=dtype)


def random_niw(g: torch.Generator, *batch: int, dim: int, dtype: torch.dtype = F64) -> niw.NIWNatural:
    """Natural parameters of a random NIW of batch ``batch`` on ``dim``-vectors: loc ~ N(0, I),
    kappa in [0.5, 1.5), scale ``spd``, df in [dim + 1.5, dim + 4.5)."""
    loc = torch.randn(*batch, dim, generator=g, dtype=dtype)
    kappa = 0.5 + torch.rand(batch, generator=g, dtype=dtype)
    df = dim + 1.5 + 3 * torch.rand(batch, generator=g, dtype=dtype)
    return niw.natural_from_standard(loc, kappa, spd(g, *batch, dim=dim, dtype=dtype), df)


def random_mniw(g: torch.Generator, *batch: int, out: int = 3, inp: int = 2,
                dtype: torch.dtype = F64) -> mniw.MNIWNatural:
    """Natural parameters of a random MNIW of batch ``batch`` on ``(out, inp)`` matrices: loc
    ``(*batch, out, inp)`` ~ N(0, 0.25), col_precision and scale ``spd``, df in [out + 1.5, out + 4.5)."""
    M = 0.5 * torch.randn(*batch, out, inp, generator=g, dtype=dtype)
    df = out + 1.5 + 3 * torch.rand(batch, generator=g, dtype=dtype)
    K, Psi = spd(g, *batch, dim=inp, dtype=dtype), spd(g, *batch, dim=out, dtype=dtype)
    return mniw.natural_from_standard(M, K, Psi, df)


def mc_close(samples: Tensor, exact: Tensor, z: float = 5.0) -> bool:
    """``|mean(samples) - exact| <= z`` standard errors (+1e-12), elementwise; ``samples: (num, ...)``
    with the draws on dim 0, ``exact`` broadcastable to ``samples.shape[1:]``."""
    se = samples.std(0) / math.sqrt(samples.shape[0])
    return bool(((samples.mean(0) - exact).abs() <= z * se + 1e-12).all())


LEFT_RIGHT_TRANS = torch.tensor([[0.99, 0.01, 0.0], [0.0, 0.99, 0.01], [0.0, 0.0, 1.0]], dtype=F64)
"""A 3-state left-right chain: a state once left cannot be re-entered (zeros below the diagonal)."""
LEFT_RIGHT_LOC = torch.tensor([-5.0, 0.0, 5.0], dtype=F64)


def left_right_hmm_data(T: int, seed: int = 7) -> Tensor:
    """y: (T,) float64, ``LEFT_RIGHT_LOC[z_t] + N(0, 1)`` along a path z from state 0 of ``LEFT_RIGHT_TRANS``."""
    g = torch.Generator().manual_seed(seed)
    z = [0]
    for _ in range(T - 1):
        z.append(int(torch.multinomial(LEFT_RIGHT_TRANS[z[-1]], 1, generator=g)))
    return LEFT_RIGHT_LOC[torch.tensor(z)] + torch.randn(T, dtype=F64, generator=g)
