r"""Conjugate globals of the SVAE, fitted by natural-gradient steps (Johnson et al. 2016, Hoffman et al. 2013).

A global with a conjugate exponential-family prior :math:`p(\theta) \propto \exp\langle\eta_0, t(\theta)\rangle`
whose children are local latents of an SVAE mixture gets a variational factor
:math:`q(\theta) \propto \exp\langle\eta, t(\theta)\rangle` of the same family instead of a point estimate.
Given the local posteriors q(z) q(x), the coordinate optimum is :math:`\eta^* = \eta_0 + \sum_n E_q[t_n]`
(the expected sufficient statistics the locals contribute), and the step
:math:`\eta \leftarrow (1-\rho)\eta + \rho\,\eta^*` is a natural-gradient step of size :math:`\rho` on the ELBO.
The ELBO then counts :math:`-\mathrm{KL}(q(\theta)\|p(\theta))` (``global_kl``) and the local terms use
:math:`E_q[\log p(\cdot \mid \theta)]`.

- ``DirichletConjugate``: :math:`\pi \sim \mathrm{Dir}` over the weights of a mixture assignment z;
  :math:`E[t] = q(z)` counts; the local step uses :math:`E_q[\log\pi]`.
- ``NIWConjugate``: :math:`(\mu_k, \Sigma_k) \sim NIW` (``ppl.NormalInverseWishart``, batch ``(K,)``) over
  the components of a mixture node :math:`x_n \mid z_n = k \sim N(\mu_k, \Sigma_k)`; the statistics are
  :math:`\sum_n r_{nk}(E[x_nx_n^\top], E[x_n], 1, 1)` under q(x_n), q(z_n = k) = r_nk. The local step needs
  :math:`E_q[\log N(x \mid \mu_k, \Sigma_k)]`, which is linear in :math:`E[\Sigma_k^{-1}], E[\Sigma_k^{-1}\mu_k],
  E[\mu_k^\top\Sigma_k^{-1}\mu_k], E[\log|\Sigma_k^{-1}|]`:

  .. math:: E_q\log N(x \mid \mu_k, \Sigma_k) = \log N(x \mid \bar\mu_k, \bar\Lambda_k^{-1}) + c_k, \quad
            \bar\Lambda_k = E[\Sigma_k^{-1}] = \nu\Psi^{-1},\ \bar\mu_k = \bar\Lambda_k^{-1}E[\Sigma_k^{-1}\mu_k] = \mu_0,

            c_k = \tfrac12\big(E\log|\Sigma_k^{-1}| - \log|\bar\Lambda_k|\big)
                  - \tfrac12\big(E[\mu_k^\top\Sigma_k^{-1}\mu_k] - \bar\mu_k^\top\bar\Lambda_k\bar\mu_k\big)
                = \tfrac12\big(\psi_D(\nu/2) + D\log 2 - D\log\nu\big) - \tfrac{D}{2\kappa}.

  So mean-field local inference with q(mu, Sigma) is the point-estimate mixture step at
  :math:`(\bar\mu_k, \bar\Lambda_k)` with :math:`c_k` added to the component's log weight (exact, since
  :math:`c_k` does not depend on x); the local KL is then exactly
  :math:`E_q[\log q(z)q(x)] - E_q[\log p(z \mid \pi)] - E_q[\log p(x \mid z, \mu, \Sigma)]`.
- ``MNIWConjugate``: :math:`(A, Q) \sim MNIW` (``ppl.MatrixNormalInverseWishart``) on the dynamics and noise
  of an LDS-SVAE chain :math:`x_t \mid x_{t-1} \sim N(Ax_{t-1}, Q)`; the statistics are
  :math:`\sum_{n,t\ge1}(E[x_tx_t^\top], E[x_tx_{t-1}^\top], E[x_{t-1}x_{t-1}^\top], 1)` under q(x) (the lag-one
  moments come from the banded solver, exact). :math:`E_q\log N(x_t \mid Ax_{t-1}, Q)` is the same quadratic
  form with blocks :math:`E[Q^{-1}], E[Q^{-1}A], E[A^\top Q^{-1}A]` and constant :math:`-\tfrac12 E\log|Q|`,
  which the local step uses directly (``lds_local(expected=...)``).
"""
from __future__ import annotations

import math

import torch

from ppl.conjugate_dists import MatrixNormalInverseWishart, NormalInverseWishart
from ppl.expfam import dirichlet, mniw, natural_step, niw
from ppl.expfam.gaussian import GaussianStats
from ..vi import gaussian_chain as chain_vi
from .facts import Kind
from .local import gaussian_posterior


