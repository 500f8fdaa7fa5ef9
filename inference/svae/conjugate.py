r"""Conjugate globals of the SVAE: the vi backend's conjugate updates with recognition potentials in place of
conjugate likelihood potentials (Johnson et al. 2016; natural-gradient steps as in Hoffman et al. 2013).

A global with a conjugate exponential-family prior :math:`p(\theta) \propto \exp\langle\eta_0, t(\theta)\rangle`
whose children are local latents of an SVAE target gets a variational factor
:math:`q(\theta) \propto \exp\langle\eta, t(\theta)\rangle` of the same family instead of a point estimate. The
family is the vi backend's (``ppl.inference.vi.families``: ``Dirichlet``, ``NormalInverseWishart``,
``MatrixNormalInverseWishart``), and so is everything done with q (``ConjugateGlobal``): given the local
posteriors q(z) q(x), the coordinate optimum is the family's closed-form update from the expected sufficient
statistics the locals contribute, :math:`\eta^* = \eta_0 + \sum_n E_q[t_n]` (``family.update``), the step
:math:`\eta \leftarrow (1-\rho)\eta + \rho\,\eta^*` is its natural-gradient step of size :math:`\rho`
(``family.blend``), and KL(q || p) (``global_kl`` of the ELBO), the draws and the mean are the family's. Where the
vi backend's local step reads a conjugate likelihood potential of observed data, the SVAE's reads the recognition
network's potential; that, and how the local step reads :math:`E_q` (below), is all that is SVAE-specific here:

- ``DirichletConjugate``: :math:`\pi \sim \mathrm{Dir}` over the weights of a mixture assignment z;
  statistics :math:`\sum_n q(z_n)`; the local step uses :math:`E_q[\log\pi]`.
- ``NIWConjugate``: :math:`(\mu_k, \Sigma_k) \sim NIW` (``ppl.NormalInverseWishart``, batch ``(K,)``) over
  the components of a mixture node :math:`x_n \mid z_n = k \sim N(\mu_k, \Sigma_k)`; the statistics are
  :math:`\sum_n r_{nk}(E[x_nx_n^\top], E[x_n], 1, 1)` under q(x_n), q(z_n = k) = r_nk: the vi backend's statistics
  of an observed Gaussian child (``links.stats``) with :math:`E[x_nx_n^\top]` in place of :math:`y_ny_n^\top`
  (``mixture_statistics``). The local step needs :math:`E_q[\log N(x \mid \mu_k, \Sigma_k)]`, which is linear in
  :math:`E[\Sigma_k^{-1}], E[\Sigma_k^{-1}\mu_k], E[\mu_k^\top\Sigma_k^{-1}\mu_k], E[\log|\Sigma_k^{-1}|]`:

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
  of an LDS-SVAE chain :math:`x_t \mid x_{t-1} \sim N(Ax_{t-1}, Q)`; the statistics are the vi backend's
  (``gaussian_chain.transition_stats``) :math:`\sum_{n,t\ge1}(E[x_tx_t^\top], E[x_tx_{t-1}^\top],
  E[x_{t-1}x_{t-1}^\top], 1)` under q(x) (the lag-one moments come from the banded solver, exact).
  :math:`E_q\log N(x_t \mid Ax_{t-1}, Q)` is the same quadratic form with blocks
  :math:`E[Q^{-1}], E[Q^{-1}A], E[A^\top Q^{-1}A]` and constant :math:`-\tfrac12 E\log|Q|`, which the local step
  uses directly (``lds_local(expected=...)``), as the vi backend's VB-LDS does.
"""
from __future__ import annotations

from abc import ABC, abstractmethod

import torch

from ppl.conjugate_dists import MatrixNormalInverseWishart, NormalInverseWishart
from ppl.expfam import mniw, niw
from ..vi import gaussian_chain as chain_vi
from ..vi import links
from ..vi.families import FAMILIES, Family, dirichlet_expected_log
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


UPDATE = "natural-gradient steps toward the vi backend's closed-form update"


