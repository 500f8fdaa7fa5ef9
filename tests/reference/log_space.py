"""Log-space forward-backward oracle for one discrete chain of any length (float64, no autograd).

Same conventions as ``ppl.inference.exact.hmm`` (no transition before the first emission, homogeneous
``log_trans (K, K)``); written independently of it: plain ``torch.logsumexp`` recursions on
unnormalized log messages, exact for ``-inf`` potentials (structural zeros) and any magnitude, where
brute force (K^T paths) is out of reach.
"""
from __future__ import annotations

import torch
from torch import Tensor


def forward_backward(log_init: Tensor, log_trans: Tensor, log_lik: Tensor) -> tuple[Tensor, Tensor]:
    """(log Z (), marginals (T, K)) of ``log_init (K,)``, ``log_trans (K, K)``, ``log_lik (T, K)``."""
    log_init, log_trans, log_lik = (x.detach().double() for x in (log_init, log_trans, log_lik))
    T = log_lik.shape[0]
    alphas = [log_init + log_lik[0]]
    for t in range(1, T):
        alphas.append(torch.logsumexp(alphas[-1][:, None] + log_trans, 0) + log_lik[t])
    betas = [torch.zeros_like(log_init)]
    for t in range(T - 1, 0, -1):
        betas.append(torch.logsumexp(log_trans + (log_lik[t] + betas[-1])[None, :], 1))
    alpha, beta = torch.stack(alphas), torch.stack(betas[::-1])
    log_z = torch.logsumexp(alphas[-1], 0)
    return log_z, torch.exp(alpha + beta - log_z)
