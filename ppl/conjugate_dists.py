r"""Conjugate-prior distributions for the DSL that have no Pyro counterpart.

``NormalInverseWishart(loc, kappa, scale, df)``: the joint prior on the mean and covariance
:math:`(\mu, \Sigma)` of a Gaussian on :math:`\mathbb{R}^D`,

.. math:: \Sigma \sim IW(\Psi, \nu), \qquad \mu \mid \Sigma \sim N(\mu_0, \Sigma/\kappa),
          \qquad \kappa > 0,\ \nu > D - 1,\ \Psi \succ 0.

A value packs both into one tensor ``(..., D, D + 1)``: columns ``0..D-1`` are :math:`\Sigma`, column ``D``
is :math:`\mu` (``NormalInverseWishart.pack`` / ``unpack``). A model unpacks it and uses the pair as a
Gaussian's parameters::

    with ppl.plate("components", K):
        theta = ppl.sample("theta", ppl.NormalInverseWishart(torch.zeros(D), 0.1, torch.eye(D), D + 2.0))
    loc, cov = ppl.NormalInverseWishart.unpack(theta)          # (K, D), (K, D, D)
    ...
    x = ppl.sample("x", dist.MultivariateNormal(loc[z], cov[z]))

It is an ordinary Pyro distribution (``sample``, ``log_prob``, ``expand``, a ``support`` with a
``biject_to`` transform), so the model also runs under plain Pyro and the svi/mcmc backends. The svae
backend recognizes it as a conjugate global of a Gaussian mixture and fits q(mu, Sigma) = NIW by
natural-gradient steps (``ppl.inference.svae.conjugate``). The density is w.r.t. Lebesgue measure on
:math:`(\mu, \Sigma_{ij}, i \ge j)`; the math lives in ``ppl.expfam.niw``.
"""
from __future__ import annotations

import math

import torch
from pyro.distributions import TorchDistribution, constraints
from torch.distributions import biject_to, transform_to
from torch.distributions.transforms import Transform

from .expfam import mniw, niw
from .primitives import ModelInputError


class _NIWValue(constraints.Constraint):
    """Values ``(..., D, D + 1)`` whose first D columns are a symmetric positive-definite matrix."""

    event_dim = 2

    def check(self, value: torch.Tensor) -> torch.Tensor:
        cov = value[..., :-1]
        sym = torch.isclose(cov, cov.mT, rtol=1e-5, atol=1e-6).all(-1).all(-1)
        pd = torch.linalg.cholesky_ex(cov)[1] == 0
        return sym & pd & torch.isfinite(value[..., -1]).all(-1)

    def __repr__(self) -> str:
        return "NIWValue()"


niw_value = _NIWValue()


class NIWValueTransform(Transform):
    r"""Unconstrained ``u (..., D, D + 1)`` -> NIW value: :math:`L = \mathrm{tril}(u_{:, :D})` with its diagonal
    exponentiated, :math:`\Sigma = L L^\top`, :math:`\mu = u_{:, D}`. The strict upper triangle of ``u`` is
    ignored (as in Pyro's LowerCholeskyTransform).
    :math:`\log|\partial(\mu, \Sigma_{i\ge j})/\partial u| = D\log 2 + \sum_i (D - i + 2)\log L_{ii}` (i from 1)."""

    domain = constraints.independent(constraints.real, 2)
    codomain = niw_value
    bijective = True

    def __eq__(self, other):
        return isinstance(other, NIWValueTransform)

    def _call(self, u):
        D = u.shape[-2]
        L = u[..., :D].tril(-1) + torch.diag_embed(u[..., :D].diagonal(dim1=-2, dim2=-1).exp())
        return NormalInverseWishart.pack(u[..., D], L @ L.mT)

    def _inverse(self, value):
        loc, cov = NormalInverseWishart.unpack(value)
        L = torch.linalg.cholesky(cov)
        u = L.tril(-1) + torch.diag_embed(L.diagonal(dim1=-2, dim2=-1).log())
        return torch.cat([u, loc.unsqueeze(-1)], -1)

    def log_abs_det_jacobian(self, u, value):
        D = u.shape[-2]
        log_diag = u[..., :D].diagonal(dim1=-2, dim2=-1)
        power = torch.arange(D + 1, 1, -1, dtype=u.dtype, device=u.device)  # D - i + 2 for i = 1..D
        return D * math.log(2.0) + (power * log_diag).sum(-1)


@biject_to.register(_NIWValue)
@transform_to.register(_NIWValue)
def _niw_bijection(constraint):
    return NIWValueTransform()