def describe(site: str, facts) -> str:
    """The plan.explain() reason of a natural-gradient site."""
    if site in facts.conjugate_dynamics:
        child = facts.conjugate_dynamics[site][0]
        return (f"conjugate matrix-normal-inverse-Wishart of the dynamics and noise of {child}: q(A, Q) = MNIW, "
                f"{UPDATE} from the expected transition statistics sum_t (E[x_t x_t^T], E[x_t x_t-1^T], "
                f"E[x_t-1 x_t-1^T], 1) of q({child}); local inference uses E_q[log N(x_t | A x_t-1, Q)]")
    if site in facts.conjugate_gaussian:
        child = facts.conjugate_gaussian[site][0]
        return (f"conjugate normal-inverse-Wishart of the mixture components of {child}: q = NIW per component, "
                f"{UPDATE} from the expected statistics sum_n q(z_n=k) (E[x x^T], E[x], 1, 1) of q({child}); "
                f"local inference uses E_q[log N({child} | mu_k, Sigma_k)]")
    return f"conjugate Dirichlet of {facts.conjugate[site][0]}: q = Dir, {UPDATE} from the expected counts"


class ConjugateGlobal(ABC):
    r"""q of one conjugate global ``site`` of the SVAE, in the layout of the vi backend's ``family``
    (``families.FAMILIES``): ``prior`` and ``q`` are that family's params tuples (their natural parameters in
    ``ppl.expfam`` form: ``natparam``). ``child``: the site it is conjugate to; ``target``: the SVAE target whose
    local posterior gives its statistics (``statistics``); ``dtype``: what the local step and the ELBO read (q may
    be kept in float64). The update, KL and draws are the family's."""

    natural: type   # the ppl.expfam named tuple of the natural parameters (= the params; Dirichlet: natparam below)

    def __init__(self, site: str, child: str, target: str, family: Family, prior: tuple, q: tuple,
                 dtype: torch.dtype):
        self.site, self.child, self.target, self.family, self.dtype = site, child, target, family, dtype
        self.prior, self.q = tuple(prior), tuple(q)

    @property
    def natparam(self):
        """q's natural parameters in ``ppl.expfam`` form (``niw.NIWNatural``, ``mniw.MNIWNatural``, ...)."""
        return self.natural(*self.q)

    @natparam.setter
    def natparam(self, value) -> None:
        self.q = tuple(value)

    @abstractmethod
    def statistics(self, handler) -> tuple:
        """The expected sufficient statistics (the family's layout) of a finished ``SVAEObjective`` run's local
        posteriors."""

    def update(self, stats: tuple, step: float) -> None:
        r"""The vi backend's natural-gradient step toward the coordinate optimum,
        :math:`\lambda \leftarrow (1-\rho)\lambda + \rho\,(\lambda_0 + s)` = ``family.blend(q, family.update(prior,
        stats), step)``, for statistics ``stats`` in the family's layout (detached, cast to q's dtype and device).
        ``step == 1`` puts q at the coordinate optimum."""
        like = self.q[0]
        stats = tuple(torch.as_tensor(s).detach().to(dtype=like.dtype, device=like.device) for s in stats)
        self.q = tuple(self.family.blend(self.q, self.family.update(self.prior, stats), step))

    def update_from(self, handler, step: float) -> None:
        """``update`` with the statistics of a finished ``SVAEObjective`` run (``statistics``)."""
        self.update(self.statistics(handler), step)

    def kl(self) -> torch.Tensor:
        r""":math:`\mathrm{KL}(q \| p)` summed over the global's entries (``family.kl``): a scalar in ``dtype``."""
        return self.family.kl(self.q, self.prior).to(self.dtype)

    def sample(self, n: int) -> torch.Tensor:
        """``n`` draws from q (``family.sample``), shaped and packed as the site's value: ``(n, *value_shape)``."""
        return self.family.sample(self.q, n).to(self.dtype)


class DirichletConjugate(ConjugateGlobal):
    r"""q(pi) = Dir(alpha) for a Dirichlet global conjugate to a mixture assignment z (``child``) of the target
    ``target``: the vi family ``Dirichlet``, params ``(alpha (K,),)``; started at the prior plus ``num_nodes / K``
    counts per component. Natural parameter :math:`\eta = \alpha - 1`."""

    def __init__(self, site: str, child: str, target: str, prior_concentration: torch.Tensor, num_nodes: int):
        family = FAMILIES["Dirichlet"]
        prior = (prior_concentration.detach(),)
        K = prior[0].shape[-1]
        super().__init__(site, child, target, family, prior,
                         family.update(prior, (torch.full_like(prior[0], num_nodes / K),)), prior[0].dtype)

    @property
    def natparam(self) -> torch.Tensor:
        r""":math:`\alpha - 1`: ``(K,)``."""
        return self.q[0] - 1

    @natparam.setter
    def natparam(self, value: torch.Tensor) -> None:
        self.q = (value + 1,)

    def expected_log(self) -> torch.Tensor:
        r""":math:`E_q[\log\pi]`: ``(K,)``."""
        return dirichlet_expected_log(self.q)

    def mean(self) -> torch.Tensor:
        r""":math:`E_q[\pi]`: ``(K,)``."""
        return self.family.mean(self.q)

    point = mean

    def statistics(self, handler) -> tuple:
        """``(sum_n q(z_n),)``: the expected counts of the assignment's q(z), ``(K,)``."""
        probs = handler.locals[self.target].probs
        return (probs.reshape(-1, probs.shape[-1]).sum(0),)


