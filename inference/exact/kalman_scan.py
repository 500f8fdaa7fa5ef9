r"""Parallel-in-time building blocks of the Kalman kernels: an associative scan and its combiners.

The scan computes all prefixes :math:`e_0 \otimes e_1 \otimes \dots \otimes e_t` of an associative
operator in :math:`O(\log T)` depth (the odd/even recursion of Blelloch / ``jax.lax.associative_scan``).
Every step of the recursion is one batched tensor operation over all time steps, so a T-step
filter costs about ``2 log2(T)`` rounds of small batched matrix ops instead of T Python steps.

An *element* is a tuple of tensors ("leaves"); each leaf carries the time axis just before its
``event_dim`` trailing dims. The Kalman kernels use matrices ``(..., time, D, D)`` and "column
blocks" ``(..., time, D, K)``: K vectors (the batch members that share the same matrices) side by
side, so that applying one matrix to all of them is a single matrix-matrix product. Leaves may have
different batch shapes; combiners broadcast.

Combiners (``earlier`` is applied first in time order of the scan):

* :func:`filter_combine` — the covariance part of the Gaussian filtering elements of Särkkä &
  García-Fernández (2021), ``(A, C, J)``: :math:`p(x_k \mid x_{i-1}) = N(x_k; A x_{i-1} + b, C)` and
  the precision :math:`J` of the information about :math:`x_{i-1}` from the potentials in the block
  (the means follow by an affine scan once the covariances are known).
* :func:`affine_combine` — composition of affine maps :math:`x \mapsto G x + c` (vector leaf) and
  :math:`X \mapsto G X G^\top + E` (matrix leaf), used for the filtered means, the backward (RTS)
  pass and the sampler.
"""
from __future__ import annotations

from typing import Callable, NamedTuple, Sequence

import torch

Element = tuple[torch.Tensor, ...]


def _time_dim(x: torch.Tensor, event_dim: int) -> int:
    return x.dim() - event_dim - 1


def _take(elems: Element, event_dims: Sequence[int], index: slice) -> Element:
    """Slice every leaf along its time axis."""
    out = []
    for x, e in zip(elems, event_dims):
        key = (slice(None),) * _time_dim(x, e) + (index,)
        out.append(x[key])
    return tuple(out)


def _interleave(even: torch.Tensor, odd: torch.Tensor, event_dim: int) -> torch.Tensor:
    """``[even_0, odd_0, even_1, odd_1, ...]`` along time; ``even`` may be one longer."""
    dim = _time_dim(even, event_dim)
    n_odd = odd.shape[dim]
    head = even.narrow(dim, 0, n_odd)
    head, odd = torch.broadcast_tensors(head, odd)
    woven = torch.stack([head, odd], dim + 1).flatten(dim, dim + 1)
    if even.shape[dim] == n_odd:
        return woven
    tail = even.narrow(dim, n_odd, 1).expand(woven.shape[:dim] + (1,) + woven.shape[dim + 1:])
    return torch.cat([woven, tail], dim)


def associative_scan(combine: Callable[[Element, Element], Element], elems: Element,
                     event_dims: Sequence[int]) -> Element:
    r"""Inclusive prefix scan along time: ``out[t] = elems[0] ⊗ elems[1] ⊗ ... ⊗ elems[t]``.

    Args:
        combine: associative ``(earlier, later) -> combined``, batched over the time axis.
        elems: tuple of leaves, leaf ``i`` of shape ``(..., time, *event_i)``.
        event_dims: number of trailing event dims of each leaf (2 for matrices, 1 for vectors).
    Returns:
        tuple of leaves of the same time length (batch dims broadcast by ``combine``).
    """
    T = elems[0].shape[_time_dim(elems[0], event_dims[0])]
    if T < 2:
        return elems
    pairs = combine(_take(elems, event_dims, slice(0, T - 1, 2)), _take(elems, event_dims, slice(1, T, 2)))
    odd = associative_scan(combine, pairs, event_dims)
    n_rest = (T - 1) // 2
    rest = combine(_take(odd, event_dims, slice(0, n_rest)), _take(elems, event_dims, slice(2, T, 2)))
    first = _take(elems, event_dims, slice(0, 1))
    out = []
    for f, r, o, e in zip(first, rest, odd, event_dims):
        f = f.expand(r.shape[:_time_dim(r, e)] + f.shape[_time_dim(f, e):])
        out.append(_interleave(torch.cat([f, r], _time_dim(r, e)), o, e))
    return tuple(out)


def reverse_scan(combine: Callable[[Element, Element], Element], elems: Element,
                 event_dims: Sequence[int]) -> Element:
    """Suffix scan: ``out[t] = elems[T-1] ⊗ ... ⊗ elems[t]`` (the scan run on time-reversed leaves);
    leaves ``(..., time, *event_i)`` as in :func:`associative_scan`, same shapes out."""
    def flip(leaves: Element) -> Element:
        return tuple(x.flip(_time_dim(x, e)) for x, e in zip(leaves, event_dims))
    return flip(associative_scan(combine, flip(elems), event_dims))


def symmetrize(x: torch.Tensor) -> torch.Tensor:
    """``(X + X^T) / 2`` on the last two dims: ``(..., D, D)`` -> ``(..., D, D)``."""
    return 0.5 * (x + x.mT)