def natural_gradient_sites(facts) -> dict[str, str]:
    """Conjugate globals the svae backend fits by natural gradients: site -> the child it is conjugate to.
    A Dirichlet whose single Categorical child is the assignment of an SVAE mixture (child: the assignment);
    a NormalInverseWishart whose single Gaussian child is an SVAE mixture node (child: that node)."""
    mixtures = {t.discrete: t.site for t in facts.targets.values() if t.kind == Kind.MIXTURE}
    out = {w: kids[0] for w, kids in facts.conjugate.items() if len(kids) == 1 and kids[0] in mixtures}
    nodes = set(mixtures.values())
    out.update({s: kids[0] for s, kids in facts.conjugate_gaussian.items() if len(kids) == 1 and kids[0] in nodes})
    chains = {t.site for t in facts.targets.values() if t.kind == Kind.LDS}
    out.update({s: kids[0] for s, kids in facts.conjugate_dynamics.items()
                if len(kids) == 1 and kids[0] in chains})
    return out


def describe(site: str, facts) -> str:
    """The plan.explain() reason of a natural-gradient site."""
    if site in facts.conjugate_dynamics:
        child = facts.conjugate_dynamics[site][0]
        return (f"conjugate matrix-normal-inverse-Wishart of the dynamics and noise of {child}: q(A, Q) = MNIW, "
                f"natural-gradient steps on the expected transition statistics sum_t (E[x_t x_t^T], "
                f"E[x_t x_t-1^T], E[x_t-1 x_t-1^T], 1); local inference uses E_q[log N(x_t | A x_t-1, Q)]")
    if site in facts.conjugate_gaussian:
        child = facts.conjugate_gaussian[site][0]
        return (f"conjugate normal-inverse-Wishart of the mixture components of {child}: q = NIW per component, "
                f"natural-gradient steps on its expected statistics sum_n q(z_n=k) (E[x x^T], E[x], 1, 1); "
                f"local inference uses E_q[log N({child} | mu_k, Sigma_k)]")
    return (f"conjugate Dirichlet of {facts.conjugate[site][0]}: q = Dir, natural-gradient steps on its "
            "expected counts")


class DirichletConjugate:
    r"""q(pi) = Dir for a Dirichlet global conjugate to a mixture assignment z (``child``).

    Natural parameter :math:`\eta = \alpha - 1`, shape ``(K,)``; started at the prior plus ``num_nodes / K``
    counts per component; each step :math:`\eta \leftarrow (1-\rho)\eta + \rho(\eta_0 + \sum_n q(z_n))`.
    """

    def __init__(self, site: str, child: str, target: str, prior_concentration: torch.Tensor, num_nodes: int):
        self.site, self.child, self.target = site, child, target
        self.prior = dirichlet.natural_from_standard(prior_concentration.detach())
        K = prior_concentration.shape[-1]
        self.natparam = self.prior + num_nodes / K

    def expected_log(self) -> torch.Tensor:
        """:math:`E_q[\\log\\pi]`: ``(K,)``."""
        return dirichlet.expected_stats(self.natparam)

    def mean(self) -> torch.Tensor:
        """:math:`E_q[\pi]`: ``(K,)``."""
        alpha = self.natparam + 1
        return alpha / alpha.sum(-1, keepdim=True)

    point = mean

    def kl(self) -> torch.Tensor:
        """:math:`\mathrm{KL}(q(\pi) \| p(\pi))`: a scalar."""
        return dirichlet.kl(self.natparam, self.prior)

    def sample(self, n: int) -> torch.Tensor:
        """``n`` draws of the weights from q: ``(n, K)``."""
        return torch.distributions.Dirichlet(self.natparam + 1).sample((n,))

    def update(self, counts: torch.Tensor, step: float) -> None:
        """``counts: (K,)`` = sum_n q(z_n)."""
        self.natparam = natural_step(self.natparam, self.prior + counts.detach(), step)

    def update_from(self, handler, step: float) -> None:
        """Update from a finished ``SVAEObjective`` run: the expected counts of the assignment's q(z)."""
        probs = handler.locals[self.target].probs
        self.update(probs.reshape(-1, probs.shape[-1]).sum(0), step)


# Backward-compatible name (the class lived in backend.py as ``Conjugate``).
Conjugate = DirichletConjugate