def expected_child(site: str, mean: torch.Tensor, cov: torch.Tensor) -> links.Child:
    r"""q(x) = N(``mean (N, D)``, ``cov (N, D, D)``) as the vi backend sees an observed Gaussian child of an NIW
    global ``site``: a ``links.Child`` of kind "niw" whose data are :math:`E[x_n]` and whose outer products are
    :math:`E[x_nx_n^\top] = \mathrm{cov}_n + \mathrm{mean}_n\mathrm{mean}_n^\top`, every weight 1."""
    second = cov + mean[:, :, None] * mean[:, None, :]
    return links.Child(site, "niw", site, mean, mean.new_ones(mean.shape[:1]), None, 1,
                       second.reshape(mean.shape[0], -1))


def mixture_statistics(probs: torch.Tensor, mean: torch.Tensor, cov: torch.Tensor) -> tuple:
    r"""The NIW statistics of q(z_n = k) = ``probs (N, K)`` and q(x_n) = N(``mean (N, D)``, ``cov (N, D, D)``):
    :math:`\sum_n r_{nk}(E[x_nx_n^\top], E[x_n], 1, 1)`, fields ``(K, D, D)``, ``(K, D)``, ``(K,)``, ``(K,)``:
    the vi backend's statistics of an observed Gaussian child (``links.stats``) of ``expected_child``, summed in
    float64 (the precision q = NIW is kept in: its field ``sum_xxT - sum_x sum_x^T / count`` cancels)."""
    f64 = dict(dtype=torch.float64)
    probs, mean, cov = (t.detach().to(**f64) for t in (probs, mean, cov))
    return links.stats(expected_child("x", mean, cov), probs.mT, ())


def expected_log_density(natparam: niw.NIWNatural, mean: torch.Tensor, cov: torch.Tensor) -> torch.Tensor:
    r""":math:`E_{q(x)q(\mu,\Sigma)}[\log N(x \mid \mu, \Sigma)]` for q(x) = N(``mean (..., D)``, ``cov (..., D, D)``)
    and q = NIW(``natparam``) of batch ``(K,)``: ``(..., K)``. Equal to
    :math:`-\tfrac D2\log 2\pi - \tfrac12 E\log|\Sigma| - \tfrac12\mathrm{tr}(E[\Sigma^{-1}]E[xx^\top])
    + E[x]^\top E[\Sigma^{-1}\mu] - \tfrac12 E[\mu^\top\Sigma^{-1}\mu]`: the vi backend's expected log-likelihood
    table (``links.table``) of ``expected_child``."""
    D = mean.shape[-1]
    batch = mean.shape[:-1]
    child = expected_child("x", mean.reshape(-1, D), cov.expand(batch + (D, D)).reshape(-1, D, D))
    table = links.table(child, tuple(natparam))                                 # (K, N)
    return table.mT.reshape(batch + table.shape[:1])


