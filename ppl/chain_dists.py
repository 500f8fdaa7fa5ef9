r"""Distributions of whole chains: the values of ``markov_chain`` and ``gaussian_chain`` sites.

A chain is one random variable. Both distributions can sample (ancestrally), score a path,
and report per-step log-densities, which is what exact backends tabulate.

MarkovChain, value ``z: (..., T)`` integers in ``[0, K)``:
    p(z) = \pi_{z_0} \prod_{t\ge1} P^{(t)}_{z_{t-1} z_t},  with P^{(t)} = P (homogeneous) or per step.
GaussianChain, value ``x: (..., T, D)``:
    x_0 \sim N(m_0, P_0),\quad x_t = A_t x_{t-1} + b_t + w_t,\ w_t \sim N(0, Q_t)\ (t \ge 1).
"""
from __future__ import annotations

import torch
from pyro.distributions import TorchDistribution, constraints
from torch.distributions import MultivariateNormal


class MarkovChain(TorchDistribution):
    """Discrete Markov chain over ``num_states`` states and ``length`` steps.

    Args:
        log_init: ``(..., states)`` log p(z_0).
        log_trans: ``(..., states, states)`` if homogeneous, ``(..., time-1, states, states)`` if
            ``time_varying``; entry ``[i, j]`` is log p(z_t = j | z_{t-1} = i).
        length: number of steps T.
        time_varying: whether ``log_trans`` carries a time dim (never guessed from ndim).
    """

    arg_constraints = {}
    has_enumerate_support = False

    def __init__(self, log_init, log_trans, length: int, time_varying: bool = False, validate_args=None):
        self.log_init, self.log_trans = log_init, log_trans
        self.length, self.time_varying = int(length), bool(time_varying)
        self.num_states = log_init.shape[-1]
        trans_batch = log_trans.shape[:-3] if time_varying else log_trans.shape[:-2]
        batch_shape = torch.broadcast_shapes(log_init.shape[:-1], trans_batch)
        super().__init__(batch_shape, torch.Size([self.length]), validate_args=False)

    @constraints.dependent_property(is_discrete=True, event_dim=1)
    def support(self):
        return constraints.independent(constraints.integer_interval(0, self.num_states - 1), 1)

    def expand(self, batch_shape, _instance=None):
        batch_shape = torch.Size(batch_shape)
        K = self.num_states
        log_init = self.log_init.expand(batch_shape + (K,))
        tail = self.log_trans.shape[-3:] if self.time_varying else self.log_trans.shape[-2:]
        log_trans = self.log_trans.expand(batch_shape + tail)
        return MarkovChain(log_init, log_trans, self.length, self.time_varying)

    def _trans_at(self, t: int) -> torch.Tensor:
        """log transition matrix into step ``t`` (t >= 1): ``(..., states, states)``."""
        return self.log_trans[..., t - 1, :, :] if self.time_varying else self.log_trans

    def sample(self, sample_shape=torch.Size()):
        shape = torch.Size(sample_shape) + self.batch_shape
        with torch.no_grad():
            z = torch.distributions.Categorical(logits=self.log_init.expand(shape + (self.num_states,))).sample()
            path = [z]
            for t in range(1, self.length):
                logits = self._trans_at(t).expand(shape + (self.num_states, self.num_states))
                row = logits.gather(-2, z[..., None, None].expand(shape + (1, self.num_states))).squeeze(-2)
                z = torch.distributions.Categorical(logits=row).sample()
                path.append(z)
        return torch.stack(path, -1)

    def gumbel_max_path(self) -> torch.Tensor:
        r"""One exact draw ``(*batch_shape, length)`` int64 of the chain by the Gumbel-max trick:

        .. math:: z_0 = \arg\max_k (\log \pi_k + g_{0k}), \qquad
                  z_t = \arg\max_k (\log P^{(t)}_{z_{t-1} k} + g_{tk}), \qquad g_{tk} \sim \text{Gumbel}(0, 1)

        (:math:`\arg\max_k (\ell_k + g_k)` is distributed as :math:`\text{softmax}(\ell)`, so each step draws from its
        row of the transition). The noise is drawn at once from torch's generator; the recursion runs over Python lists
        (a few microseconds a step, where the sampler's ``Categorical`` per step costs ~0.1 ms)."""
        K, T = self.num_states, self.length
        batch = tuple(self.batch_shape)
        B = int(self.batch_shape.numel())
        steps = T - 1 if self.time_varying else 1
        init = self.log_init.expand(batch + (K,)).reshape(B, K)
        trans = self.log_trans.expand(batch + ((steps,) if self.time_varying else ()) + (K, K)).reshape(B, steps, K, K)
        uniform = torch.rand((B, T, K), dtype=init.dtype, device=init.device)
        gumbel = -torch.log(-torch.log(uniform))
        first = (init + gumbel[:, 0]).argmax(-1).tolist()
        rows, noise, states = trans.tolist(), gumbel.tolist(), range(K)
        paths = []
        for b in range(B):
            z, path, table, g = first[b], [first[b]], rows[b], noise[b]
            for t in range(1, T):
                row, g_t = table[t - 1 if self.time_varying else 0][z], g[t]
                z = max(states, key=lambda k: row[k] + g_t[k])
                path.append(z)
            paths.append(path)
        return torch.tensor(paths, dtype=torch.long, device=init.device).reshape(batch + (T,))

    def step_log_probs(self, value: torch.Tensor) -> torch.Tensor:
        """Per-step log factors ``(..., time)``: log p(z_0), then log p(z_t | z_{t-1})."""
        value = value.long()
        K = self.num_states
        first = self.log_init.expand(value.shape[:-1] + (K,)).gather(-1, value[..., :1])
        if self.length == 1:
            return first
        prev, nxt = value[..., :-1], value[..., 1:]
        if self.time_varying:
            trans = self.log_trans.expand(value.shape[:-1] + (self.length - 1, K, K))
            rows = trans.gather(-2, prev[..., None, None].expand(prev.shape + (1, K))).squeeze(-2)
        else:
            trans = self.log_trans.expand(value.shape[:-1] + (K, K))
            rows = trans.gather(-2, prev[..., None].expand(prev.shape + (K,)))
        rest = rows.gather(-1, nxt[..., None]).squeeze(-1)
        return torch.cat([first, rest], -1)

    def log_prob(self, value):
        return self.step_log_probs(value).sum(-1)