class NIWConjugate:
    r"""q(mu_k, Sigma_k) = NIW for a ``ppl.NormalInverseWishart`` global of batch ``(K,)`` over the components of
    the SVAE mixture node ``target`` (x_n | z_n = k ~ N(mu_k, Sigma_k); component k of the NIW batch must be
    the mean and covariance of state k, as in ``loc[z]``).

    Args:
        site: the NIW site; target: the mixture node x; prior: ``NIWNatural`` of batch ``(K,)``.
        init_loc ``(K, D)``, init_cov ``(K, D, D)``: q starts at the prior plus ``num_nodes / K`` pseudo-points
            per component with mean init_loc and covariance init_cov.
    The natural parameters are kept in float64 (the field ``sum_xxT - sum_x sum_x^T / count`` cancels);
    what the local step reads is cast to ``dtype``.
    """

    def __init__(self, site: str, target: str, prior: niw.NIWNatural, init_loc: torch.Tensor, init_cov: torch.Tensor,
                 num_nodes: int, dtype: torch.dtype):
        self.site, self.target, self.child, self.dtype = site, target, target, dtype
        prior = niw.NIWNatural(*(f.detach().to(torch.float64) for f in prior))
        if prior.sum_x.dim() != 2:
            raise ValueError(f"site '{site}': the NormalInverseWishart of mixture node '{target}' needs batch shape "
                             f"(K,) (one per component, e.g. inside a plate of size K), got natural parameters of "
                             f"shape {tuple(prior.sum_x.shape)}")
        K, D = prior.sum_x.shape
        loc, cov = init_loc.detach().to(torch.float64), init_cov.detach().to(torch.float64)
        if loc.shape != (K, D) or cov.shape != (K, D, D):
            raise ValueError(f"site '{site}': initial value must unpack to loc ({K}, {D}) and cov ({K}, {D}, {D}), "
                             f"got {tuple(loc.shape)} and {tuple(cov.shape)}")
        self.prior = prior
        n = torch.full((K,), num_nodes / K, dtype=torch.float64, device=loc.device)
        pseudo = niw.NIWNatural(n[:, None, None] * (cov + loc[:, :, None] * loc[:, None, :]), n[:, None] * loc, n, n)
        self.natparam = niw.conjugate_update(prior, pseudo)

    def expectations(self) -> niw.NIWExpectations:
        """Expected statistics of q = NIW per component (``niw.NIWExpectations``, batch ``(K,)``)."""
        return niw.expectations(self.natparam)

    def plug_in(self) -> tuple[torch.Tensor, torch.Tensor]:
        r""":math:`(\bar\mu_k, \bar\Lambda_k^{-1}) = (\mu_0, \Psi/\nu)`: ``(K, D)``, ``(K, D, D)`` in ``dtype``."""
        params = niw.standard_from_natural(self.natparam)
        return params.loc.to(self.dtype), (params.scale / params.df[:, None, None]).to(self.dtype)

    def point(self) -> torch.Tensor:
        """The site's value the local step runs at: ``[Psi/nu | mu_0]`` packed ``(K, D, D + 1)``."""
        loc, cov = self.plug_in()
        return NormalInverseWishart.pack(loc, cov)

    def log_offsets(self) -> torch.Tensor:
        r""":math:`c_k` (module docstring), added to component k's log weight: ``(K,)`` in ``dtype``."""
        return expected_log_density_offset(self.natparam).to(self.dtype)

    def kl(self) -> torch.Tensor:
        """:math:`\sum_k \mathrm{KL}(q(\mu_k, \Sigma_k) \| p(\mu_k, \Sigma_k))`: a scalar in ``dtype``."""
        return niw.kl(self.natparam, self.prior).sum().to(self.dtype)

    def sample(self, n: int) -> torch.Tensor:
        """``n`` draws from q, packed ``(n, K, D, D + 1)`` as the site's value."""
        draw = niw.sample(self.natparam, (n,))
        return NormalInverseWishart.pack(draw.loc, draw.covariance_matrix).to(self.dtype)

    def update(self, probs: torch.Tensor, mean: torch.Tensor, cov: torch.Tensor, step: float) -> None:
        r"""Natural-gradient step from ``probs (N, K)`` = q(z_n = k), q(x_n) = N(``mean (N, D)``, ``cov (N, D, D)``):
        :math:`\eta \leftarrow (1-\rho)\eta + \rho(\eta_0 + \sum_n r_{nk}(E[x_nx_n^\top], E[x_n], 1, 1))`."""
        f64 = dict(dtype=torch.float64)
        stats = GaussianStats(-0.5 * (cov + mean[:, :, None] * mean[:, None, :]).detach().to(**f64),
                              mean.detach().to(**f64))
        K = probs.shape[-1]
        expanded = GaussianStats(stats.neg_half_xxT.expand((K,) + stats.neg_half_xxT.shape),
                                 stats.x.expand((K,) + stats.x.shape))
        data = niw.expected_data_stats(expanded, probs.detach().to(**f64).mT)
        target = niw.conjugate_update(self.prior, data)
        self.natparam = natural_step(self.natparam, target, step)

    def update_from(self, handler, step: float) -> None:
        r"""Update from a finished ``SVAEObjective`` run: q(z) from the mixture's local posterior and q(x) its
        optimum given that q(z) (one more Gaussian coordinate step:
        :math:`\Lambda = \sum_k r_k\bar\Lambda_k + J`, :math:`\Lambda m = \sum_k r_k\bar\Lambda_k\bar\mu_k + h`)."""
        probs = handler.locals[self.target].probs.detach()
        J, h = (p.detach() for p in handler.potentials[self.target])
        K, D = probs.shape[-1], h.shape[-1]
        probs, J, h = probs.reshape(-1, K), J.reshape(-1, D, D), h.reshape(-1, D)
        e = self.expectations()
        prec, prec_mean = e.prec.to(h.dtype), e.prec_mean.to(h.dtype)
        post_prec = (probs @ prec.reshape(K, D * D)).reshape(-1, D, D) + J
        mean, cov, _ = gaussian_posterior(post_prec, probs @ prec_mean + h)
        self.update(probs, mean, cov, step)


