r"""Log-semiring primitives whose gradients stay finite at structural zeros (``-inf`` log potentials).

A transition matrix with exact zeros (a left-right chain, a state that cannot be re-entered) gives
entries of a forward message or of a product of step matrices that are exactly ``-inf``: every term of
their ``logsumexp`` is ``-inf``. ``torch.logsumexp`` returns ``-inf`` there, but its backward computes
``exp(x - result) = exp(-inf + inf) = NaN``, and one NaN poisons every gradient (and, in the tree
product and the autograd posteriors, every marginal). Here:

.. math:: \operatorname{logsumexp}(x) = \log \textstyle\sum_i e^{x_i - m} + m, \qquad
          \frac{\partial}{\partial x_i} = \frac{e^{x_i - m}}{\sum_j e^{x_j - m}}

with ``m`` the detached maximum (clamped to the dtype's lowest finite value), and the ``log`` of an
exact 0 passing gradient 0: a ``-inf`` entry has zero weight downstream, so nothing flows into it.
"""
from __future__ import annotations

import torch
from torch import Tensor


def detached_max(x: Tensor, dim) -> Tensor:
    """Max over ``dim`` (an int or a tuple; keepdim), detached (the result does not depend on the shift),
    with -inf clamped to the dtype's lowest finite value so that ``-inf - shift`` is never NaN."""
    return torch.amax(x.detach(), dim=dim, keepdim=True).clamp_(min=torch.finfo(x.dtype).min)


class SafeLog(torch.autograd.Function):
    """``log(x)`` for ``x >= 0`` (log 0 = -inf) with the finite gradient ``g / max(x, tiny)`` where
    ``x > 0`` and 0 where ``x == 0``.

    At x = 0 the entry is -inf, so it has zero weight downstream; the plain ``log`` backward would give
    ``0 * inf = NaN`` there (and ``g / tiny`` alone overflows to inf in float32 once ``|g| > 4``).
    Differentiable twice (its backward is made of differentiable ops).
    """

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x.log()

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return torch.where(x > 0, grad / x.clamp(min=torch.finfo(x.dtype).tiny), torch.zeros_like(grad))


def logsumexp(x: Tensor, dim, keepdim: bool = False) -> Tensor:
    """``torch.logsumexp(x, dim)`` (``dim`` an int or a tuple) with a gradient of 0, not NaN, into the
    terms of an all-``-inf`` sum (module docstring). Same shape as ``torch.logsumexp``."""
    shift = detached_max(x, dim)
    out = SafeLog.apply(torch.exp(x - shift).sum(dim, keepdim=True)) + shift
    return out if keepdim else out.squeeze(dim)
