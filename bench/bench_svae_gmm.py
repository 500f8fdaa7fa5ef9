"""A user-written GMM-SVAE fitted with ``ppl.infer`` defaults (no init, no restarts, no recognition network
given), side by side with scikit-learn's GaussianMixture (issue 12, item 5 and two of its numbers).

Two cases, run as ``python -m bench.bench_svae_gmm [--seeds 0 1 2 3 4] [--threads 1] [--only warped|unequal|digits]``:

- ``warped``: 4 well-separated 2-D Gaussian clusters (centres on a circle of radius 4, unit sd, 500 points each,
  N = 2000) pushed through a fixed random tanh MLP (2 -> 32 -> 32 -> 12, weights drawn from the seed) into 12-D,
  plus N(0, 0.05^2) noise; the model (``warped_gmm`` below) is what a user writes: an MLP decoder through
  ``ppl.module``, Dirichlet weights, a plain Normal prior on the component means and a LogNormal one on the
  per-dimension component scales (no NIW), D = 2. Target: ARI >= 0.9 on seeds 0-4, fit <= 60 s.
- ``unequal`` (a shape the defaults were not developed on): 3 clusters of 300 / 600 / 1100 points, each with
  its own tilted covariance, through a different random MLP (2 -> 24 -> 8), noise 0.1; K = 3, D = 2, the same
  model. Peer: GaussianMixture on PCA-2.
- ``digits``: scikit-learn's 1797 8x8 digit images flattened to 64 features, as a user passes them: pixel values
  divided by 16 (``--digits-scaling unit``, the default; in [0, 1]) or standardized per pixel (``standardized``,
  after ``StandardScaler``; constant pixels left at 0); the same model with K = 10, D = 10.
  Peer: ``GaussianMixture(10)`` (full covariance, its default ``n_init=1``, best of 5 seeds reported too) on
  the first 10 principal components of the same standardized data. Target: our ARI >= the peer's.

Each row prints the ARI against the true labels, wall seconds and process CPU seconds (``time.process_time``,
a fair proxy for an unloaded run on a shared machine) and the load average, the fit's ELBO
(``post.log_evidence``: one draw, q(z) free, at the final networks and globals; compare fits of the same data by
it), and the ARI of the fit's data-driven start (``start``: the labels ``svae/warmup.py`` holds q(z) at for the
first ``warmup`` steps, k-means++ on the principal components refined by Gaussian-mixture EM, the same seed): a
fit below its start lost it in training. ``--num-steps``, ``--warmup`` and ``--lr`` override those options of
every fit, for diagnostics (the header then names them).
"""
from __future__ import annotations

import argparse
import time
import warnings

import torch
from torch import nn

import ppl
from ppl import dist
from ppl.inference.svae.warmup import mixture_labels


class Decoder(nn.Module):
    """``x (..., D) -> (mean (..., P), scale (P,))``: two tanh hidden layers, a learned log scale per feature."""

    def __init__(self, D: int, P: int, hidden: int = 64):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(D, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh(),
                                 nn.Linear(hidden, P))
        self.log_scale = nn.Parameter(torch.zeros(P))

    def forward(self, x):
        return self.net(x), self.log_scale.exp()


@ppl.model
def warped_gmm(y, decoder, K: int = 4, D: int = 2):
    """The user's GMM-SVAE: pi ~ Dir(1), mu_k ~ N(0, 3^2 I), s_k ~ LogNormal(0, 1) per dim, z_n ~ Cat(pi),
    x_n ~ N(mu_z, diag(s_z^2)), y_n ~ N(decoder(x_n)). ``y: (N, P)``."""
    dec = ppl.module("decoder", decoder)
    weights = ppl.sample("weights", dist.Dirichlet(y.new_ones(K)))
    with ppl.plate("components", K):
        locs = ppl.sample("locs", dist.Normal(y.new_zeros(D), 3.0).to_event(1))
        scales = ppl.sample("scales", dist.LogNormal(y.new_zeros(D), 1.0).to_event(1))
    with ppl.plate("data", y.shape[0]):
        z = ppl.sample("z", dist.Categorical(weights))
        x = ppl.sample("x", dist.Normal(locs[z], scales[z]).to_event(1))
        mean, scale = dec(x)
        ppl.sample("y", dist.Normal(mean, scale).to_event(1), obs=y)


