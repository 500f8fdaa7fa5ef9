r"""Data-driven start of an SVAE mixture: hold q(z) at a k-means clustering of the data for the first steps.

A GMM-SVAE started from its priors sits at a symmetric point: every component's mean starts at the prior's
median (e.g. 0 for a ``Normal(0, s)`` prior), the recognition network and decoder are random, and q(z) is the
same for every component, so the first steps can put two well-separated clusters in one component for good
(issue 12: ARI 0.50 on four warped clusters, all of scikit-learn's digits in one cluster). The classic cure for
a mixture is a start from a clustering of the data; the SVAE's latent space does not exist before training, so
the clustering is done on the data the recognition network reads (its input, flattened):

1. ``pca_scores``: the data centred and projected on its first ``min(F, PCA_DIMS)`` principal components;
2. ``kmeans``: k-means++ seeding and Lloyd iterations, ``KMEANS_RESTARTS`` seeds, the lowest inertia kept;
3. for the first ``warmup`` Adam steps the mixture's q(z) is held at the labels (``soft_labels``: probability
   ``1 - LABEL_SMOOTHING`` on the label, the rest spread evenly). The objective is still an ELBO (of that fixed
   q(z) and the optimal q(x) given it), so the networks, the component parameters and the conjugate q's all
   train on it: the latent space forms around the clusters and the components take their places. Then q(z) is
   released to the usual mean-field updates.

Shapes: data ``(N, *features)`` with N the mixture's nodes; labels ``(N,)``; log q(z) ``(N, K)``.
"""
from __future__ import annotations

import math

import torch

from ..initialization import lloyd_kmeans

PCA_DIMS = 10
KMEANS_RESTARTS = 5
LLOYD_ITERATIONS = 50
LABEL_SMOOTHING = 0.02


def pca_scores(x: torch.Tensor, dims: int = PCA_DIMS) -> torch.Tensor:
    r"""Rows ``x: (N, F)`` centred and projected on their first ``min(F, N, dims)`` principal axes:
    ``(N, min(F, N, dims))`` (float64; :math:`X - \bar X = U S V^\top`, scores :math:`U S`). Non-finite
    entries are set to their column's mean first."""
    x = x.detach().reshape(x.shape[0], -1).to(torch.float64)
    finite = torch.isfinite(x)
    col_mean = torch.where(finite, x, 0).sum(0) / finite.sum(0).clamp_min(1)
    x = torch.where(finite, x, col_mean) - col_mean
    U, S, _ = torch.linalg.svd(x, full_matrices=False)
    k = min(dims, S.shape[0])
    return U[:, :k] * S[:k]


def kmeans(x: torch.Tensor, K: int, seed: int, restarts: int = KMEANS_RESTARTS) -> torch.Tensor:
    r"""k-means++ on the rows of ``x: (N, F)``: the labels ``(N,)`` in ``[0, K)`` of the restart (seeds
    ``seed * 1009 + r``, r < ``restarts``) with the lowest inertia :math:`\sum_n \|x_n - c_{z_n}\|^2`.
    ValueError when there are fewer rows than clusters."""
    if x.dim() != 2 or x.shape[0] < K:
        raise ValueError(f"kmeans: need rows (N, F) with N >= K = {K}, got shape {tuple(x.shape)}")
    best = None
    for r in range(max(1, restarts)):
        labels, inertia = lloyd_kmeans(x, K, torch.Generator().manual_seed(seed * 1009 + r), LLOYD_ITERATIONS)
        if best is None or inertia < best[1]:
            best = (labels, inertia)
    return best[0]


def soft_labels(labels: torch.Tensor, K: int, dtype: torch.dtype, smoothing: float = LABEL_SMOOTHING
                ) -> torch.Tensor:
    r"""Normalized log q(z) ``(*labels.shape, K)`` putting :math:`1 - \epsilon + \epsilon/K` on each label and
    :math:`\epsilon/K` on every other state (:math:`\epsilon` = ``smoothing`` in (0, 1): finite logs)."""
    if not 0.0 < smoothing < 1.0:
        raise ValueError(f"smoothing must be in (0, 1), got {smoothing}")
    low = math.log(smoothing / K)
    high = math.log(1.0 - smoothing + smoothing / K)
    out = torch.full(tuple(labels.shape) + (K,), low, dtype=dtype, device=labels.device)
    return out.scatter(-1, labels[..., None], high)


