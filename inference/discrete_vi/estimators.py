r"""Gradient estimators for :math:`\nabla_\alpha\, \mathbb{E}_{q_\alpha(b)}[f(b)]`, binary :math:`b` (pure functions).

:math:`q_\alpha(b) = \prod_k \mathrm{Bernoulli}(b_k; \sigma(\alpha_k))`, with the logits :math:`\alpha`
``(B, K)`` one row per data point and :math:`f` a per-row objective (e.g. :math:`\log p(x_i, b)`), given as
``f(values (M, B, K)) -> (M, B)`` so several points are scored in one call. Reparameterization: with
:math:`u, v \sim U(0, 1)`, :math:`z = \alpha + \log u - \log(1 - u)`, :math:`b = H(z) = [z > 0]`, and
:math:`\tilde z \sim p(z \mid b)` (``conditional_logistic``). The score is
:math:`\nabla_\alpha \log q(b) = b - \sigma(\alpha)`.

- ``reinforce`` (Williams 1992) with a baseline :math:`c`: :math:`(f(b) - c)\,(b - \sigma(\alpha))`. Unbiased.
- ``gumbel`` (concrete / Gumbel-softmax, Maddison et al. 2017, Jang et al. 2017): :math:`\nabla_\alpha
  f(\sigma(z/\tau))`, the pathwise gradient of the relaxed objective. Low variance, **biased**.
- ``rebar`` (Tucker et al. 2017): :math:`[f(b) - \eta f(\sigma_\lambda(\tilde z))](b - \sigma(\alpha)) +
  \eta \nabla_\alpha f(\sigma_\lambda(z)) - \eta \nabla_\alpha f(\sigma_\lambda(\tilde z))`. Unbiased.
- ``relax`` (Grathwohl et al. 2018): as REBAR with the control variate
  :math:`c_\phi(z) = \eta f(\sigma_\lambda(z)) + r_\psi(z)`, a network :math:`r_\psi`. Unbiased.

:math:`\eta, \lambda, \psi` (``ControlVariate``) are trained to minimize the estimator's variance, i.e. the
single-sample :math:`\mathbb{E}[\hat g^2]` (its mean is fixed), by gradient descent (``variance_loss``).
"""
from __future__ import annotations

import math
from typing import Callable, NamedTuple

import torch
from torch import nn

ESTIMATORS = {
    "reinforce": "REINFORCE (score function) with a running-mean baseline",
    "gumbel": "concrete / Gumbel-softmax relaxation (biased, pathwise)",
    "rebar": "REBAR: REINFORCE with the relaxed objective as control variate (unbiased)",
    "relax": "RELAX: REINFORCE with a learned relaxed control variate (unbiased)",
}

Objective = Callable[[torch.Tensor], torch.Tensor]


class Estimate(NamedTuple):
    """grad: the estimate of the gradient wrt the logits ``(B, K)`` (with its graph wrt the control variate's
    parameters for rebar/relax); f_hard: :math:`f(b)` at the discrete draw ``(B,)``; b: the draw ``(B, K)``."""

    grad: torch.Tensor
    f_hard: torch.Tensor
    b: torch.Tensor


def check_estimator(estimator) -> None:
    """ValueError naming the option and the valid values."""
    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator must be one of {sorted(ESTIMATORS)}, got {estimator!r}")


class ControlVariate(nn.Module):
    r"""REBAR's :math:`(\eta, \lambda)` and, for RELAX, the network :math:`r_\psi: (B, K) \to (B,)`.

    ``eta`` starts at 1, the temperature :math:`\lambda = e^{\text{log\_temperature}}` at ``temperature``; the
    network's last layer starts at zero, so RELAX starts as REBAR.
    """

    def __init__(self, num_bits: int, temperature: float = 0.5, hidden: int = 0):
        super().__init__()
        self.eta = nn.Parameter(torch.ones(()))
        self.log_temperature = nn.Parameter(torch.tensor(math.log(temperature)))
        self.net = None
        if hidden:
            self.net = nn.Sequential(nn.Linear(num_bits, hidden), nn.Tanh(), nn.Linear(hidden, 1))
            nn.init.zeros_(self.net[-1].weight)
            nn.init.zeros_(self.net[-1].bias)

    def relaxed_values(self, z: torch.Tensor) -> torch.Tensor:
        r""":math:`\sigma_\lambda(z) = \sigma(z / \lambda)`: ``(..., K)``."""
        return torch.sigmoid(z / self.log_temperature.exp())

    def extra(self, z: torch.Tensor) -> torch.Tensor:
        r""":math:`r_\psi(z)`: ``(M, B, K) -> (M, B)`` (zero without a network)."""
        if self.net is None:
            return z.new_zeros(z.shape[:-1])
        return self.net(z).squeeze(-1)


