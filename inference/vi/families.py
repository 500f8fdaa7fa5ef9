r"""Conjugate prior families of the vi backend: prior parameters, closed-form posterior update from expected
sufficient statistics, expectations under q, KL(q || prior), draws from q, its mean and its mode (the vi
backend's point estimate: the argmax of q's density where it exists, else the mean).

Each global is stored with a leading *state* dim K (the states of the discrete local that indexes it; K = 1
for a global that no local indexes). A family is a record of pure functions on a ``params`` tuple:

- Dirichlet: params (alpha ``(K, C)``,); a child adds (counts ``(K, C)``,).
- Gamma (rate of a Poisson): (shape a, rate b) ``(K, *E)``; adds (sum r y, sum r).
- Beta (probs of a Bernoulli): (a, b) ``(K, *E)``; adds (sum r y, sum r (1 - y)).
- Normal, elementwise: (mean m, variance v) ``(K, *E)``; adds (sum r y / s^2, sum r / s^2).
- Gaussian, full (the mean of a MultivariateNormal): (mean ``(K, D)``, cov ``(K, D, D)``); adds
  (Lambda sum r y ``(K, D)``, (sum r) Lambda ``(K, D, D)``).
- NormalInverseWishart: the fields of ``ppl.expfam.niw.NIWNatural`` with batch (K,); adds the same layout
  (sum r yy', sum r y, sum r, sum r).
- MatrixNormalInverseWishart (the weights and noise (W, S) of a linear-Gaussian regression y = W u + e, e.g. an
  LDS's dynamics (A, Q) or emission (C, R)): the fields of ``ppl.expfam.mniw.MNIWNatural`` (any batch); adds the
  same layout (sum y y', sum y E[u]', sum E[u u'], count). Its values are packed ``[W | S]`` ``(*batch, n, m + n)``.

Updates (r the responsibilities, s the child's known scale, Lambda its known precision):

.. math::
    \alpha' = \alpha + c, \quad (a', b') = (a + \textstyle\sum r y,\ b + \sum r), \quad
    v'^{-1} = v^{-1} + \textstyle\sum r / s^2,\ m' = v' (m / v + \sum r y / s^2), \\
    P' = S_0^{-1} + (\textstyle\sum r)\Lambda,\ m' = P'^{-1}(S_0^{-1} m_0 + \Lambda \sum r y), \quad
    \eta'_{NIW} = \eta + (\textstyle\sum r yy^\top, \sum r y, \sum r, \sum r), \quad
    \eta'_{MNIW} = \eta + (\textstyle\sum yy^\top, \sum y E[u]^\top, \sum E[uu^\top], N).

Stochastic VI (``blend``) steps :math:`\lambda \leftarrow (1 - \rho)\lambda + \rho\hat\lambda` in each family's
natural parameters: on the params themselves where they are an affine image of them (Dirichlet, Gamma, Beta,
NIW, MNIW), through (m / v, 1 / v) for a Normal and (P m, P) for a Gaussian.

The svae backend's conjugate globals (``ppl.inference.svae.conjugate``: a Dirichlet on mixture weights, an NIW on
mixture components, an MNIW on a chain's dynamics) are these families too: their update is
``blend(q, update(prior, stats), rho)`` with the statistics of the recognition-potential posteriors in place of the
data's (Johnson et al. 2016), their KL, draws and mean are the functions here.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch.distributions import Beta, Dirichlet, Gamma, MultivariateNormal, Normal, kl_divergence

from ppl.conjugate_dists import MatrixNormalInverseWishart
from ppl.expfam import mniw, natural_step, niw


@dataclass(frozen=True)
class Family:
    """The conjugate-update functions of one prior family (all pure, on params tuples; see module docstring)."""

    name: str
    update: Callable      # (prior params, stats) -> q params
    kl: Callable          # (q params, prior params) -> () sum over the global's entries
    sample: Callable      # (q params, n) -> (n, K, *value_shape) draws
    mean: Callable        # q params -> (K, *value_shape)
    q_name: str           # how explain() names q
    mode: Callable        # q params -> (K, *value_shape): the mode of q where it exists, else its mean
    blend: Callable       # (q params, target params, rho) -> the natural-gradient step (stochastic VI)

    def __reduce__(self):
        """Pickled by name (its functions include lambdas): unpickles to ``FAMILIES[name]``, so a fitted model that
        holds one (the svae backend's conjugate globals, inside a saved Posterior) can be saved."""
        return family, (self.name,)


def family(name: str) -> Family:
    """``FAMILIES[name]``; a KeyError lists the families."""
    if name not in FAMILIES:
        raise KeyError(f"no conjugate family {name!r}; families: {', '.join(FAMILIES)}")
    return FAMILIES[name]


def _add(prior: tuple, stats: tuple) -> tuple:
    return tuple(p + s for p, s in zip(prior, stats))


def dirichlet_expected_log(params: tuple) -> torch.Tensor:
    r""":math:`E_q[\log \pi] = \psi(\alpha) - \psi(\sum_c \alpha_c)`: ``(K, C)``."""
    (alpha,) = params
    return torch.digamma(alpha) - torch.digamma(alpha.sum(-1, keepdim=True))


def gamma_expectations(params: tuple) -> tuple[torch.Tensor, torch.Tensor]:
    r""":math:`(E[\lambda], E[\log\lambda]) = (a/b, \psi(a) - \log b)`."""
    a, b = params
    return a / b, torch.digamma(a) - b.log()


def beta_expectations(params: tuple) -> tuple[torch.Tensor, torch.Tensor]:
    r""":math:`(E[\log p], E[\log(1-p)]) = (\psi(a) - \psi(a+b), \psi(b) - \psi(a+b))`."""
    a, b = params
    total = torch.digamma(a + b)
    return torch.digamma(a) - total, torch.digamma(b) - total


def _normal_update(prior: tuple, stats: tuple) -> tuple:
    m0, v0 = prior
    weighted_y, precision = stats
    prec = 1.0 / v0 + precision
    return (m0 / v0 + weighted_y) / prec, 1.0 / prec


def _gaussian_update(prior: tuple, stats: tuple) -> tuple:
    m0, S0 = prior
    h_data, J_data = stats
    P0 = torch.linalg.inv(S0)
    P = P0 + J_data
    P = 0.5 * (P + P.mT)
    L = torch.linalg.cholesky(P)
    cov = torch.cholesky_inverse(L)
    mean = torch.cholesky_solve((P0 @ m0.unsqueeze(-1)) + h_data.unsqueeze(-1), L).squeeze(-1)
    return mean, 0.5 * (cov + cov.mT)


def _affine_blend(params: tuple, target: tuple, rho: float) -> tuple:
    r"""The natural-gradient step :math:`(1 - \rho)\,\lambda + \rho\,\hat\lambda` field by field, for params that
    are an affine image of the natural parameters (Dirichlet alpha, Gamma/Beta (a, b), NIW's natural fields):
    the blend commutes with the affine map. ``rho == 1`` returns ``target``'s tensors themselves."""
    return tuple(natural_step(a, b, rho) for a, b in zip(params, target))


def _normal_blend(params: tuple, target: tuple, rho: float) -> tuple:
    r"""The step in the natural parameters (m / v, 1 / v) of elementwise Normals (m, v)."""
    if rho == 1:
        return target
    precision = (1 - rho) / params[1] + rho / target[1]
    shift = (1 - rho) * params[0] / params[1] + rho * target[0] / target[1]
    return shift / precision, 1.0 / precision


def _gaussian_blend(params: tuple, target: tuple, rho: float) -> tuple:
    r"""The step in the natural parameters (P m, P), :math:`P = \Sigma^{-1}`, of full Gaussians (m ``(K, D)``,
    Sigma ``(K, D, D)``)."""
    if rho == 1:
        return target
    P_old, P_new = torch.linalg.inv(params[1]), torch.linalg.inv(target[1])
    P = (1 - rho) * P_old + rho * P_new
    h = (1 - rho) * (P_old @ params[0].unsqueeze(-1)) + rho * (P_new @ target[0].unsqueeze(-1))
    L = torch.linalg.cholesky(0.5 * (P + P.mT))
    cov = torch.cholesky_inverse(L)
    return torch.cholesky_solve(h, L).squeeze(-1), 0.5 * (cov + cov.mT)


def _niw_sample(params: tuple, n: int) -> torch.Tensor:
    """``n`` draws ``(n, K, D, D + 1)`` of q; drawn in float64 (an empty component's q is the prior, whose
    inverse-Wishart with few degrees of freedom gives draws too ill-conditioned for a float32 Cholesky)."""
    draw = niw.sample(niw.NIWNatural(*(p.double() for p in params)), (n,))
    return torch.cat([draw.covariance_matrix, draw.loc.unsqueeze(-1)], -1).to(params[0].dtype)


def _dirichlet_mode(params: tuple) -> torch.Tensor:
    r"""Each row's mode :math:`(\alpha - 1) / (\sum_c \alpha_c - C)` where it exists (every
    :math:`\alpha_c \ge 1`, not all equal to 1; an entry with :math:`\alpha_c = 1` is 0 there), else the row's
    mean :math:`\alpha / \sum_c \alpha_c` (an entry below 1 puts the density's supremum on a face; all ones is
    flat): ``(K, C)``. With a Dirichlet(1) prior the mode is the normalized expected counts (the EM M-step)."""
    (alpha,) = params
    total = alpha.sum(-1, keepdim=True)
    has_mode = (alpha >= 1).all(-1, keepdim=True) & (total > alpha.shape[-1])
    mode = (alpha - 1) / torch.where(has_mode, total - alpha.shape[-1], torch.ones_like(total))
    return torch.where(has_mode, mode, alpha / total)


def _gamma_mode(params: tuple) -> torch.Tensor:
    r""":math:`(a - 1) / b` where :math:`a \ge 1` (0 at :math:`a = 1`), else the mean :math:`a / b`."""
    a, b = params
    return torch.where(a >= 1, (a - 1) / b, a / b)


def _beta_mode(params: tuple) -> torch.Tensor:
    r""":math:`(a - 1) / (a + b - 2)` where :math:`a, b \ge 1`, :math:`a + b > 2`, else the mean
    :math:`a / (a + b)`."""
    a, b = params
    has_mode = (a >= 1) & (b >= 1) & (a + b > 2)
    return torch.where(has_mode, (a - 1) / torch.where(has_mode, a + b - 2, torch.ones_like(a)), a / (a + b))


def _niw_mode(params: tuple) -> torch.Tensor:
    r"""The joint mode of :math:`(\mu, \Sigma)`, ``[\Psi / (\nu + D + 2) | \mu_0]`` ``(K, D, D + 1)``: the
    density :math:`\propto |\Sigma|^{-(\nu + D + 2)/2} \exp(-\tfrac12 \mathrm{tr}(\Psi\Sigma^{-1})
    - \tfrac\kappa2 (\mu - \mu_0)^\top \Sigma^{-1} (\mu - \mu_0))` is largest there (it always exists)."""
    std = niw.standard_from_natural(niw.NIWNatural(*params))
    D = std.loc.shape[-1]
    return torch.cat([std.scale / (std.df + D + 2)[..., None, None], std.loc.unsqueeze(-1)], -1)


def _niw_mean(params: tuple) -> torch.Tensor:
    r"""``[E\Sigma | E\mu] = [\Psi / (\nu - D - 1) | \mu_0]``; where that mean does not exist
    (:math:`\nu \le D + 1`, e.g. an empty component), the inverse-Wishart mode :math:`\Psi / (\nu + D + 1)`."""
    std = niw.standard_from_natural(niw.NIWNatural(*params))
    D = std.loc.shape[-1]
    denom = torch.where(std.df > D + 1, std.df - D - 1, std.df + D + 1)
    return torch.cat([std.scale / denom[..., None, None], std.loc.unsqueeze(-1)], -1)


def mniw_mean(params: tuple) -> torch.Tensor:
    r"""``[E W | E S]`` packed ``(*batch, n, m + n)``: :math:`(M, \Psi / (\nu - n - 1))`; where that mean does not
    exist (:math:`\nu \le n + 1`) the inverse-Wishart mode :math:`\Psi / (\nu + n + 1)`. ``params``: the fields of
    ``mniw.MNIWNatural``."""
    p = mniw.standard_from_natural(mniw.MNIWNatural(*params))
    n = p.scale.shape[-1]
    denom = torch.where(p.df > n + 1, p.df - n - 1, p.df + n + 1)
    return MatrixNormalInverseWishart.pack(p.loc, p.scale / denom[..., None, None])


def mniw_draws(params: tuple, num_samples: int) -> torch.Tensor:
    """``num_samples`` draws of (W, S) from q = MNIW(``params``), packed ``(num_samples, *batch, n, m + n)``."""
    draw = mniw.sample(mniw.MNIWNatural(*params), (num_samples,))
    return MatrixNormalInverseWishart.pack(draw.A, draw.Q)


def _mniw_mode(params: tuple) -> torch.Tensor:
    r"""The joint mode of :math:`(W, S)`, ``[M | \Psi / (\nu + n + m + 1)]`` ``(*batch, n, m + n)``: the density
    :math:`\propto |S|^{-(\nu + n + m + 1)/2} \exp(-\tfrac12 \mathrm{tr}(\Psi S^{-1})
    - \tfrac12 \mathrm{tr}(K (W - M)^\top S^{-1} (W - M)))` is largest at W = M and then at that S (the divisor is
    the natural parameter ``count``)."""
    p = mniw.standard_from_natural(mniw.MNIWNatural(*params))
    n, m = p.loc.shape[-2:]
    return MatrixNormalInverseWishart.pack(p.loc, p.scale / (p.df + n + m + 1)[..., None, None])


FAMILIES = {
    "Dirichlet": Family(
        "Dirichlet", _add, lambda q, p: kl_divergence(Dirichlet(q[0]), Dirichlet(p[0])).sum(),
        lambda q, n: Dirichlet(q[0]).sample((n,)), lambda q: q[0] / q[0].sum(-1, keepdim=True), "Dirichlet",
        _dirichlet_mode, _affine_blend),
    "Gamma": Family(
        "Gamma", _add, lambda q, p: kl_divergence(Gamma(*q), Gamma(*p)).sum(),
        lambda q, n: Gamma(*q).sample((n,)), lambda q: q[0] / q[1], "Gamma", _gamma_mode, _affine_blend),
    "Beta": Family(
        "Beta", _add, lambda q, p: kl_divergence(Beta(*q), Beta(*p)).sum(),
        lambda q, n: Beta(*q).sample((n,)), lambda q: q[0] / (q[0] + q[1]), "Beta", _beta_mode, _affine_blend),
    "Normal": Family(
        "Normal", _normal_update,
        lambda q, p: kl_divergence(Normal(q[0], q[1].sqrt()), Normal(p[0], p[1].sqrt())).sum(),
        lambda q, n: Normal(q[0], q[1].sqrt()).sample((n,)), lambda q: q[0], "Normal", lambda q: q[0],
        _normal_blend),
    "Gaussian": Family(
        "Gaussian", _gaussian_update,
        lambda q, p: kl_divergence(MultivariateNormal(q[0], q[1]), MultivariateNormal(p[0], p[1])).sum(),
        lambda q, n: MultivariateNormal(q[0], q[1]).sample((n,)), lambda q: q[0], "MultivariateNormal",
        lambda q: q[0], _gaussian_blend),
    "NormalInverseWishart": Family(
        "NormalInverseWishart", lambda p, s: tuple(niw.conjugate_update(niw.NIWNatural(*p), niw.NIWNatural(*s))),
        lambda q, p: niw.kl(niw.NIWNatural(*q), niw.NIWNatural(*p)).sum(), _niw_sample, _niw_mean,
        "NormalInverseWishart", _niw_mode, _affine_blend),
    "MatrixNormalInverseWishart": Family(
        "MatrixNormalInverseWishart",
        lambda p, s: tuple(mniw.conjugate_update(mniw.MNIWNatural(*p), mniw.MNIWNatural(*s))),
        lambda q, p: mniw.kl(mniw.MNIWNatural(*q), mniw.MNIWNatural(*p)).sum(), mniw_draws, mniw_mean,
        "MatrixNormalInverseWishart", _mniw_mode, _affine_blend),
}