class _ConjugatePrior(TorchDistribution):
    """What the conjugate priors share: parameters are validated once, by computing the natural parameters.

    A subclass sets ``signature`` (its argument list, for messages), implements ``natural()`` (raising
    ``ValueError`` on invalid parameters) and calls ``self.problem = self._check()`` in ``__init__``.
    """

    arg_constraints = {}
    has_rsample = False
    signature = ""

    @classmethod
    def _square_scale(cls, scale, dim: str) -> int:
        """Size of ``scale``, which must be a ``(..., dim, dim)`` tensor; ValueError naming the class if not."""
        if not isinstance(scale, torch.Tensor) or scale.dim() < 2 or scale.shape[-1] != scale.shape[-2]:
            raise ValueError(f"{cls.__name__}: scale must be a (..., {dim}, {dim}) tensor, got "
                             f"{tuple(scale.shape) if isinstance(scale, torch.Tensor) else type(scale).__name__}")
        return scale.shape[-1]

    def _check(self) -> str | None:
        try:
            self.natural()
        except ValueError as exc:
            return f"{type(self).__name__}({self.signature}) with invalid parameters: {exc}"
        return None

    def check_site(self, name: str) -> None:
        """Raise ``ModelInputError`` naming site ``name`` if the parameters are invalid."""
        if self.problem:
            raise ModelInputError(f"site '{name}': {self.problem}")

    def _raise_if_invalid(self):
        if self.problem:
            raise ValueError(self.problem)