def warped_clusters(seed: int, N: int = 2000, K: int = 4, P: int = 12, radius: float = 4.0,
                    noise: float = 0.05) -> tuple[torch.Tensor, torch.Tensor]:
    """``(y (N, P) float32, labels (N,))``: K unit-sd 2-D Gaussian clusters with centres on a circle of
    ``radius`` (equal sizes), mapped by a random tanh MLP 2 -> 32 -> 32 -> P drawn from ``seed``, plus noise."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(K).repeat_interleave(N // K)
    angle = 2 * torch.pi * labels.double() / K
    centres = radius * torch.stack([angle.cos(), angle.sin()], -1)
    latent = centres + torch.randn(labels.shape[0], 2, generator=g, dtype=torch.float64)
    w1 = torch.randn(2, 32, generator=g, dtype=torch.float64) / 2.0
    w2 = torch.randn(32, 32, generator=g, dtype=torch.float64) / 32 ** 0.5
    w3 = torch.randn(32, P, generator=g, dtype=torch.float64) / 32 ** 0.5 * 2.0
    y = torch.tanh(torch.tanh(latent @ w1) @ w2) @ w3
    y = y + noise * torch.randn(y.shape, generator=g, dtype=torch.float64)
    return y.float(), labels


def unequal_clusters(seed: int, sizes: tuple[int, ...] = (300, 600, 1100), P: int = 8,
                     noise: float = 0.1) -> tuple[torch.Tensor, torch.Tensor]:
    """``(y (N, P) float32, labels (N,))``, a second shape to check the defaults on (not the one they were
    developed on): 3 clusters of unequal sizes (300 / 600 / 1100), centres (-4, 0), (4, 1), (0, 5), each with its
    own random 2-D covariance (sds 0.5-1.2, random orientation), through a random one-hidden-layer tanh MLP
    2 -> 24 -> P (``P = 8``), plus N(0, 0.1^2) noise."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(len(sizes)).repeat_interleave(torch.tensor(sizes))
    centres = torch.tensor([[-4.0, 0.0], [4.0, 1.0], [0.0, 5.0]], dtype=torch.float64)[:len(sizes)]
    sds = 0.5 + 0.7 * torch.rand(len(sizes), 2, generator=g, dtype=torch.float64)
    angle = torch.pi * torch.rand(len(sizes), generator=g, dtype=torch.float64)
    rot = torch.stack([torch.stack([angle.cos(), -angle.sin()], -1), torch.stack([angle.sin(), angle.cos()], -1)], -1)
    eps = torch.randn(labels.shape[0], 2, generator=g, dtype=torch.float64) * sds[labels]
    latent = centres[labels] + (rot[labels] @ eps[..., None])[..., 0]
    w1 = torch.randn(2, 24, generator=g, dtype=torch.float64) / 3.0
    w2 = torch.randn(24, P, generator=g, dtype=torch.float64) / 24 ** 0.5 * 2.0
    y = torch.tanh(latent @ w1) @ w2
    y = y + noise * torch.randn(y.shape, generator=g, dtype=torch.float64)
    return y.float(), labels


def digits(scaling: str = "unit") -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's digits, pixels / 16 (``"unit"``) or standardized per pixel (``"standardized"``):
    ``(y (1797, 64) float32, labels (1797,))``."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.as_tensor(data.data, dtype=torch.float64)
    if scaling == "unit":
        return (x / 16.0).float(), torch.as_tensor(data.target)
    sd = x.std(0)
    x = (x - x.mean(0)) / torch.where(sd > 0, sd, torch.ones_like(sd))
    return x.float(), torch.as_tensor(data.target)


def fit_ours(y: torch.Tensor, K: int, D: int, seed: int, **options):
    """``ppl.infer`` with defaults (``options`` override, for experiments): (labels (N,), posterior, wall s,
    CPU s). The decoder is initialized from ``seed`` too (torch's global RNG, forked: the process's own stream is
    seeded at random at start-up, so an unseeded decoder made each run of this bench a different experiment)."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        decoder = Decoder(D, y.shape[1])
    start, cpu = time.perf_counter(), time.process_time()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        post = ppl.infer(warped_gmm, y, model_kwargs={"decoder": decoder, "K": K, "D": D}, seed=seed,
                         progress=False, **options)
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu
    for w in caught:
        print(f"    warning: {w.category.__name__}: {str(w.message)[:300]}")
    return post.marginals("z").argmax(-1), post, wall, cpu


def peer_pca_gmm(y: torch.Tensor, K: int, seed: int, components: int = 10):
    """GaussianMixture(K) on the first ``components`` principal components of ``y``: (labels, wall s, CPU s)."""
    from sklearn.decomposition import PCA
    from sklearn.mixture import GaussianMixture

    start, cpu = time.perf_counter(), time.process_time()
    z = PCA(components, random_state=seed).fit_transform(y.double().numpy())
    labels = GaussianMixture(K, random_state=seed).fit(z).predict(z)
    return torch.as_tensor(labels), time.perf_counter() - start, time.process_time() - cpu


def start_ari(y: torch.Tensor, truth: torch.Tensor, K: int, seed: int) -> float:
    """ARI of the labels the SVAE's warm-up starts from (``warmup.mixture_labels`` on ``y (N, ...)``, ``seed``)."""
    return ari(truth, mixture_labels(y, (y.shape[0],), K, seed).cpu())