class GaussianChain(TorchDistribution):
    """Linear-Gaussian chain (LDS prior) of ``length`` steps in ``dim`` dimensions.

    Args:
        initial_loc: ``(..., dim)``; initial_cov: ``(..., dim, dim)``.
        dynamics: ``(..., dim, dim)`` homogeneous, or ``(..., S, dim, dim)`` per step with
            S = time-1 (or 1, broadcast over steps) when ``time_varying``; maps x_{t-1} to x_t.
        noise_cov: same layout as ``dynamics``.
        offsets: ``(..., time-1, dim)`` or None: b_t, e.g. ``B u_t`` for control inputs.
        length: T.
    """

    arg_constraints = {}
    support = constraints.independent(constraints.real, 2)
    has_rsample = True

    def __init__(self, initial_loc, initial_cov, dynamics, noise_cov, length: int,
                 offsets=None, time_varying: bool = False, validate_args=None):
        self.initial_loc, self.initial_cov = initial_loc, initial_cov
        self.dynamics, self.noise_cov, self.offsets = dynamics, noise_cov, offsets
        self.length, self.time_varying = int(length), bool(time_varying)
        self.dim = initial_loc.shape[-1]
        nd = 3 if time_varying else 2
        shapes = [initial_loc.shape[:-1], initial_cov.shape[:-2], dynamics.shape[:-nd], noise_cov.shape[:-nd]]
        if offsets is not None:
            shapes.append(offsets.shape[:-2])
        batch_shape = torch.broadcast_shapes(*shapes)
        super().__init__(batch_shape, torch.Size([self.length, self.dim]), validate_args=False)

    def expand(self, batch_shape, _instance=None):
        batch_shape = torch.Size(batch_shape)
        nd = 3 if self.time_varying else 2
        grow = lambda x, k: x.expand(batch_shape + x.shape[x.dim() - k:])  # noqa: E731
        offsets = None if self.offsets is None else grow(self.offsets, 2)
        return GaussianChain(grow(self.initial_loc, 1), grow(self.initial_cov, 2), grow(self.dynamics, nd),
                             grow(self.noise_cov, nd), self.length, offsets, self.time_varying)

    def _step_params(self):
        """Dynamics ``(..., S, D, D)``, noise ``(..., S, D, D)`` and offsets ``(..., S', D)`` per step t>=1."""
        A, Q = self.dynamics, self.noise_cov
        if not self.time_varying:
            A, Q = A.unsqueeze(-3), Q.unsqueeze(-3)
        b = self.offsets if self.offsets is not None else A.new_zeros((1, self.dim))
        return A, Q, b

    def rsample(self, sample_shape=torch.Size()):
        shape = torch.Size(sample_shape) + self.batch_shape
        D = self.dim
        A, Q, b = self._step_params()
        L0 = torch.linalg.cholesky(self.initial_cov)
        LQ = torch.linalg.cholesky(Q)
        eps = torch.randn(shape + (self.length, D), dtype=self.initial_loc.dtype, device=self.initial_loc.device)
        x = self.initial_loc + (L0 @ eps[..., 0, :, None]).squeeze(-1)
        path = [x.expand(shape + (D,))]
        for t in range(1, self.length):
            pick = lambda m: m[..., min(t - 1, m.shape[-3] - 1), :, :]  # noqa: E731
            bt = b[..., min(t - 1, b.shape[-2] - 1), :]
            x = (pick(A) @ path[-1][..., None]).squeeze(-1) + bt + (pick(LQ) @ eps[..., t, :, None]).squeeze(-1)
            path.append(x)
        return torch.stack(path, -2)

    def step_log_probs(self, value: torch.Tensor) -> torch.Tensor:
        """Per-step log factors ``(..., time)``: log N(x_0; m_0, P_0), then log N(x_t; A_t x_{t-1} + b_t, Q_t)."""
        first = MultivariateNormal(self.initial_loc, self.initial_cov).log_prob(value[..., 0, :])
        if self.length == 1:
            return first[..., None]
        A, Q, b = self._step_params()
        pred = (A @ value[..., :-1, :, None]).squeeze(-1) + b
        rest = MultivariateNormal(pred, Q).log_prob(value[..., 1:, :])
        batch = torch.broadcast_shapes(first.shape, rest.shape[:-1])
        return torch.cat([first.expand(batch)[..., None], rest.expand(batch + rest.shape[-1:])], -1)

    def log_prob(self, value):
        return self.step_log_probs(value).sum(-1)