def logistic_noise(logits: torch.Tensor, generator: torch.Generator | None = None, eps: float = 1e-6):
    """Two uniforms ``(u, v)`` of the logits' shape, dtype and device, in ``[eps, 1 - eps]``."""
    shape = (2,) + tuple(logits.shape)
    uv = torch.rand(shape, generator=generator, dtype=torch.float64).to(logits)
    uv = uv.clamp(eps, 1 - eps)
    return uv[0], uv[1]


def logistic(logits: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    r""":math:`z = \alpha + \log u - \log(1-u)`, so :math:`[z > 0] \sim \mathrm{Bernoulli}(\sigma(\alpha))`."""
    return logits + torch.log(u) - torch.log1p(-u)


def conditional_logistic(logits: torch.Tensor, b: torch.Tensor, v: torch.Tensor, eps: float = 1e-6):
    r""":math:`\tilde z \sim p(z \mid b)`: :math:`u' = 1 - \theta(1 - v)` if :math:`b = 1`, :math:`v(1 - \theta)` if
    :math:`b = 0` (:math:`\theta = \sigma(\alpha)`), then :math:`\tilde z = \alpha + \log u' - \log(1 - u')`;
    differentiable in :math:`\alpha`. Shapes ``(B, K)``."""
    theta = torch.sigmoid(logits)
    u = torch.where(b > 0.5, 1 - theta * (1 - v), v * (1 - theta)).clamp(eps, 1 - eps)
    return logistic(logits, u)


def score(logits: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    r""":math:`\nabla_\alpha \log q_\alpha(b) = b - \sigma(\alpha)`: ``(B, K)``."""
    return b - torch.sigmoid(logits)


def reinforce(f: Objective, logits: torch.Tensor, baseline: float | torch.Tensor = 0.0,
              generator: torch.Generator | None = None) -> Estimate:
    r""":math:`(f(b) - c)(b - \sigma(\alpha))` with baseline ``c`` (a number or ``(B,)``)."""
    u, _ = logistic_noise(logits, generator)
    b = (logistic(logits, u) > 0).to(logits.dtype)
    fb = f(b.unsqueeze(0))[0]
    return Estimate((fb.detach() - baseline).unsqueeze(-1) * score(logits.detach(), b), fb, b)


def gumbel(f: Objective, logits: torch.Tensor, temperature: float = 0.5,
           generator: torch.Generator | None = None) -> Estimate:
    r""":math:`\nabla_\alpha f(\sigma(z/\tau))` (``logits`` must require grad); ``f_hard`` is :math:`f(b)`."""
    u, _ = logistic_noise(logits, generator)
    z = logistic(logits, u)
    b = (z > 0).to(logits.dtype).detach()
    both = f(torch.stack([b, torch.sigmoid(z / temperature)]))
    grad = torch.autograd.grad(both[1].sum(), logits, retain_graph=True)[0]
    return Estimate(grad, both[0], b)


def controlled(f: Objective, logits: torch.Tensor, cv: ControlVariate,
               generator: torch.Generator | None = None) -> Estimate:
    r"""REBAR (``cv`` without a network) or RELAX (with one): :math:`[f(b) - c(\tilde z)](b - \sigma(\alpha)) +
    \nabla_\alpha c(z) - \nabla_\alpha c(\tilde z)`, :math:`c(z) = \eta f(\sigma_\lambda(z)) + r_\psi(z)`. The
    result keeps its graph wrt ``cv``'s parameters (for ``variance_loss``); ``logits`` must require grad."""
    u, v = logistic_noise(logits, generator)
    z = logistic(logits, u)
    b = (z > 0).to(logits.dtype).detach()
    zt = conditional_logistic(logits, b, v)
    values = f(torch.stack([b, cv.relaxed_values(z), cv.relaxed_values(zt)]))
    c_z = cv.eta * values[1] + cv.extra(z.unsqueeze(0))[0]
    c_zt = cv.eta * values[2] + cv.extra(zt.unsqueeze(0))[0]
    pathwise = torch.autograd.grad((c_z - c_zt).sum(), logits, create_graph=True)[0]
    grad = (values[0].detach() - c_zt).unsqueeze(-1) * score(logits.detach(), b) + pathwise
    return Estimate(grad, values[0], b)


def estimate(estimator: str, f: Objective, logits: torch.Tensor, cv: ControlVariate | None = None,
             baseline: float | torch.Tensor = 0.0, temperature: float = 0.5,
             generator: torch.Generator | None = None) -> Estimate:
    """One draw of ``estimator`` ("reinforce", "gumbel", "rebar", "relax") at ``logits (B, K)`` (requiring grad
    for all but reinforce); rebar/relax need ``cv``."""
    check_estimator(estimator)
    if estimator == "reinforce":
        return reinforce(f, logits, baseline, generator)
    if estimator == "gumbel":
        return gumbel(f, logits, temperature, generator)
    if cv is None:
        raise ValueError(f"estimator '{estimator}' needs a ControlVariate (cv=...)")
    return controlled(f, logits, cv, generator)


def variance_loss(grad: torch.Tensor) -> torch.Tensor:
    r"""Single-sample :math:`\mathbb{E}\|\hat g\|^2` per row, averaged over rows: its gradient wrt the control
    variate's parameters is that of the estimator's variance (the mean does not depend on them)."""
    return (grad ** 2).sum(-1).mean()


def tune_control_variate(f: Objective, logits: torch.Tensor, cv: ControlVariate, steps: int, lr: float = 0.01,
                         draws: int = 16, generator: torch.Generator | None = None) -> list[float]:
    """Fit ``cv`` to minimize the variance of REBAR/RELAX at fixed ``logits (B, K)`` (Adam, ``steps`` steps of
    ``draws`` draws each); returns the variance loss per step."""
    logits = logits.detach().repeat(draws, 1).requires_grad_(True)
    f = _tiled(f, draws)
    opt = torch.optim.Adam(cv.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        loss = variance_loss(controlled(f, logits, cv, generator).grad)
        opt.zero_grad()
        grads = torch.autograd.grad(loss, list(cv.parameters()))
        for p, g in zip(cv.parameters(), grads):
            p.grad = g
        opt.step()
        losses.append(float(loss.detach()))
    return losses


def gradient_samples(estimator: str, f: Objective, logits: torch.Tensor, n: int, cv: ControlVariate | None = None,
                     baseline: float | torch.Tensor = 0.0, temperature: float = 0.5,
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """``n`` independent draws of the estimator at fixed ``logits (B, K)``: ``(n, B, K)`` (the rows are
    independent, so the n draws are one call on the logits repeated n times, ``f`` on rows ``(n * B, K)``)."""
    B, K = logits.shape
    tiled = logits.detach().repeat(n, 1).requires_grad_(True)
    base = baseline.repeat(n) if isinstance(baseline, torch.Tensor) and baseline.dim() else baseline
    return estimate(estimator, _tiled(f, n), tiled, cv, base, temperature, generator).grad.detach().reshape(n, B, K)


def _tiled(f: Objective, n: int) -> Objective:
    """``f`` on rows repeated ``n`` times: ``(M, n * B, K) -> (M, n * B)``."""
    def run(values: torch.Tensor) -> torch.Tensor:
        M, nB, K = values.shape
        return f(values.reshape(M * n, nB // n, K)).reshape(M, nB)
    return run


def bernoulli_entropy(logits: torch.Tensor) -> torch.Tensor:
    r""":math:`H[q_\alpha] = \sum_k \mathrm{softplus}(\alpha_k) - \sigma(\alpha_k)\alpha_k` per row: ``(B, K) -> (B,)``."""
    return (nn.functional.softplus(logits) - torch.sigmoid(logits) * logits).sum(-1)
