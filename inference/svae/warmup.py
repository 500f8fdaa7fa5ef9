r"""Data-driven start of an SVAE mixture: hold q(z) at a clustering of the data for the first steps.

A GMM-SVAE started from its priors sits at a symmetric point: every component's mean starts at the prior's
median (e.g. 0 for a ``Normal(0, s)`` prior), the recognition network and decoder are random, and q(z) is the
same for every component, so the first steps can put two well-separated clusters in one component for good
(issue 12: ARI 0.50 on four warped clusters, all of scikit-learn's digits in one cluster). The classic cure for
a mixture is a start from a clustering of the data; the SVAE's latent space does not exist before training, so
the clustering is done on the data the recognition network reads (its input, flattened):

1. ``pca_scores``: the data centred and projected on its first ``min(F, PCA_DIMS)`` principal components;
2. ``kmeans``: k-means++ seeding and Lloyd iterations, ``KMEANS_RESTARTS`` seeds, the lowest inertia kept, then
   ``gaussian_mixture_labels``: EM of a full-covariance Gaussian mixture from those labels (the clusters' own
   shapes and sizes; on the warped clusters of ``bench/bench_svae_gmm.py`` ARI 0.93-0.98 -> 0.98-0.99, digits
   0.64 -> 0.73);
3. the default recognition network is pretrained to emit ``latent_targets`` (the first D principal components,
   each cluster made a unit sphere around its centre: the components are Gaussians), the point-estimate globals
   move to their complete-data MAP and, when every latent node is such a mixture with a default network, the
   decoders (the observed sites' networks) train for ``PRETRAIN_STEPS`` Adam steps on the data from those latents
   (``backend.complete_data_map``, ``backend.fit_likelihood_networks``): a decoder's learned output scale
   moves toward the data's residual scale instead of staying at its initial value;
4. for the first ``warmup`` Adam steps the mixture's q(z) is held at the labels (``soft_labels``: probability
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
LABEL_SMOOTHING = 1e-4   # q(z)'s mass off the label while held: only to keep log q(z) finite. 0.02 gave each
# component weight 0.005 on every point of the other clusters; those far points inflated the components' scales during
# the warm-up and the latent space formed around the inflated shapes; after the release q(z) reassigned the clusters'
# edges (warped clusters of bench/bench_svae_gmm.py, seed 2: ARI 0.79 -> 0.88). The price: a start's errors survive
# the release more (pinwheel spirals, whose EM-refined start is poor: seed 0 0.99 -> 0.93; bench/RESULTS.md)
EM_ITERATIONS = 100   # full-covariance Gaussian-mixture EM rounds refining the k-means labels
EM_REG = 1e-6         # its covariance floor, relative to the data's mean variance
EM_TOL = 1e-6         # its stopping rule: change of the mean log-likelihood per round


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


def gaussian_mixture_labels(x: torch.Tensor, labels: torch.Tensor, K: int, iterations: int = EM_ITERATIONS,
                            reg: float = EM_REG, tol: float = EM_TOL) -> torch.Tensor:
    r"""Labels ``(N,)`` of a full-covariance Gaussian mixture fitted by EM to the rows of ``x: (N, F)``, started
    from the hard ``labels (N,)`` (e.g. k-means'): M-step :math:`w_k = N_k/N`, :math:`\mu_k`,
    :math:`\Sigma_k = \frac1{N_k}\sum_n r_{nk}(x_n-\mu_k)(x_n-\mu_k)^\top + \epsilon I` (:math:`\epsilon` =
    ``reg`` times the mean per-column variance of ``x``); E-step :math:`r_{nk} \propto w_k N(x_n|\mu_k,\Sigma_k)`;
    at most ``iterations`` rounds, stopping when the mean log-likelihood changes by less than ``tol``. k-means is
    this model with equal spherical covariances; the SVAE's mixture is Gaussian in its latent space, so the start
    takes the clusters' own shapes and sizes into account. The argmax of the final responsibilities; ``labels``
    unchanged when a component would end with at most F points (too few for its covariance)."""
    N, F = x.shape
    r = torch.nn.functional.one_hot(labels, K).to(x.dtype)
    eye = torch.eye(F, dtype=x.dtype, device=x.device)
    eps = reg * float(x.var(0).mean().clamp_min(1e-300))
    last = -math.inf
    for _ in range(iterations):
        counts = r.sum(0)
        if bool((counts <= F).any()):
            return labels
        mu = r.mT @ x / counts[:, None]
        dev = x[:, None, :] - mu                                                            # (N, K, F)
        cov = torch.einsum("nk,nkf,nkg->kfg", r, dev, dev) / counts[:, None, None] + eps * eye
        L = torch.linalg.cholesky(cov)
        white = torch.linalg.solve_triangular(L, dev.permute(1, 2, 0), upper=False)        # (K, F, N)
        log_p = ((counts / N).log() - L.diagonal(dim1=-2, dim2=-1).log().sum(-1)
                 - 0.5 * (white ** 2).sum(1).mT - 0.5 * F * math.log(2 * math.pi))           # (N, K)
        loglik = float(log_p.logsumexp(-1).mean())
        r = log_p.softmax(-1)
        if abs(loglik - last) < tol:
            break
        last = loglik
    out = r.argmax(-1)
    return out if bool((torch.bincount(out, minlength=K) > F).all()) else labels


def mixture_labels(data: torch.Tensor, node_shape: tuple[int, ...], K: int, seed: int) -> torch.Tensor:
    """Labels of the nodes of a mixture from their recognition input ``data (*node_shape, *features)``:
    ``(*node_shape)`` (``kmeans`` on ``pca_scores`` of the flattened rows, refined by ``gaussian_mixture_labels``)."""
    n = int(torch.Size(node_shape).numel())
    rows = data.reshape(n, -1) if data.dim() > len(node_shape) else data.reshape(n, 1)
    scores = pca_scores(rows)
    labels = gaussian_mixture_labels(scores, kmeans(scores, K, seed), K)
    return labels.reshape(node_shape).to(data.device)


PRETRAIN_STEPS = 200   # Adam steps pretraining the default recognition network, then the decoders (backend.py)
PRETRAIN_LR = 0.01
POTENTIAL_VARIANCE = 0.1   # the pretrained recognition potentials' variance, in units of the within-cluster variance
MAP_STEPS = 100   # L-BFGS evaluations of the complete-data MAP of the point-estimate globals (backend.py)


def latent_targets(data: torch.Tensor, node_shape: tuple[int, ...], labels: torch.Tensor, D: int) -> torch.Tensor:
    r"""Latent coordinates to start a mixture's latent space at: the first D principal-component scores
    :math:`u_n` of the flattened ``data (*node_shape, *features)`` (zero columns where there are fewer than D),
    each cluster of ``labels (*node_shape)`` moved to a unit spherical shape around its centre:

    .. math:: t_n = \bar u_{z_n} / s + W_{z_n}(u_n - \bar u_{z_n}),\qquad
              s^2 = \tfrac{1}{ND}\sum_n \|u_n - \bar u_{z_n}\|^2,

    :math:`W_k = C_k^{-1/2}` the symmetric (ZCA) whitening of cluster k's covariance :math:`C_k` (directions
    with variance below ``1e-6`` of its largest, or all of them for a cluster of fewer than D + 1 points, are
    scaled by 1/s instead). The model's components are Gaussians (often with diagonal covariance): a cluster
    stretched along a tilted direction in principal-component space would start as a shape no component fits,
    and a wider neighbour would absorb its edge once q(z) is released. Returns ``(*node_shape, D)`` in
    ``data``'s float dtype (float32 for integer data)."""
    n = int(torch.Size(node_shape).numel())
    rows = data.reshape(n, -1) if data.dim() > len(node_shape) else data.reshape(n, 1)
    u = pca_scores(rows, D)
    u = torch.cat([u, u.new_zeros(n, D - u.shape[1])], -1)
    z = labels.reshape(n).to(u.device)
    K = int(z.max()) + 1
    onehot = torch.nn.functional.one_hot(z, K).to(u.dtype)
    counts = onehot.sum(0)
    centres = onehot.mT @ u / counts.clamp_min(1)[:, None]
    dev = u - centres[z]
    spread = max(float((dev ** 2).mean().sqrt()), 1e-12)
    whiten = cluster_whitening(dev, z, K, spread)
    out = centres[z] / spread + (whiten[z] @ dev[..., None])[..., 0]
    dtype = data.dtype if data.is_floating_point() else torch.float32
    return out.reshape(tuple(node_shape) + (D,)).to(dtype=dtype, device=data.device)


