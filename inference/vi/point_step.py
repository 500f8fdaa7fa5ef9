r"""The point-estimate step the vi backend takes for non-conjugate globals inside its coordinate ascent.

With q fixed, the sites :math:`\theta` (a dict site -> value) move to a higher value of an objective
:math:`f(\theta)` (the expected log joint plus :math:`\log p(\theta)`): L-BFGS (``training.lbfgs_block``:
torch.optim.LBFGS's iterations and strong-Wolfe line search) in each site's unconstrained coordinates
:math:`u = T^{-1}(\theta)`, :math:`T` = ``biject_to(support)``. The new values are kept only if :math:`f` rose, so a
sweep that ends with this step never lowers the objective. Used by ``factor_analysis`` (noise sites) and
``point_globals`` (scales of a mixture or HMM).
"""
from __future__ import annotations

import math

import torch
from torch.distributions import biject_to

from .. import training


def lbfgs_ascent(theta: dict, supports: dict, objective, old: float, iters: int) -> tuple[dict, float] | None:
    r"""``(new theta, f(new theta))`` after at most ``iters * 5 // 4`` evaluations of L-BFGS on ``-objective`` in
    unconstrained coordinates, from ``theta`` (site -> tensor of any shape, in ``supports[site]``); None when
    :math:`f` did not rise above ``old`` (the value at ``theta``), became non-finite, or a trial point raised a
    linear-algebra error (RuntimeError / ValueError: e.g. a failed Cholesky at a wild point).
    ``objective(theta, grad) -> scalar tensor``: :math:`f` at ``theta`` (differentiable in it when ``grad``)."""
    transforms = {s: biject_to(supports[s]) for s in theta}
    free = {s: transforms[s].inv(v).detach().clone().requires_grad_(True) for s, v in theta.items()}
    params = list(free.values())

    def evaluate() -> tuple[float, torch.Tensor]:
        """(-f, its flat gradient ``(n,)``) at the current ``free`` values; 1e30 (gradient 0) where not finite."""
        with torch.enable_grad():
            loss = -objective({s: transforms[s](u) for s, u in free.items()}, True)
            grads = torch.autograd.grad(loss, params, allow_unused=True) if torch.isfinite(loss) else None
        if grads is None:
            return 1e30, torch.cat([u.new_zeros(u.numel()) for u in params])
        return float(loss.detach()), torch.cat([u.new_zeros(u.numel()) if g is None else g.reshape(-1)
                                                for u, g in zip(params, grads)])

    try:
        memory = training.LbfgsState(*evaluate())
        budget = iters * 5 // 4
        while budget > 0:
            used = training.lbfgs_block(memory, params, evaluate, budget)
            if used == 0:
                break
            budget -= used
        new_theta = {s: transforms[s](u).detach() for s, u in free.items()}
        new = float(objective(new_theta, False))
    except (RuntimeError, ValueError):
        return None
    if not new > old or not math.isfinite(new):
        return None
    return new_theta, new