class NormalInverseWishart(_ConjugatePrior):
    r"""Normal-inverse-Wishart prior on ``(loc, covariance)``; value ``(*batch, D, D + 1)`` = ``[Sigma | mu]``.

    Args:
        loc: :math:`\mu_0`, ``(*batch, D)``.
        kappa: :math:`\kappa > 0`, a number or ``(*batch)``.
        scale: :math:`\Psi`, symmetric positive definite ``(*batch, D, D)``.
        df: :math:`\nu > D - 1`, a number or ``(*batch)``.

    Invalid parameters do not raise here: ``ppl.sample`` raises a ``ModelInputError`` naming the site
    (``check_site``), and ``sample``/``log_prob`` raise a ``ValueError`` under plain Pyro.
    """

    support = niw_value
    signature = "loc, kappa, scale, df"

    def __init__(self, loc, kappa, scale, df, validate_args=None):
        D = self._square_scale(scale, "D")
        like = dict(dtype=scale.dtype, device=scale.device)
        loc = torch.as_tensor(loc, **like)
        if loc.dim() < 1 or loc.shape[-1] != D:
            raise ValueError(f"NormalInverseWishart: loc must be (..., {D}) like scale (..., {D}, {D}), "
                             f"got {tuple(loc.shape)}")
        kappa, df = torch.as_tensor(kappa, **like), torch.as_tensor(df, **like)
        batch = torch.broadcast_shapes(loc.shape[:-1], kappa.shape, scale.shape[:-2], df.shape)
        self.loc, self.kappa = loc.expand(batch + (D,)), kappa.expand(batch)
        self.scale, self.df = scale.expand(batch + (D, D)), df.expand(batch)
        self.problem = self._check()
        super().__init__(torch.Size(batch), torch.Size((D, D + 1)), validate_args=False)

    def natural(self):
        """Natural parameters (``ppl.expfam.niw.NIWNatural``) with this batch shape."""
        return niw.natural_from_standard(self.loc, self.kappa, self.scale, self.df)

    @staticmethod
    def pack(loc: torch.Tensor, cov: torch.Tensor) -> torch.Tensor:
        """``loc (..., D)``, ``cov (..., D, D)`` -> value ``(..., D, D + 1)``."""
        batch = torch.broadcast_shapes(loc.shape[:-1], cov.shape[:-2])
        D = cov.shape[-1]
        return torch.cat([cov.expand(batch + (D, D)), loc.expand(batch + (D,)).unsqueeze(-1)], -1)

    @staticmethod
    def unpack(value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Value ``(..., D, D + 1)`` -> ``(loc (..., D), cov (..., D, D))``."""
        if value.dim() < 2 or value.shape[-1] != value.shape[-2] + 1:
            raise ValueError(f"NormalInverseWishart value must be (..., D, D + 1), got {tuple(value.shape)}")
        return value[..., -1], value[..., :-1]

    def expand(self, batch_shape, _instance=None):
        batch = torch.Size(batch_shape)
        D = self.scale.shape[-1]
        return NormalInverseWishart(self.loc.expand(batch + (D,)), self.kappa.expand(batch),
                                    self.scale.expand(batch + (D, D)), self.df.expand(batch))

    def sample(self, sample_shape=torch.Size()):
        self._raise_if_invalid()
        with torch.no_grad():
            draw = niw.sample(self.natural(), tuple(sample_shape))
        return self.pack(draw.loc, draw.covariance_matrix)

    def log_prob(self, value):
        self._raise_if_invalid()
        loc, cov = self.unpack(value)
        return niw.log_prob(self.natural(), niw.NIWSample(loc, cov))

    @property
    def mean(self):
        """:math:`(E[\\mu], E[\\Sigma]) = (\\mu_0, \\Psi / (\\nu - D - 1))` packed (needs :math:`\\nu > D + 1`)."""
        D = self.scale.shape[-1]
        return self.pack(self.loc, self.scale / (self.df - D - 1)[..., None, None])


class _MNIWValue(constraints.Constraint):
    """Values ``(..., n, m + n)`` ``[A | Q]`` whose last n columns are a symmetric positive-definite matrix."""

    event_dim = 2

    def check(self, value: torch.Tensor) -> torch.Tensor:
        n = value.shape[-2]
        Q = value[..., value.shape[-1] - n:]
        sym = torch.isclose(Q, Q.mT, rtol=1e-5, atol=1e-6).all(-1).all(-1)
        pd = torch.linalg.cholesky_ex(Q)[1] == 0
        return sym & pd & torch.isfinite(value).all(-1).all(-1)

    def __repr__(self) -> str:
        return "MNIWValue()"


mniw_value = _MNIWValue()


class MNIWValueTransform(Transform):
    r"""Unconstrained ``u (..., n, m + n)`` -> MNIW value ``[A | Q]``: :math:`A = u_{:, :m}`,
    :math:`L = \mathrm{tril}(u_{:, m:})` with its diagonal exponentiated, :math:`Q = LL^\top` (the strict upper
    triangle of that block is ignored). :math:`\log|\partial(A, Q_{i\ge j})/\partial u| = n\log 2
    + \sum_i (n - i + 2)\log L_{ii}` (i from 1; A enters with unit Jacobian). The output size m is read off
    the shapes (``u.shape[-1] - u.shape[-2]``)."""

    domain = constraints.independent(constraints.real, 2)
    codomain = mniw_value
    bijective = True

    def __eq__(self, other):
        return isinstance(other, MNIWValueTransform)

    def _call(self, u):
        n = u.shape[-2]
        A, B = u[..., :u.shape[-1] - n], u[..., u.shape[-1] - n:]
        L = B.tril(-1) + torch.diag_embed(B.diagonal(dim1=-2, dim2=-1).exp())
        return MatrixNormalInverseWishart.pack(A, L @ L.mT)

    def _inverse(self, value):
        A, Q = MatrixNormalInverseWishart.unpack(value)
        L = torch.linalg.cholesky(Q)
        return torch.cat([A, L.tril(-1) + torch.diag_embed(L.diagonal(dim1=-2, dim2=-1).log())], -1)

    def log_abs_det_jacobian(self, u, value):
        n = u.shape[-2]
        log_diag = u[..., u.shape[-1] - n:].diagonal(dim1=-2, dim2=-1)
        power = torch.arange(n + 1, 1, -1, dtype=u.dtype, device=u.device)  # n - i + 2 for i = 1..n
        return n * math.log(2.0) + (power * log_diag).sum(-1)


@biject_to.register(_MNIWValue)
@transform_to.register(_MNIWValue)
def _mniw_bijection(constraint):
    return MNIWValueTransform()


class MatrixNormalInverseWishart(_ConjugatePrior):
    r"""Matrix-normal-inverse-Wishart prior on the weights and noise ``(A, Q)`` of a linear-Gaussian
    regression :math:`y = Ax + \varepsilon`, :math:`\varepsilon \sim N(0, Q)` — for an LDS
    (``ppl.gaussian_chain``) the dynamics and noise covariance, n = m = D:

    .. math:: Q \sim IW(\Psi, \nu), \qquad A \mid Q \sim MN(M, Q, K^{-1}),\ \text{i.e.}\
              \mathrm{vec}(A) \sim N(\mathrm{vec}(M), K^{-1} \otimes Q),

    with K the **column precision** ``(m, m)`` (K = lambda I, M = 0 is ridge regression with strength lambda).
    A value packs both into one tensor ``(*batch, n, m + n)``: columns ``0..m-1`` are A, the last n are Q
    (``pack`` / ``unpack``). A model unpacks it and feeds the pair to the chain unchanged::

        dyn = ppl.sample("dynamics", ppl.MatrixNormalInverseWishart(torch.eye(D), torch.eye(D),
                                                                     0.01 * torch.eye(D), D + 2.0))
        A, Q = ppl.MatrixNormalInverseWishart.unpack(dyn)
        x = ppl.gaussian_chain("x", D, A, Q, length=T)

    The svae backend then fits q(A, Q) = MNIW by natural-gradient steps and runs local inference with the
    expected transition blocks (``ppl.inference.svae.conjugate.MNIWConjugate``); under plain Pyro it is an
    ordinary distribution (``sample``, ``log_prob``, a ``support`` with a ``biject_to`` transform). The
    density is w.r.t. Lebesgue measure on :math:`(A_{ij}, Q_{ij}, i \ge j)`; the math lives in
    ``ppl.expfam.mniw``.

    Args:
        loc: M, ``(*batch, n, m)``.
        col_precision: K, symmetric positive definite ``(*batch, m, m)``.
        scale: :math:`\Psi`, symmetric positive definite ``(*batch, n, n)``.
        df: :math:`\nu > n - 1`, a number or ``(*batch)``.

    Invalid parameters do not raise here: ``ppl.sample`` raises a ``ModelInputError`` naming the site
    (``check_site``), and ``sample``/``log_prob`` raise a ``ValueError`` under plain Pyro.
    """

    support = mniw_value
    signature = "loc, col_precision, scale, df"

    def __init__(self, loc, col_precision, scale, df, validate_args=None):
        n = self._square_scale(scale, "n")
        like = dict(dtype=scale.dtype, device=scale.device)
        loc = torch.as_tensor(loc, **like)
        if loc.dim() < 2 or loc.shape[-2] != n:
            raise ValueError(f"MatrixNormalInverseWishart: loc must be (..., {n}, m) like scale (..., {n}, {n}), "
                             f"got {tuple(loc.shape)}")
        m = loc.shape[-1]
        K = torch.as_tensor(col_precision, **like)
        if K.dim() < 2 or K.shape[-2:] != (m, m):
            raise ValueError(f"MatrixNormalInverseWishart: col_precision must be (..., {m}, {m}) like loc "
                             f"(..., {n}, {m}), got {tuple(K.shape)}")
        df = torch.as_tensor(df, **like)
        batch = torch.broadcast_shapes(loc.shape[:-2], K.shape[:-2], scale.shape[:-2], df.shape)
        self.loc, self.col_precision = loc.expand(batch + (n, m)), K.expand(batch + (m, m))
        self.scale, self.df = scale.expand(batch + (n, n)), df.expand(batch)
        self.problem = self._check()
        super().__init__(torch.Size(batch), torch.Size((n, m + n)), validate_args=False)

    def natural(self):
        """Natural parameters (``ppl.expfam.mniw.MNIWNatural``) with this batch shape."""
        return mniw.natural_from_standard(self.loc, self.col_precision, self.scale, self.df)

    @staticmethod
    def pack(A: torch.Tensor, Q: torch.Tensor) -> torch.Tensor:
        """``A (..., n, m)``, ``Q (..., n, n)`` -> value ``(..., n, m + n)``."""
        batch = torch.broadcast_shapes(A.shape[:-2], Q.shape[:-2])
        return torch.cat([A.expand(batch + A.shape[-2:]), Q.expand(batch + Q.shape[-2:])], -1)

    @staticmethod
    def unpack(value: torch.Tensor, in_dim: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Value ``(..., n, m + n)`` -> ``(A (..., n, m), Q (..., n, n))``; m = ``in_dim`` or the width minus n."""
        if not isinstance(value, torch.Tensor) or value.dim() < 2 or value.shape[-1] <= value.shape[-2]:
            got = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise ValueError(f"MatrixNormalInverseWishart value must be (..., n, m + n), got {got}")
        n = value.shape[-2]
        if in_dim is not None and value.shape[-1] != in_dim + n:
            raise ValueError(f"MatrixNormalInverseWishart value must be (..., {n}, {in_dim + n}), "
                             f"got {tuple(value.shape)}")
        return value[..., :value.shape[-1] - n], value[..., value.shape[-1] - n:]

    def expand(self, batch_shape, _instance=None):
        batch = torch.Size(batch_shape)
        n, m = self.loc.shape[-2:]
        return MatrixNormalInverseWishart(self.loc.expand(batch + (n, m)), self.col_precision.expand(batch + (m, m)),
                                          self.scale.expand(batch + (n, n)), self.df.expand(batch))

    def sample(self, sample_shape=torch.Size()):
        self._raise_if_invalid()
        with torch.no_grad():
            draw = mniw.sample(self.natural(), tuple(sample_shape))
        return self.pack(draw.A, draw.Q)

    def log_prob(self, value):
        self._raise_if_invalid()
        A, Q = self.unpack(value, self.loc.shape[-1])
        return mniw.log_prob(self.natural(), mniw.MNIWSample(A, Q))

    @property
    def mean(self):
        """:math:`(E[A], E[Q]) = (M, \\Psi / (\\nu - n - 1))` packed (needs :math:`\\nu > n + 1`)."""
        n = self.scale.shape[-1]
        return self.pack(self.loc, self.scale / (self.df - n - 1)[..., None, None])
