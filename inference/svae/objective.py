r"""The SVAE objective as an effect handler over the user's model.

One run of the model under ``SVAEObjective`` computes the three terms of

.. math:: \mathcal{L} = \underbrace{\mathbb{E}_{q}[\log p(y \mid x)]}_{\text{recon}}
          - \underbrace{\mathrm{KL}(q(z, x) \,\|\, p(z, x \mid \theta))}_{\text{local KL}}
          + \underbrace{\log p(\theta)}_{\text{global term}}

At a target site (a latent Gaussian node or chain with neural children) the handler combines
the site's prior — read off its distribution, with its discrete parent enumerated — with the
recognition potentials, runs local inference (``local.py``, ``slds.py``), and substitutes a
reparameterized sample from q(x), so the decoder runs once on it. Gradients reach the
recognition network, the decoder and the globals through the message passing.
"""
from __future__ import annotations

import torch
from pyro.distributions import Independent, MultivariateNormal, Normal
from pyro.distributions.util import scale_and_mask
from pyro.poutine.messenger import Messenger

from ..exact import tables as kernels
from .facts import Kind
from .local import Local, diagonal_mixture_local, gaussian_local, lds_local, mixture_local
from .slds import slds_local


def gaussian_params(site: str, fn) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean ``(*batch, D)``, precision ``(*batch, D, D)``) of a Gaussian site's distribution."""
    if isinstance(fn, MultivariateNormal):
        batch = fn.batch_shape
        D = fn.event_shape[0]
        return fn.loc.expand(batch + (D,)), fn.precision_matrix.expand(batch + (D, D))
    if isinstance(fn, Independent) and fn.reinterpreted_batch_ndims == 1 and isinstance(fn.base_dist, Normal):
        base = fn.base_dist
        loc, scale = torch.broadcast_tensors(base.loc, base.scale)
        return loc.expand(fn.batch_shape + loc.shape[-1:]), torch.diag_embed(scale.expand(loc.shape) ** -2).expand(
            fn.batch_shape + loc.shape[-1:] * 2)
    raise ValueError(f"site '{site}': the SVAE needs a Gaussian prior (MultivariateNormal or Normal(...).to_event(1)), "
                     f"got {type(fn).__name__}")