class MNIWConjugate:
    r"""q(A, Q) = MNIW for a ``ppl.MatrixNormalInverseWishart`` global whose value ``[A | Q]`` is the dynamics
    and noise covariance of the LDS-SVAE chain ``target`` (square: n = m = D; unbatched).

    Args:
        site: the MNIW site; target: the gaussian_chain; prior: ``MNIWNatural`` with fields ``(D, D)``.
        init_A ``(D, D)``, init_Q ``(D, D)``: q starts at the prior plus ``num_transitions`` pseudo-transitions
            with :math:`\sum x_{t-1}x_{t-1}^\top = c I` (c = ``num_transitions``, unit-scale latents),
            :math:`\sum x_tx_{t-1}^\top = A_0 cI`, :math:`\sum x_tx_t^\top = A_0 cI A_0^\top + cQ_0`, so
            :math:`E[A] \approx A_0`, :math:`E[Q^{-1}]^{-1} \approx Q_0`.
    Natural parameters are kept in float64; what the local step reads is cast to ``dtype``.
    """

    def __init__(self, site: str, target: str, prior: mniw.MNIWNatural, init_A: torch.Tensor, init_Q: torch.Tensor,
                 num_transitions: int, dtype: torch.dtype):
        self.site, self.target, self.child, self.dtype = site, target, target, dtype
        prior = mniw.MNIWNatural(*(f.detach().to(torch.float64) for f in prior))
        n, m = prior.sum_yxT.shape[-2:]
        if prior.count.dim() != 0 or n != m:
            raise ValueError(f"site '{site}': the MatrixNormalInverseWishart on the dynamics of gaussian_chain "
                             f"'{target}' must be unbatched with square (D, D) dynamics, got loc of shape "
                             f"{tuple(prior.sum_yxT.shape)}")
        A, Q = init_A.detach().to(torch.float64), init_Q.detach().to(torch.float64)
        if A.shape != (n, n) or Q.shape != (n, n):
            raise ValueError(f"site '{site}': initial value must unpack to A ({n}, {n}) and Q ({n}, {n}), "
                             f"got {tuple(A.shape)} and {tuple(Q.shape)}")
        self.prior = prior
        c = float(max(num_transitions, 1))
        S = c * torch.eye(n, dtype=torch.float64, device=A.device)
        pseudo = mniw.MNIWNatural(A @ S @ A.mT + c * Q, A @ S, S, torch.tensor(c, dtype=torch.float64,
                                                                                device=A.device))
        self.natparam = mniw.conjugate_update(prior, pseudo)

    def expectations(self) -> mniw.MNIWExpectations:
        """:math:`E[Q^{-1}], E[Q^{-1}A], E[A^\top Q^{-1}A], E\log|Q|` in ``dtype`` (what ``lds_local`` reads)."""
        return mniw.MNIWExpectations(*(f.to(self.dtype) for f in mniw.expectations(self.natparam)))

    def plug_in(self) -> tuple[torch.Tensor, torch.Tensor]:
        r""":math:`(E[Q^{-1}]^{-1}E[Q^{-1}A], E[Q^{-1}]^{-1}) = (M, \Psi/\nu)`: ``(D, D)`` twice, in ``dtype``."""
        params = mniw.standard_from_natural(self.natparam)
        return params.loc.to(self.dtype), (params.scale / params.df).to(self.dtype)

    def point(self) -> torch.Tensor:
        """The site's value the model runs at: ``[M | Psi/nu]`` packed ``(D, 2 D)``."""
        return MatrixNormalInverseWishart.pack(*self.plug_in())

    def kl(self) -> torch.Tensor:
        """:math:`\mathrm{KL}(q(A, Q) \| p(A, Q))`: a scalar in ``dtype``."""
        return mniw.kl(self.natparam, self.prior).sum().to(self.dtype)

    def sample(self, n: int) -> torch.Tensor:
        """``n`` draws from q, packed ``(n, D, 2 D)`` as the site's value."""
        draw = mniw.sample(self.natparam, (n,))
        return MatrixNormalInverseWishart.pack(draw.A, draw.Q).to(self.dtype)

    def update(self, stats: mniw.MNIWNatural, step: float) -> None:
        r""":math:`\eta \leftarrow (1-\rho)\eta + \rho(\eta_0 + s)` with transition statistics ``stats``
        (``MNIWNatural`` layout, fields ``(D, D)`` and a scalar count)."""
        stats = mniw.MNIWNatural(*(torch.as_tensor(f).detach().to(torch.float64) for f in stats))
        target = mniw.conjugate_update(self.prior, stats)
        self.natparam = natural_step(self.natparam, target, step)

    def update_from(self, handler, step: float) -> None:
        """Update from a finished ``SVAEObjective`` run: q(x) of the chain with its lag-one moments."""
        self.update(transition_stats(handler.locals[self.target]), step)