def mixture_labels(data: torch.Tensor, node_shape: tuple[int, ...], K: int, seed: int) -> torch.Tensor:
    """k-means labels of the nodes of a mixture from their recognition input ``data (*node_shape, *features)``:
    ``(*node_shape)`` (``kmeans`` on ``pca_scores`` of the flattened rows)."""
    n = int(torch.Size(node_shape).numel())
    rows = data.reshape(n, -1) if data.dim() > len(node_shape) else data.reshape(n, 1)
    return kmeans(pca_scores(rows), K, seed).reshape(node_shape).to(data.device)


PRETRAIN_STEPS = 200
PRETRAIN_LR = 0.01
POTENTIAL_VARIANCE = 0.1   # the pretrained recognition potentials' variance, in units of the within-cluster variance
MAP_STEPS = 100   # L-BFGS evaluations of the complete-data MAP of the point-estimate globals (backend.py)


def latent_targets(data: torch.Tensor, node_shape: tuple[int, ...], labels: torch.Tensor, D: int) -> torch.Tensor:
    r"""Latent coordinates to start a mixture's latent space at: the first D principal-component scores of the
    flattened ``data (*node_shape, *features)`` (zero columns where there are fewer than D), divided by the pooled
    within-cluster standard deviation under ``labels (*node_shape)``
    :math:`s^2 = \frac{1}{ND}\sum_n \|u_n - \bar u_{z_n}\|^2`, so a cluster has unit spread per dimension:
    ``(*node_shape, D)`` in ``data``'s float dtype (float32 for integer data)."""
    n = int(torch.Size(node_shape).numel())
    rows = data.reshape(n, -1) if data.dim() > len(node_shape) else data.reshape(n, 1)
    u = pca_scores(rows, D)
    u = torch.cat([u, u.new_zeros(n, D - u.shape[1])], -1)
    z = labels.reshape(n).to(u.device)
    K = int(z.max()) + 1
    onehot = torch.nn.functional.one_hot(z, K).to(u.dtype)
    centres = onehot.mT @ u / onehot.sum(0).clamp_min(1)[:, None]
    spread = float(((u - centres[z]) ** 2).mean().sqrt())
    dtype = data.dtype if data.is_floating_point() else torch.float32
    return (u / max(spread, 1e-12)).reshape(tuple(node_shape) + (D,)).to(dtype=dtype, device=data.device)


def pretrain_recognition(net: torch.nn.Module, data: torch.Tensor, node_shape: tuple[int, ...],
                         target: torch.Tensor, steps: int = PRETRAIN_STEPS, lr: float = PRETRAIN_LR) -> float:
    r"""Fit a recognition network ``(B, *features) -> (B, 2D)`` (mean, log variance) to emit ``target
    (*node_shape, D)`` as its means and ``log POTENTIAL_VARIANCE`` as its log variances: ``steps`` full-batch Adam
    steps on :math:`\frac{1}{ND}\sum (m_n - u_n)^2 + (\log v_n - \log v_0)^2`. Returns the final loss. A network
    without parameters is left as it is (returns nan)."""
    params = [p for p in net.parameters() if p.requires_grad]
    if not params or steps < 1:
        return float("nan")
    n = len(node_shape)
    flat = data.reshape((-1,) + tuple(data.shape[n:])) if data.dim() > n else data.reshape(-1, 1)
    want = target.reshape(flat.shape[0], -1)
    D = want.shape[-1]
    log_v0 = math.log(POTENTIAL_VARIANCE)
    optim = torch.optim.Adam(params, lr=lr)
    with torch.enable_grad():
        for _ in range(steps):
            out = net(flat)
            loss = ((out[:, :D] - want) ** 2).mean() + ((out[:, D:] - log_v0) ** 2).mean()
            optim.zero_grad()
            loss.backward()
            optim.step()
    return float(loss.detach())
