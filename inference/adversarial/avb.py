r"""An implicit posterior q (a simulator, no density) fitted by the density-ratio trick: adversarial variational
Bayes (prior-contrastive form, Mescheder, Nowozin & Geiger 2017).

The ELBO needs :math:`\log q(z)`, which an implicit q does not have:

.. math::
    \mathcal{L} = \mathbb{E}_{q}[\log p(x \mid z) + \log p(z) - \log q(z)]
              = \mathbb{E}_{q}[\log p(x \mid z) - T^*(z)], \qquad T^*(z) = \log q(z) - \log p(z),

and :math:`T^*` is the optimal logit of a discriminator telling q's draws (label 1) from the prior's (label 0).
With a posterior much narrower than the prior, few prior draws land where q lives and :math:`T` is poor there;
the *adaptive contrast* of the same paper replaces the prior by :math:`r(z)`, a Gaussian with q's current
moments (known density, close to q):

.. math::
    \mathcal{L} = \mathbb{E}_{q}[\log p(x, z) - \log r(z) - T^*(z)], \qquad T^*(z) = \log q(z) - \log r(z).

Each step: ``draws`` draws of q (the user's guide, ``rsample`` kept), ``4 * draws`` draws of r, one
discriminator update (logistic loss), one update of the guide's (and the model's) parameters on
:math:`-\mathcal{L}`. The discriminator sees every latent site, flattened and concatenated.
"""
from __future__ import annotations

import math
from typing import Callable

import pyro
import pyro.poutine as poutine
import torch
import torch.nn.functional as F

from ..training import History, progress_bar


def latent_vector(trace: poutine.Trace, sites: tuple[str, ...]) -> torch.Tensor:
    """The values of ``sites`` in ``trace``, flattened and concatenated: ``(D,)``."""
    return torch.cat([trace.nodes[s]["value"].reshape(-1) for s in sites])


def guide_draw(guide: Callable, args, kwargs, sites: tuple[str, ...]) -> tuple[poutine.Trace, list]:
    """One run of the guide (its draws keep their graph) and the unconstrained parameters it touched; a clear
    error if it does not sample every latent site of the model."""
    with poutine.trace(param_only=True) as ptr:
        tr = poutine.trace(guide).get_trace(*args, **kwargs)
    missing = [s for s in sites if s not in tr.nodes]
    if missing:
        raise ValueError(f"backend 'adversarial': the guide must sample every latent site of the model; it does not "
                         f"sample {missing}")
    return tr, [s["value"].unconstrained() for s in ptr.trace.nodes.values()]


def log_joint(model: Callable, args, kwargs, values: dict) -> tuple[torch.Tensor, list]:
    r""":math:`\log p(x, z)` with the latents set to ``values``, and the model's unconstrained parameters."""
    with poutine.trace(param_only=True) as ptr:
        tr = poutine.trace(poutine.condition(model, data=values)).get_trace(*args, **kwargs)
    return tr.log_prob_sum(), [s["value"].unconstrained() for s in ptr.trace.nodes.values()]


def contrast(zq: torch.Tensor, jitter: float = 1e-6) -> torch.distributions.Normal:
    r"""The adaptive contrast :math:`r(z) = N(\bar z_q, \mathrm{diag}\, s_q^2)`: q's draws' moments, detached."""
    zq = zq.detach()
    return torch.distributions.Normal(zq.mean(0), zq.std(0).clamp(min=jitter) if zq.shape[0] > 1 else
                                      torch.ones_like(zq[0]))


def fit(model: Callable, guide: Callable, args, kwargs, sites: tuple[str, ...], discriminator: torch.nn.Module, num_steps: int, lr: float, draws: int, progress: bool) -> tuple[History, list]:
    """Train the guide (and the model's parameters) on the adversarial ELBO; returns (negative ELBO per step,
    discriminator loss per step)."""
    opt_d = torch.optim.Adam(discriminator.parameters(), lr=lr)
    opt_g, history, d_losses = None, History(), []
    bar = progress_bar("adversarial (implicit q)", num_steps, progress)
    try:
        with pyro.validation_enabled(False):
            for _ in range(num_steps):
                runs = [guide_draw(guide, args, kwargs, sites) for _ in range(draws)]
                zq = torch.stack([latent_vector(tr, sites) for tr, _ in runs])
                r = contrast(zq)
                zr = r.sample((4 * draws,))
                loss_d = F.softplus(-discriminator(zq.detach())).mean() + F.softplus(discriminator(zr)).mean()
                opt_d.zero_grad()
                loss_d.backward()
                opt_d.step()
                terms = [log_joint(model, args, kwargs, {s: tr.nodes[s]["value"] for s in sites}) for tr, _ in runs]
                elbo = torch.stack([t for t, _ in terms]) - r.log_prob(zq).sum(-1) - discriminator(zq)
                loss = -elbo.mean()
                params = {id(p): p for _, ps in runs for p in ps}
                params.update({id(p): p for _, ps in terms for p in ps})
                if opt_g is None:
                    opt_g = torch.optim.Adam(list(params.values()), lr=lr)
                opt_g.zero_grad()
                loss.backward()
                opt_g.step()
                if not math.isfinite(float(loss.detach())):
                    raise FloatingPointError(f"adversarial (implicit q): the objective became {float(loss)} at step "
                                             f"{len(history) + 1}; lower lr=")
                history.append(float(loss.detach()))
                d_losses.append(float(loss_d.detach()))
                bar.update()
    except KeyboardInterrupt:
        if not history:
            raise
        history.interrupted = True
    finally:
        bar.close()
    return history, d_losses


def posterior_draws(guide: Callable, args, kwargs, sites: tuple[str, ...], n: int) -> dict[str, torch.Tensor]:
    """``n`` draws of q: site -> ``(1, n, *value_shape)``."""
    with torch.no_grad(), pyro.validation_enabled(False):
        runs = [poutine.trace(guide).get_trace(*args, **kwargs) for _ in range(n)]
    return {s: torch.stack([tr.nodes[s]["value"] for tr in runs]).unsqueeze(0) for s in sites}