def transition_stats(local) -> mniw.MNIWNatural:
    r"""Expected transition statistics of a chain's q(x) (a ``Local`` with ``moments``; ``mean (..., T, D)``),
    summed over the batch, in float64: :math:`\sum (E[x_tx_t^\top]_{t\ge1}, E[x_tx_{t-1}^\top],
    E[x_{t-1}x_{t-1}^\top]_{t\le T-2}, T - 1)`, with :math:`E[x_tx_s^\top] = \Sigma_{ts} + m_tm_s^\top`: the vi
    backend's statistics (``ppl.inference.vi.gaussian_chain.transition_stats``) of the same q(x)."""
    if local.moments is None:
        raise ValueError("transition_stats: the chain's local posterior was solved without moments")
    mean = local.mean.detach().to(torch.float64)
    cov, cross = (m.detach().to(torch.float64) for m in local.moments)
    return chain_vi.transition_stats(chain_vi.ChainLocal(mean, cov, cross, mean.new_zeros(())))


def expected_log_density_offset(natparam: niw.NIWNatural) -> torch.Tensor:
    r""":math:`c = E_q\log N(x|\mu,\Sigma) - \log N(x|\bar\mu, \bar\Lambda^{-1})` under q = NIW(``natparam``),
    the same for every x: ``(*batch)``.
    :math:`c = \tfrac12(-E\log|\Sigma| - \log|E\Sigma^{-1}|) - \tfrac12(E[\mu^\top\Sigma^{-1}\mu]
    - \bar\mu^\top E[\Sigma^{-1}]\bar\mu)` with :math:`\bar\mu = E[\Sigma^{-1}]^{-1}E[\Sigma^{-1}\mu]`."""
    e = niw.expectations(natparam)
    mu_bar = torch.linalg.solve(e.prec, e.prec_mean.unsqueeze(-1)).squeeze(-1)
    return 0.5 * (-e.logdet_cov - torch.linalg.slogdet(e.prec)[1]) - 0.5 * (e.quad - (mu_bar * e.prec_mean).sum(-1))