def diagonal_gaussian_params(fn) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(mean ``(*batch, D)``, precision diagonal ``(*batch, D)``) of a ``Normal(loc, scale).to_event(1)``; None for
    any other distribution (a full covariance)."""
    if isinstance(fn, Independent) and fn.reinterpreted_batch_ndims == 1 and isinstance(fn.base_dist, Normal):
        loc, scale = torch.broadcast_tensors(fn.base_dist.loc, fn.base_dist.scale)
        shape = fn.batch_shape + loc.shape[-1:]
        return loc.expand(shape), (scale ** -2).expand(shape)
    return None


def _per_state_matrix(site: str, what: str, m: torch.Tensor, K: int, D: int) -> torch.Tensor:
    if m.numel() != K * D * D:
        raise ValueError(f"site '{site}': switched {what} must be one (D, D) matrix per state; got shape {tuple(m.shape)}")
    return m.reshape(K, D, D)


class SVAEObjective(Messenger):
    r"""Computes ``recon``, ``local_kl`` and ``global_term`` of one model run; ``locals`` keeps q per target.

    Args:
        targets: site -> ``SVAETarget`` (from the compiler's facts).
        potentials: site -> ``(J (*node_shape, D, D), h (*node_shape, D))``.
        global_sites: names of the conditioned global latents (their log-density is the global term).
        num_iters: mean-field iterations (mixture, switching LDS).
        expected_log_weights: discrete site -> E_q[log pi] ``(K,)`` replacing its prior log-probabilities
            (a Dirichlet global handled by natural gradients; its own site is then in ``skip_sites``).
        component_log_offsets: mixture site -> ``(K,)`` added to its log weights: the constant
            :math:`c_k` of :math:`E_q\log N(x|\mu_k,\Sigma_k)` under a conjugate q = NIW (``conjugate.py``).
        expected_dynamics: lds site -> ``(conjugate site, (A, Q) it was conditioned on, MNIWExpectations)``:
            local inference uses :math:`E_{q(A,Q)}\log p(x \mid A, Q)` and keeps the lag-one moments
            (a conjugate q = MNIW, ``conjugate.py``); the chain's dynamics/noise_cov must be that (A, Q).
        fixed_responsibilities: mixture site -> normalized log q(z) ``(*node_shape, K)`` to hold q(z) at (the
            backend's warm-up on data-driven labels, ``warmup.py``); only q(x) is solved there.
    """

    def __init__(self, targets: dict, potentials: dict, global_sites: set[str], num_iters: int = 3,
                 generator: torch.Generator | None = None, expected_log_weights: dict | None = None,
                 skip_sites: set[str] = frozenset(), component_log_offsets: dict | None = None,
                 expected_dynamics: dict | None = None, fixed_responsibilities: dict | None = None):
        super().__init__()
        self.fixed_responsibilities = fixed_responsibilities or {}
        self.expected_dynamics = expected_dynamics or {}
        self.targets, self.potentials, self.global_sites = targets, potentials, global_sites
        self.expected_log_weights = expected_log_weights or {}
        self.skip_sites = skip_sites
        self.component_log_offsets = component_log_offsets or {}
        self.num_iters, self.generator = num_iters, generator
        self.parent_of = {t.discrete: t.site for t in targets.values() if t.discrete}
        self.discrete_fns: dict = {}
        self.locals: dict[str, Local] = {}
        self.recon = self.local_kl = self.global_term = 0.0

    def _pyro_sample(self, msg):
        name = msg["name"]
        if name in self.parent_of and not msg["is_observed"]:
            fn = msg["fn"]
            K = fn.num_states if hasattr(fn, "num_states") else fn.enumerate_support(expand=False).shape[0]
            shape = fn.batch_shape + fn.event_shape
            device = fn.log_init.device if hasattr(fn, "log_init") else fn.logits.device
            value = torch.arange(K, device=device).reshape((K,) + (1,) * len(shape))
            self.discrete_fns[name] = fn
            msg.update(value=value, done=True, stop=True)
        elif name in self.targets and not msg["is_observed"]:
            local = self._solve(self.targets[name], msg["fn"])
            self.locals[name] = local
            self.local_kl = self.local_kl + local.kl
            msg.update(value=local.x, done=True, stop=True)

    def _pyro_post_sample(self, msg):
        if not msg["is_observed"] or msg["name"] in self.skip_sites:
            return
        lp = scale_and_mask(msg["fn"].log_prob(msg["value"]), msg["scale"], msg["mask"]).sum()
        if msg["name"] in self.global_sites:
            self.global_term = self.global_term + lp
        else:
            self.recon = self.recon + lp

    def _solve(self, target, fn) -> Local:
        J, h = self.potentials[target.site]
        if target.kind == Kind.LDS:
            if target.site in self.expected_dynamics:
                site, (A, Q), expected = self.expected_dynamics[target.site]
                if not (fn.dynamics.shape == A.shape and fn.noise_cov.shape == Q.shape
                        and torch.equal(fn.dynamics, A) and torch.equal(fn.noise_cov, Q)):
                    raise ValueError(f"site '{target.site}': its dynamics and noise_cov must be the unpacked value of "
                                     f"the conjugate site '{site}' (A, Q = ppl.MatrixNormalInverseWishart.unpack("
                                     f"value)), unchanged, for natural-gradient updates of q(A, Q)")
                prior = kernels.lds_prior(fn)
                if prior.time_varying or prior.offsets is not None:
                    raise ValueError(f"site '{target.site}': a conjugate MatrixNormalInverseWishart '{site}' on the "
                                     "dynamics needs a time-homogeneous gaussian_chain without inputs")
                return lds_local(prior, J, h, self.generator, expected=expected, moments=True)
            return lds_local(kernels.lds_prior(fn), J, h, self.generator)
        if target.kind == Kind.GAUSSIAN:
            mu, prec = gaussian_params(target.site, fn)
            return gaussian_local(mu, prec, J, h, self.generator)
        z_fn = self.discrete_fns[target.discrete]
        if target.kind == Kind.MIXTURE:
            fixed = self.fixed_responsibilities.get(target.site)
            diagonal = diagonal_gaussian_params(fn)
            mu, prec = diagonal if diagonal is not None else gaussian_params(target.site, fn)
            K = mu.shape[0]
            log_w = self.expected_log_weights.get(target.discrete, z_fn.logits).expand(target.node_shape + (K,))
            if target.site in self.component_log_offsets:  # q(mu, Sigma) = NIW: E_q log N = plug-in + c_k
                log_w = log_w + self.component_log_offsets[target.site]
            if diagonal is not None:   # recognition potentials are diagonal (recognition.potentials)
                return diagonal_mixture_local(log_w, mu, prec, J.diagonal(dim1=-2, dim2=-1), h, self.num_iters,
                                              self.generator, fixed)
            mu = mu.expand((K,) + target.node_shape + mu.shape[-1:])
            prec = prec.expand((K,) + target.node_shape + prec.shape[-2:])
            return mixture_local(log_w, mu, prec, J, h, self.num_iters, self.generator, fixed)
        K, D = z_fn.num_states, target.dim
        if z_fn.time_varying:
            raise ValueError(f"site '{target.discrete}': the SVAE's switching LDS needs a homogeneous transition matrix")
        A = _per_state_matrix(target.site, "dynamics", fn.dynamics, K, D)
        Q = _per_state_matrix(target.site, "noise_cov", fn.noise_cov, K, D)
        return slds_local(z_fn.log_init, z_fn.log_trans, A, Q, fn.initial_loc, fn.initial_cov, J, h,
                          self.num_iters, self.generator)
