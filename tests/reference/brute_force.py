"""Brute-force oracle for discrete chains: enumerate all K^T state paths of one sequence.

The log potential of a path z is
    log_init[z_0] + sum_{t>=1} log_trans_t[z_{t-1}, z_t] + sum_t log_lik[t, z_t],
with log_trans_t = log_trans (homogeneous, (K, K)) or log_trans[t-1] (time-varying,
(T-1, K, K)). Everything else (log Z, marginals, pairwise counts, MAP path, the exact
path distribution) is read off the (K^T,) vector of path log potentials. Only for small
K and T (K^T paths); one unbatched sequence per call — tests loop over batches.
"""
from __future__ import annotations

import itertools
from typing import NamedTuple

import torch
from torch import Tensor


class BruteForce(NamedTuple):
    """log_normalizer: () ; marginals: (T, K) ; pairwise: (K, K) summed over steps
    (homogeneous) or (T-1, K, K) (time-varying) ; map_path: (T,) ; map_log_prob: () ;
    paths: (K^T, T) every path ; path_probs: (K^T,) their posterior probabilities."""

    log_normalizer: Tensor
    marginals: Tensor
    pairwise: Tensor
    map_path: Tensor
    map_log_prob: Tensor
    paths: Tensor
    path_probs: Tensor


def all_paths(num_states: int, num_steps: int) -> Tensor:
    """(K^T, T) int64: every state path, in lexicographic order."""
    paths = itertools.product(range(num_states), repeat=num_steps)
    return torch.tensor(list(paths), dtype=torch.long)


def path_log_potentials(log_init: Tensor, log_trans: Tensor, log_lik: Tensor, paths: Tensor,
                        time_varying: bool) -> Tensor:
    """(P,) log potential of each path in ``paths (P, T)``; shapes as in the module docstring."""
    T = log_lik.shape[0]
    steps = torch.arange(T)
    score = log_init[paths[:, 0]] + log_lik[steps, paths].sum(-1)
    for t in range(1, T):
        trans = log_trans[t - 1] if time_varying else log_trans
        score = score + trans[paths[:, t - 1], paths[:, t]]
    return score


def brute_force(log_init: Tensor, log_trans: Tensor, log_lik: Tensor,
                time_varying: bool = False) -> BruteForce:
    """Exact posterior quantities of one chain by enumeration.

    log_init: (K,), log_trans: (K, K) or (T-1, K, K), log_lik: (T, K).
    """
    T, K = log_lik.shape
    paths = all_paths(K, T)
    scores = path_log_potentials(log_init, log_trans, log_lik, paths, time_varying)
    log_z = torch.logsumexp(scores, 0)
    probs = torch.exp(scores - log_z)
    one_hot = torch.nn.functional.one_hot(paths, K).to(probs.dtype)          # (P, T, K)
    marginals = torch.einsum("p,ptk->tk", probs, one_hot)
    pair = torch.einsum("p,pti,ptj->tij", probs, one_hot[:, :-1], one_hot[:, 1:])  # (T-1, K, K)
    best = torch.argmax(scores)
    pairwise = pair if time_varying else pair.sum(0)
    return BruteForce(log_z, marginals, pairwise, paths[best], scores[best], paths, probs)