def expected_log_density(natparam: niw.NIWNatural, mean: torch.Tensor, cov: torch.Tensor) -> torch.Tensor:
    r""":math:`E_{q(x)q(\mu,\Sigma)}[\log N(x \mid \mu, \Sigma)]` for q(x) = N(``mean (..., D)``, ``cov (..., D, D)``)
    and q = NIW(``natparam``) of batch ``(K,)``: ``(..., K)``. Equal to
    :math:`-\tfrac D2\log 2\pi - \tfrac12 E\log|\Sigma| - \tfrac12\mathrm{tr}(E[\Sigma^{-1}]E[xx^\top])
    + E[x]^\top E[\Sigma^{-1}\mu] - \tfrac12 E[\mu^\top\Sigma^{-1}\mu]`."""
    e = niw.expectations(natparam)
    D = mean.shape[-1]
    second = (cov + mean[..., :, None] * mean[..., None, :]).unsqueeze(-3)      # (..., 1, D, D)
    return (-0.5 * D * math.log(2 * math.pi) - 0.5 * e.logdet_cov - 0.5 * (e.prec * second).sum((-1, -2))
            + (mean.unsqueeze(-2) * e.prec_mean).sum(-1) - 0.5 * e.quad)


def _checked_prior(site: str, fn, cls):
    """The natural parameters of the prior ``fn`` of ``site``, which must be a ``cls`` (``ppl.NormalInverseWishart``
    or ``ppl.MatrixNormalInverseWishart``) with valid parameters; a ValueError naming the site otherwise."""
    if not isinstance(fn, cls):
        raise ValueError(f"site '{site}': expected a ppl.{cls.__name__}, got {type(fn).__name__}")
    fn.check_site(site)
    return fn.natural()


def _mniw_global(site: str, child: str, node: dict, facts, init: dict) -> MNIWConjugate:
    """q(A, Q) of the MNIW ``site`` on the dynamics of the chain ``child``, started at ``init[site]`` (packed
    ``[A | Q]``) or the prior's (M, Psi/nu), with one pseudo-transition per transition of the chain."""
    fn = node["fn"]
    prior = _checked_prior(site, fn, MatrixNormalInverseWishart)
    if site in init:
        A, Q = MatrixNormalInverseWishart.unpack(torch.as_tensor(init[site]).to(prior.sum_xxT.device),
                                                 fn.loc.shape[-1])
    else:
        A, Q = fn.loc, fn.scale / fn.df[..., None, None]
    shape = tuple(facts.targets[child].node_shape)
    transitions = int(torch.Size(shape[:-1]).numel()) * (shape[-1] - 1)
    return MNIWConjugate(site, child, prior, A, Q, transitions, node["value"].dtype)


def _dirichlet_global(site: str, child: str, node: dict, facts, init: dict) -> DirichletConjugate:
    """q(pi) of the Dirichlet ``site`` over the mixture assignment ``child``."""
    target = next(t for t in facts.targets.values() if t.discrete == child)
    nodes = int(torch.Size(target.node_shape).numel())
    return DirichletConjugate(site, child, target.site, node["fn"].concentration, nodes)


def _niw_global(site: str, child: str, node: dict, facts, init: dict) -> NIWConjugate:
    """q(mu_k, Sigma_k) of the NIW ``site`` over the components of the mixture node ``child``, started at
    ``init[site]`` (packed ``(K, D, D + 1)``) or the traced prior draw of the means and Psi/nu."""
    target = facts.targets[child]
    prior = _checked_prior(site, node["fn"], NormalInverseWishart)
    if site in init:
        loc, cov = NormalInverseWishart.unpack(torch.as_tensor(init[site]).to(prior.sum_x.device))
    else:
        params = niw.standard_from_natural(prior)
        loc = NormalInverseWishart.unpack(node["value"])[0]
        cov = params.scale / params.df[..., None, None]
    nodes = int(torch.Size(target.node_shape).numel())
    return NIWConjugate(site, child, prior, loc, cov, nodes, node["value"].dtype)


def build(trace, facts, init: dict | None = None) -> dict:
    """The conjugate globals of a model: site -> ``DirichletConjugate`` / ``NIWConjugate`` / ``MNIWConjugate``,
    from the model's ``trace`` (prior parameters, shapes) and ``init`` (site -> initial value; an NIW site's
    value is packed ``(K, D, D + 1)``, an MNIW site's ``(D, 2 D)``; without one q starts at the traced prior
    draw of the means and the covariances :math:`E_p[\\Sigma^{-1}]^{-1} = \\Psi/\\nu`)."""
    init = init or {}
    out = {}
    for site, child in natural_gradient_sites(facts).items():
        if site in facts.conjugate_dynamics:
            make = _mniw_global
        elif site in facts.conjugate:
            make = _dirichlet_global
        else:
            make = _niw_global
        out[site] = make(site, child, trace.nodes[site], facts, init)
    return out