class NIWConjugate(ConjugateGlobal):
    r"""q(mu_k, Sigma_k) = NIW for a ``ppl.NormalInverseWishart`` global of batch ``(K,)`` over the components of
    the SVAE mixture node ``target`` (x_n | z_n = k ~ N(mu_k, Sigma_k); component k of the NIW batch must be
    the mean and covariance of state k, as in ``loc[z]``): the vi family ``NormalInverseWishart``, params the
    fields of ``niw.NIWNatural``.

    Args:
        site: the NIW site; target: the mixture node x; prior: ``NIWNatural`` of batch ``(K,)``.
        init_loc ``(K, D)``, init_cov ``(K, D, D)``: q starts at the prior plus ``num_nodes / K`` pseudo-points
            per component with mean init_loc and covariance init_cov.
    The natural parameters are kept in float64 (the field ``sum_xxT - sum_x sum_x^T / count`` cancels);
    what the local step reads is cast to ``dtype``.
    """

    natural = niw.NIWNatural

    def __init__(self, site: str, target: str, prior: niw.NIWNatural, init_loc: torch.Tensor, init_cov: torch.Tensor,
                 num_nodes: int, dtype: torch.dtype):
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
        n = torch.full((K,), num_nodes / K, dtype=torch.float64, device=loc.device)
        pseudo = (n[:, None, None] * (cov + loc[:, :, None] * loc[:, None, :]), n[:, None] * loc, n, n)
        family = FAMILIES["NormalInverseWishart"]
        super().__init__(site, target, target, family, prior, family.update(prior, pseudo), dtype)

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

    def statistics(self, handler) -> tuple:
        r"""``mixture_statistics`` of a finished ``SVAEObjective`` run: q(z) from the mixture's local posterior and
        q(x) its optimum given that q(z) (one more Gaussian coordinate step:
        :math:`\Lambda = \sum_k r_k\bar\Lambda_k + J`, :math:`\Lambda m = \sum_k r_k\bar\Lambda_k\bar\mu_k + h`, with
        the recognition potential (J, h) where the vi backend has the data's likelihood)."""
        probs = handler.locals[self.target].probs.detach()
        J, h = (p.detach() for p in handler.potentials[self.target])
        K, D = probs.shape[-1], h.shape[-1]
        probs, J, h = probs.reshape(-1, K), J.reshape(-1, D, D), h.reshape(-1, D)
        e = self.expectations()
        prec, prec_mean = e.prec.to(h.dtype), e.prec_mean.to(h.dtype)
        post_prec = (probs @ prec.reshape(K, D * D)).reshape(-1, D, D) + J
        mean, cov, _ = gaussian_posterior(post_prec, probs @ prec_mean + h)
        return mixture_statistics(probs, mean, cov)


class MNIWConjugate(ConjugateGlobal):
    r"""q(A, Q) = MNIW for a ``ppl.MatrixNormalInverseWishart`` global whose value ``[A | Q]`` is the dynamics
    and noise covariance of the LDS-SVAE chain ``target`` (square: n = m = D; unbatched): the vi family
    ``MatrixNormalInverseWishart``, params the fields of ``mniw.MNIWNatural``.

    Args:
        site: the MNIW site; target: the gaussian_chain; prior: ``MNIWNatural`` with fields ``(D, D)``.
        init_A ``(D, D)``, init_Q ``(D, D)``: q starts at the prior plus ``num_transitions`` pseudo-transitions
            with :math:`\sum x_{t-1}x_{t-1}^\top = c I` (c = ``num_transitions``, unit-scale latents),
            :math:`\sum x_tx_{t-1}^\top = A_0 cI`, :math:`\sum x_tx_t^\top = A_0 cI A_0^\top + cQ_0`, so
            :math:`E[A] \approx A_0`, :math:`E[Q^{-1}]^{-1} \approx Q_0`.
    Natural parameters are kept in float64; what the local step reads is cast to ``dtype``.
    """

    natural = mniw.MNIWNatural

    def __init__(self, site: str, target: str, prior: mniw.MNIWNatural, init_A: torch.Tensor, init_Q: torch.Tensor,
                 num_transitions: int, dtype: torch.dtype):
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
        c = float(max(num_transitions, 1))
        S = c * torch.eye(n, dtype=torch.float64, device=A.device)
        pseudo = (A @ S @ A.mT + c * Q, A @ S, S, torch.tensor(c, dtype=torch.float64, device=A.device))
        family = FAMILIES["MatrixNormalInverseWishart"]
        super().__init__(site, target, target, family, prior, family.update(prior, pseudo), dtype)

    def expectations(self) -> mniw.MNIWExpectations:
        r""":math:`E[Q^{-1}], E[Q^{-1}A], E[A^\top Q^{-1}A], E\log|Q|` in ``dtype`` (what ``lds_local`` reads)."""
        return mniw.MNIWExpectations(*(f.to(self.dtype) for f in mniw.expectations(self.natparam)))

    def plug_in(self) -> tuple[torch.Tensor, torch.Tensor]:
        r""":math:`(E[Q^{-1}]^{-1}E[Q^{-1}A], E[Q^{-1}]^{-1}) = (M, \Psi/\nu)`: ``(D, D)`` twice, in ``dtype``."""
        params = mniw.standard_from_natural(self.natparam)
        return params.loc.to(self.dtype), (params.scale / params.df).to(self.dtype)

    def point(self) -> torch.Tensor:
        """The site's value the model runs at: ``[M | Psi/nu]`` packed ``(D, 2 D)``."""
        return MatrixNormalInverseWishart.pack(*self.plug_in())

    def statistics(self, handler) -> tuple:
        """The expected transition statistics of the chain's q(x) with its lag-one moments (``transition_stats``)."""
        return tuple(transition_stats(handler.locals[self.target]))


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