def cluster_whitening(dev: torch.Tensor, z: torch.Tensor, K: int, spread: float, rel_tol: float = 1e-6
                      ) -> torch.Tensor:
    r"""``(K, D, D)`` symmetric whitening matrices :math:`V_k \mathrm{diag}(e_k^{-1/2}) V_k^\top` of the clusters'
    covariances :math:`C_k = \frac1{N_k}\sum_{z_n = k} d_n d_n^\top = V_k \mathrm{diag}(e_k) V_k^\top` (``dev
    (N, D)`` the deviations :math:`d_n` from the cluster means, ``z (N,)`` the labels); an eigenvalue below
    ``rel_tol`` times the largest, or a cluster of at most D points, gets :math:`1/\text{spread}` instead."""
    D = dev.shape[-1]
    onehot = torch.nn.functional.one_hot(z, K).to(dev.dtype)
    counts = onehot.sum(0)
    cov = torch.einsum("nk,nd,ne->kde", onehot, dev, dev) / counts.clamp_min(1)[:, None, None]
    evals, evecs = torch.linalg.eigh(cov)
    usable = (evals > rel_tol * evals[:, -1:].clamp_min(1e-300)) & (counts[:, None] > D)
    scale = torch.where(usable, evals.clamp_min(1e-300).rsqrt(), torch.full_like(evals, 1.0 / spread))
    return evecs @ torch.diag_embed(scale) @ evecs.mT


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