def ari(a: torch.Tensor, b: torch.Tensor) -> float:
    from sklearn.metrics import adjusted_rand_score

    return float(adjusted_rand_score(a.numpy(), b.numpy()))


def load() -> str:
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--only", choices=["warped", "digits", "unequal"], default=None)
    parser.add_argument("--digits-scaling", choices=["unit", "standardized"], default="unit")
    parser.add_argument("--num-steps", type=int, default=None, help="diagnostics: override ppl.infer's num_steps")
    parser.add_argument("--warmup", type=int, default=None, help="diagnostics: override the svae backend's warmup")
    parser.add_argument("--lr", type=float, default=None, help="diagnostics: override ppl.infer's lr")
    args = parser.parse_args(argv)
    options = {k: v for k, v in (("num_steps", args.num_steps), ("warmup", args.warmup), ("lr", args.lr))
               if v is not None}
    shown = f" except {options}" if options else ""
    torch.set_num_threads(args.threads)
    if args.only in (None, "warped"):
        print(f"warped clusters: N = 2000, 4 clusters, 12-D, K = 4, D = 2, ppl.infer defaults{shown}")
        for seed in args.seeds:
            y, truth = warped_clusters(seed)
            labels, post, wall, cpu = fit_ours(y, 4, 2, seed, **options)
            peer, pwall, pcpu = peer_pca_gmm(y, 4, seed, components=2)
            print(f"  seed {seed}: ARI ours {ari(truth, labels):.3f} (start {start_ari(y, truth, 4, seed):.3f}; "
                  f"{wall:.1f} s wall, {cpu:.1f} s CPU, ELBO {post.log_evidence.value:.0f}, "
                  f"sizes {torch.bincount(labels, minlength=4).tolist()}); "
                  f"GaussianMixture on PCA-2 {ari(truth, peer):.3f} ({pwall:.2f} s); load {load()}")
    if args.only in (None, "unequal"):
        print("unequal clusters: N = 2000 (300 / 600 / 1100), 3 tilted clusters, 8-D, K = 3, D = 2, ppl.infer "
              f"defaults{shown}")
        for seed in args.seeds:
            y, truth = unequal_clusters(seed)
            labels, post, wall, cpu = fit_ours(y, 3, 2, seed, **options)
            peer, pwall, pcpu = peer_pca_gmm(y, 3, seed, components=2)
            print(f"  seed {seed}: ARI ours {ari(truth, labels):.3f} (start {start_ari(y, truth, 3, seed):.3f}; "
                  f"{wall:.1f} s wall, {cpu:.1f} s CPU, ELBO {post.log_evidence.value:.0f}, "
                  f"sizes {torch.bincount(labels, minlength=3).tolist()}); "
                  f"GaussianMixture on PCA-2 {ari(truth, peer):.3f} ({pwall:.2f} s); load {load()}")
    if args.only in (None, "digits"):
        y, truth = digits(args.digits_scaling)
        print(f"digits: 1797 x 64 ({args.digits_scaling}), K = 10, D = 10, ppl.infer defaults{shown}")
        for seed in args.seeds:
            labels, post, wall, cpu = fit_ours(y, 10, 10, seed, **options)
            peer, pwall, pcpu = peer_pca_gmm(y, 10, seed)
            print(f"  seed {seed}: ARI ours {ari(truth, labels):.3f} (start {start_ari(y, truth, 10, seed):.3f}; "
                  f"{wall:.1f} s wall, {cpu:.1f} s CPU, ELBO {post.log_evidence.value:.0f}); "
                  f"GaussianMixture on PCA-10 {ari(truth, peer):.3f} ({pwall:.2f} s wall, {pcpu:.2f} s CPU); "
                  f"load {load()}")


if __name__ == "__main__":
    main()