def filter_combine(earlier: Element, later: Element) -> Element:
    r"""Combine two covariance parts of Gaussian filtering elements (Särkkä & García-Fernández 2021,
    Lemma 8; the mean parts ``b, eta`` are left to an affine scan, see :mod:`.kalman_info`).

    With :math:`W = (I + C_i J_j)^{-1}` (its spectrum is real and :math:`\ge 1`: never singular),

    .. math::
        A = A_j W A_i,\quad C = A_j W C_i A_j^\top + C_j,\quad J = A_i^\top J_j W A_i + J_i.

    Leaves ``(A, C, J)``: ``(..., time, D, D)``.
    """
    A_i, C_i, J_i = earlier
    A_j, C_j, J_j = later
    eye = torch.eye(A_i.shape[-1], dtype=A_i.dtype, device=A_i.device)
    W = torch.linalg.solve(eye + C_i @ J_j, eye.expand(torch.broadcast_shapes(C_i.shape, J_j.shape)))
    WA = W @ A_i
    A = A_j @ WA
    C = symmetrize(A_j @ W @ C_i @ A_j.mT + C_j)
    J = symmetrize(A_i.mT @ J_j @ WA + J_i)
    return A, C, J


def affine_combine(earlier: Element, later: Element) -> Element:
    r"""Compose affine maps, ``later ∘ earlier``: leaves ``(G, E, c)`` or ``(G, c)``.

    .. math:: (G_b, E_b, c_b) \circ (G_a, E_a, c_a) = (G_b G_a,\ G_b E_a G_b^\top + E_b,\ G_b c_a + c_b)

    ``G, E``: ``(..., time, D, D)``; ``c``: ``(..., time, D, K)`` column block.
    """
    G_a, G_b = earlier[0], later[0]
    G = G_b @ G_a
    c = G_b @ earlier[-1] + later[-1]
    if len(earlier) == 2:
        return G, c
    E = symmetrize(G_b @ earlier[1] @ G_b.mT + later[1])
    return G, E, c


class ColumnLayout(NamedTuple):
    """How a full batch splits into dims where the matrices vary ("matrix dims") and dims where
    they are shared ("column dims", flattened into the trailing K of a column block).

    batch: the full batch shape; mat_batch: the matrices' batch shape (broadcastable to it);
    mat_dims / col_dims: indices into ``batch``; mat_shape: ``batch`` at mat_dims; mat_pad: the
    matrices' batch at mat_dims (1 where they broadcast); col_shape: ``batch`` at col_dims.
    """

    batch: torch.Size
    mat_batch: torch.Size
    mat_dims: tuple
    col_dims: tuple
    mat_shape: torch.Size
    mat_pad: torch.Size
    col_shape: torch.Size


def column_layout(batch: torch.Size, mat_batch: torch.Size) -> ColumnLayout:
    """The :class:`ColumnLayout` of a full ``batch`` whose matrices have batch ``mat_batch``."""
    pad = (1,) * (len(batch) - len(mat_batch)) + tuple(mat_batch)
    cols = tuple(i for i, (b, m) in enumerate(zip(batch, pad)) if m == 1 and b != 1)
    mats = tuple(i for i in range(len(batch)) if i not in cols)
    return ColumnLayout(torch.Size(batch), torch.Size(mat_batch), mats, cols,
                        torch.Size(batch[i] for i in mats), torch.Size(pad[i] for i in mats),
                        torch.Size(batch[i] for i in cols))


def to_columns(lay: ColumnLayout, x: torch.Tensor, event_ndim: int) -> torch.Tensor:
    """``(batch..., *event)`` (broadcastable) -> column block ``(mat_shape..., *event, K)``."""
    event = x.shape[x.dim() - event_ndim:]
    x = x.expand(lay.batch + event)
    n = len(lay.batch)
    x = x.permute(lay.mat_dims + tuple(range(n, n + event_ndim)) + lay.col_dims)
    return x.reshape(lay.mat_shape + event + (lay.col_shape.numel(),)).contiguous()


def from_columns(lay: ColumnLayout, x: torch.Tensor, event_ndim: int) -> torch.Tensor:
    """Column block ``(mat_shape..., *event, K)`` -> ``(batch..., *event)``."""
    event = x.shape[x.dim() - 1 - event_ndim:x.dim() - 1]
    x = x.expand(lay.mat_shape + x.shape[x.dim() - 1 - event_ndim:])
    x = x.reshape(lay.mat_shape + event + lay.col_shape)
    n_mat, n = len(lay.mat_dims), len(lay.batch)
    source = [None] * (n + event_ndim)
    for pos, dim in enumerate(lay.mat_dims):
        source[dim] = pos
    for pos, dim in enumerate(lay.col_dims):
        source[dim] = n_mat + event_ndim + pos
    for k in range(event_ndim):
        source[n + k] = n_mat + k
    return x.permute(source)


def to_matrices(lay: ColumnLayout, m: torch.Tensor, event_ndim: int) -> torch.Tensor:
    """``(mat_batch..., *event)`` -> ``(mat_pad..., *event)``: drop the (size-1) column dims."""
    event = m.shape[m.dim() - event_ndim:]
    pad = (1,) * (len(lay.batch) - len(lay.mat_batch)) + tuple(lay.mat_batch)
    return m.expand(torch.Size(pad) + event).reshape(lay.mat_pad + event)
