"""The SVAE's robust defaults for mixtures (``inference/svae/warmup.py``, ``local.diagonal_mixture_local``):

- the diagonal mean-field step equals the full-matrix one (same draws, KL, q(z)) and, with q(z) held, solves
  q(x) in closed form;
- k-means++ (best of several seeds) recovers separated blobs; PCA scores match scikit-learn's; soft labels;
  the Gaussian-mixture EM refining the labels equals scikit-learn's from the same start;
- the start's latent targets make each cluster a unit sphere; the decoder pretraining reaches least squares;
- end to end: a user-written GMM-SVAE (Normal prior on the component means, no init, no restarts, no recognition
  network given) on warped, well-separated clusters recovers them with ``ppl.infer`` defaults (adjusted Rand
  index against the true labels), where the old defaults (``warmup=0``) merge clusters;
- bad options are refused naming the option."""
import math
import warnings

import pyro
import pytest
import torch
from torch import nn

import ppl
from ppl import dist
from ppl.inference.initialization import lloyd_kmeans
from ppl.inference.svae.local import diagonal_mixture_local, mixture_local
from ppl.inference.svae.warmup import LABEL_SMOOTHING, LLOYD_ITERATIONS, kmeans, mixture_labels, pca_scores, soft_labels


def _ari(a: torch.Tensor, b: torch.Tensor) -> float:
    from sklearn.metrics import adjusted_rand_score

    return float(adjusted_rand_score(a.numpy(), b.numpy()))


def _mixture_inputs(K=3, N=7, D=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    f64 = dict(dtype=torch.float64)
    mu = torch.randn(K, 1, D, generator=g, **f64).expand(K, N, D)
    prec = (0.5 + torch.rand(K, 1, D, generator=g, **f64)).expand(K, N, D)
    J = 0.2 + torch.rand(N, D, generator=g, **f64)
    h = torch.randn(N, D, generator=g, **f64)
    log_w = torch.randn(K, generator=g, **f64).log_softmax(-1).expand(N, K)
    return log_w, mu, prec, J, h


@pytest.mark.parametrize("fixed", [False, True])
def test_diagonal_mixture_step_equals_the_full_matrix_step(fixed):
    log_w, mu, prec, J, h = _mixture_inputs()
    log_r = torch.randn(7, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(5)).log_softmax(-1) \
        if fixed else None
    diag = diagonal_mixture_local(log_w, mu, prec, J, h, 3, torch.Generator().manual_seed(1), log_r)
    full = mixture_local(log_w, mu, torch.diag_embed(prec), torch.diag_embed(J), h, 3,
                         torch.Generator().manual_seed(1), log_r)
    for a, b in zip((diag.x, diag.kl, diag.mean, diag.probs), (full.x, full.kl, full.mean, full.probs)):
        assert torch.allclose(a, b, atol=1e-10, rtol=1e-10)
    if fixed:
        # q(z) is held: probs are exp(log_r); q(x) is the closed-form optimum given it
        assert torch.allclose(diag.probs, log_r.exp())
        r = log_r.exp().T[..., None]                                          # (K, N, 1)
        want = ((r * prec * mu).sum(0) + h) / ((r * prec).sum(0) + J)
        assert torch.allclose(diag.mean, want, atol=1e-12)


def _inertia(x, z, K):
    return sum(float(((x[z == k] - x[z == k].mean(0)) ** 2).sum()) for k in range(K) if bool((z == k).any()))


def test_kmeans_recovers_separated_blobs_and_keeps_the_lowest_inertia():
    g = torch.Generator().manual_seed(0)
    truth = torch.arange(4).repeat_interleave(50)
    centres = torch.tensor([[0.0, 0.0], [6.0, 0.0], [0.0, 6.0], [6.0, 6.0]], dtype=torch.float64)
    x = centres[truth] + 0.5 * torch.randn(200, 2, generator=g, dtype=torch.float64)
    labels = kmeans(x, 4, seed=0)
    assert labels.shape == (200,) and _ari(truth, labels) == 1.0
    # overlapping data, K = 6: the result is the lowest-inertia run of its 5 seeds, which differ
    y = torch.randn(300, 3, generator=g, dtype=torch.float64)
    runs = [lloyd_kmeans(y, 6, torch.Generator().manual_seed(2 * 1009 + r), LLOYD_ITERATIONS) for r in range(5)]
    inertias = [inertia for _, inertia in runs]
    assert max(inertias) > min(inertias) + 1e-6
    best = kmeans(y, 6, seed=2)
    assert torch.equal(best, runs[inertias.index(min(inertias))][0])
    assert math.isclose(_inertia(y, best, 6), min(inertias), rel_tol=1e-9)
    with pytest.raises(ValueError, match=r"N >= K = 5, got shape \(3, 2\)"):
        kmeans(x[:3], 5, seed=0)


def test_pca_scores_match_scikit_learn_and_soft_labels_are_normalized():
    from sklearn.decomposition import PCA

    g = torch.Generator().manual_seed(1)
    x = torch.randn(60, 12, generator=g, dtype=torch.float64) @ torch.randn(12, 12, generator=g, dtype=torch.float64)
    ours = pca_scores(x, 3)
    theirs = torch.as_tensor(PCA(3).fit_transform(x.numpy()))
    assert ours.shape == (60, 3)
    assert torch.allclose(ours.abs(), theirs.abs(), atol=1e-8)          # equal up to the sign of each axis
    labels = torch.tensor([0, 2, 1, 2])
    log_r = soft_labels(labels, 3, torch.float32)
    assert log_r.shape == (4, 3) and torch.allclose(log_r.logsumexp(-1), torch.zeros(4), atol=1e-6)
    assert torch.equal(log_r.argmax(-1), labels)
    eps = LABEL_SMOOTHING
    assert math.isclose(float(log_r[0, 0].exp()), 1 - eps + eps / 3, rel_tol=1e-6)
    assert math.isclose(float(log_r[0, 1].exp()), eps / 3, rel_tol=1e-5)
    with pytest.raises(ValueError, match="smoothing must be in"):
        soft_labels(labels, 3, torch.float32, smoothing=0.0)
    # images (N, H, W) are flattened: one label per node
    assert mixture_labels(x.reshape(60, 3, 4), (60,), 2, seed=0).shape == (60,)


class Decoder(nn.Module):
    def __init__(self, D: int, P: int, hidden: int = 32):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(D, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh(),
                                 nn.Linear(hidden, P))
        self.log_scale = nn.Parameter(torch.zeros(P))

    def forward(self, x):
        return self.net(x), self.log_scale.exp()


@ppl.model
def user_gmm_svae(y, decoder, K: int = 4, D: int = 2):
    """What a user writes: Dirichlet weights, a Normal prior on the component means, LogNormal scales."""
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


def warped_clusters(seed: int, N: int = 400, K: int = 4, P: int = 8):
    """K unit-sd 2-D clusters with centres on a circle of radius 4, through a random tanh MLP into P-D, noise 0.05
    (``bench/bench_svae_gmm.py``'s data, smaller)."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(K).repeat_interleave(N // K)
    angle = 2 * math.pi * labels.double() / K
    latent = 4.0 * torch.stack([angle.cos(), angle.sin()], -1) + torch.randn(N, 2, generator=g, dtype=torch.float64)
    w1 = torch.randn(2, 32, generator=g, dtype=torch.float64) / 2.0
    w2 = torch.randn(32, P, generator=g, dtype=torch.float64) / 32 ** 0.5 * 2.0
    y = torch.tanh(latent @ w1) @ w2 + 0.05 * torch.randn(N, P, generator=g, dtype=torch.float64)
    return y.float(), labels


def _fit(y, seed=0, **options):
    torch.manual_seed(seed)
    decoder = Decoder(2, y.shape[1])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return ppl.infer(user_gmm_svae, y, model_kwargs={"decoder": decoder}, progress=False, seed=seed,
                         num_steps=300, **options)


def test_user_gmm_svae_separates_warped_clusters_with_defaults():
    # 400 points, 300 steps: measured ARI 0.954 with the defaults (6.7 s CPU, one thread), 0.488 with warmup=0 (the
    # old defaults; 3.6 s CPU). Thresholds 0.9 and 0.8.
    y, truth = warped_clusters(seed=0)
    post = _fit(y)
    assert post.plan.backend == "svae" and dict(post.plan.options)["warmup"] == 400
    assert "warmup=400" in post.plan.explain()
    ours = _ari(truth, post.marginals("z").argmax(-1))
    old = _ari(truth, _fit(y, warmup=0).marginals("z").argmax(-1))
    assert ours >= 0.9, f"ARI {ours:.3f} with the defaults (warmup=0: {old:.3f})"
    assert old < 0.8, f"the old defaults reached ARI {old:.3f}: this data does not tell the two apart"


def test_bad_warmup_is_refused_naming_the_option():
    y, _ = warped_clusters(seed=0, N=40)
    with pytest.raises(ValueError, match=r"warmup must be an integer >= 0.*got -1"):
        ppl.infer(user_gmm_svae, y, model_kwargs={"decoder": Decoder(2, y.shape[1])}, progress=False, warmup=-1,
                  num_steps=2)


def test_latent_targets_have_unit_within_cluster_spread_and_pretraining_reaches_them():
    from ppl.inference.svae.recognition import MLPRecognition
    from ppl.inference.svae.warmup import POTENTIAL_VARIANCE, latent_targets, pretrain_recognition

    y, truth = warped_clusters(seed=1, N=200)
    u = latent_targets(y, (200,), truth, 3)
    assert u.shape == (200, 3) and u.dtype == torch.float32
    centres = torch.stack([u[truth == k].mean(0) for k in range(4)])
    assert math.isclose(float(((u - centres[truth]) ** 2).mean()), 1.0, rel_tol=1e-4)
    # fewer features than latent dims: the missing principal components are zero columns
    assert torch.equal(latent_targets(y[:, :1], (200,), truth, 2)[:, 1], torch.zeros(200))
    torch.manual_seed(0)
    net = MLPRecognition(y.shape[1], 3)
    before = float(((net(y)[:, :3] - u) ** 2).mean().detach())
    after = pretrain_recognition(net, y, (200,), u)
    out = net(y).detach()
    assert after < 0.05 * before, (before, after)
    assert float(((out[:, :3] - u) ** 2).mean()) < 0.1            # measured ~0.01 after 200 steps
    assert float((out[:, 3:] - math.log(POTENTIAL_VARIANCE)).abs().mean()) < 0.1
    assert math.isnan(pretrain_recognition(nn.Identity(), y, (200,), u))


class ExactRecognition(nn.Module):
    """Potentials with mean y and variance 0.1: no parameters."""

    def forward(self, y):
        return torch.cat([y, torch.full_like(y, math.log(0.1))], -1)


def test_complete_data_map_puts_the_components_at_their_clusters():
    from ppl.inference.svae.backend import build_step

    g = torch.Generator().manual_seed(0)
    truth = torch.arange(3).repeat_interleave(40)
    centres = torch.tensor([[-3.0, 0.0], [3.0, 0.0], [0.0, 4.0]])
    y = centres[truth] + 0.3 * torch.randn(120, 2, generator=g)

    @ppl.model
    def model(y, decoder):
        dec = ppl.module("decoder", decoder)
        weights = ppl.sample("weights", dist.Dirichlet(y.new_ones(3)))
        with ppl.plate("components", 3):
            locs = ppl.sample("locs", dist.Normal(y.new_zeros(2), 10.0).to_event(1))
        with ppl.plate("data", y.shape[0]):
            z = ppl.sample("z", dist.Categorical(weights))
            x = ppl.sample("x", dist.Normal(locs[z], 0.5).to_event(1))
            mean, scale = dec(x)
            ppl.sample("y", dist.Normal(mean, scale).to_event(1), obs=y)

    decoder = Decoder(2, 2)
    plan = ppl.compile(model, y, decoder=decoder, backend="svae")
    with pyro_scope():
        step, _ = build_step(model, (y,), {"decoder": decoder}, plan, recognition={"x": ExactRecognition()},
                             warmup=10, seed=0)
        locs = step.guide()["locs"].detach()
    labels = step.fixed["x"].argmax(-1)
    assert _ari(truth, labels) == 1.0
    # MAP of N(0, 10^2) locs given 40 points each at N(loc, 0.5^2): the cluster mean shrunk by 1/(1 + 0.25/4000)
    want = torch.stack([y[labels == k].mean(0) for k in range(3)]) / (1 + 0.25 / (40 * 100))
    assert torch.allclose(locs, want, atol=0.02), (locs, want)
    counts = torch.bincount(labels, minlength=3).to(torch.float32)
    assert torch.allclose(step.conjugates["weights"].natparam, counts)   # Dir(1 + counts): natural parameter counts


def pyro_scope():
    import pyro

    return pyro.get_param_store().scope()


def test_latent_targets_make_every_cluster_a_unit_sphere_around_its_scaled_centre():
    from ppl.inference.svae.warmup import latent_targets

    # three tilted, stretched 2-D clusters (sd 3 along a rotated axis, 0.3 across), embedded in 4-D
    g = torch.Generator().manual_seed(3)
    truth = torch.arange(3).repeat_interleave(100)
    angles = torch.tensor([0.3, 1.2, 2.5], dtype=torch.float64)
    rot = torch.stack([torch.stack([angles.cos(), -angles.sin()], -1), torch.stack([angles.sin(), angles.cos()], -1)],
                      -1)                                                          # (3, 2, 2)
    local = torch.randn(300, 2, generator=g, dtype=torch.float64) * torch.tensor([3.0, 0.3], dtype=torch.float64)
    centres = torch.tensor([[-20.0, 0.0], [20.0, 0.0], [0.0, 25.0]], dtype=torch.float64)
    y2 = centres[truth] + (rot[truth] @ local[..., None])[..., 0]
    y = torch.cat([y2, torch.zeros(300, 2, dtype=torch.float64)], -1)
    t = latent_targets(y, (300,), truth, 2)
    assert t.dtype == torch.float64 and t.shape == (300, 2)
    u = pca_scores(y, 2)
    means = torch.stack([u[truth == k].mean(0) for k in range(3)])
    spread = float(((u - means[truth]) ** 2).mean().sqrt())
    for k in range(3):
        tk = t[truth == k]
        assert torch.allclose(tk.mean(0), means[k] / spread, atol=1e-9)
        cov = (tk - tk.mean(0)).mT @ (tk - tk.mean(0)) / 100
        assert torch.allclose(cov, torch.eye(2, dtype=torch.float64), atol=1e-9), cov
    # a cluster of at most D points, and directions without variance, are scaled by 1 / spread (not blown up)
    z = torch.cat([torch.zeros(298, dtype=torch.long), torch.ones(2, dtype=torch.long)])
    t = latent_targets(y, (300,), z, 3)
    u = torch.cat([pca_scores(y, 3), torch.zeros(300, 0, dtype=torch.float64)], -1)
    means = torch.stack([u[z == k].mean(0) for k in range(2)])
    spread = float(((u - means[z]) ** 2).mean().sqrt())
    assert torch.allclose(t[298:], u[298:] / spread, atol=1e-9)
    assert t[:, 2].abs().max() < 1e-6 * t[:, :2].abs().max()


class LinearDecoder(nn.Module):
    """``x (..., 2) -> (W x + b, one shared scale)``."""

    def __init__(self, P: int):
        super().__init__()
        self.linear = nn.Linear(2, P)
        self.log_scale = nn.Parameter(torch.zeros(()))

    def forward(self, x):
        return self.linear(x), self.log_scale.exp()


class FirstTwo(nn.Module):
    """Recognition potentials with mean y[:, :2] and variance 0.1: no parameters."""

    def forward(self, y):
        return torch.cat([y[:, :2], torch.full_like(y[:, :2], math.log(0.1))], -1)


def test_fit_likelihood_networks_is_least_squares_on_the_start_latents():
    """A linear decoder with one shared scale, the latent nodes fixed at the recognition means (the data's first two
    columns): maximum likelihood is ordinary least squares and sigma^2 = RSS / (N P) (closed form); Adam (given
    enough steps) reaches it."""
    from ppl.inference.svae.backend import build_step, fit_likelihood_networks

    g = torch.Generator().manual_seed(2)
    truth = torch.arange(3).repeat_interleave(50)
    centres = torch.tensor([[-3.0, 0.0], [3.0, 0.0], [0.0, 4.0]], dtype=torch.float64)
    x = centres[truth] + 0.5 * torch.randn(150, 2, generator=g, dtype=torch.float64)
    extra = x @ torch.tensor([[1.0, -2.0], [0.5, 1.0]], dtype=torch.float64) + 0.3 \
        + 0.2 * torch.randn(150, 2, generator=g, dtype=torch.float64)
    y = torch.cat([x, extra], -1)

    @ppl.model
    def model(y, decoder):
        dec = ppl.module("decoder", decoder)
        weights = ppl.sample("weights", dist.Dirichlet(y.new_ones(3)))
        with ppl.plate("components", 3):
            locs = ppl.sample("locs", dist.Normal(y.new_zeros(2), 10.0).to_event(1))
        with ppl.plate("data", y.shape[0]):
            z = ppl.sample("z", dist.Categorical(weights))
            x = ppl.sample("x", dist.Normal(locs[z], 0.5).to_event(1))
            mean, scale = dec(x)
            ppl.sample("y", dist.Normal(mean, scale).to_event(1), obs=y)

    torch.manual_seed(0)
    decoder = LinearDecoder(4).double()
    plan = ppl.compile(model, y, decoder=decoder, backend="svae")
    design = torch.cat([x, torch.ones(150, 1, dtype=torch.float64)], -1)
    coef = torch.linalg.lstsq(design, y).solution                                  # (3, 4)
    sigma = float(((y - design @ coef) ** 2).mean().sqrt())
    with pyro_scope():
        step, _ = build_step(model, (y,), {"decoder": decoder}, plan, recognition={"x": FirstTwo()}, warmup=10,
                             seed=0)
        store = pyro.get_param_store()
        # a given recognition network: its latents are not the data-driven start's, the decoder is left as it is
        assert float(store["decoder$$$log_scale"]) == 0.0
        final = fit_likelihood_networks(step, {"x": step.fixed["x"].argmax(-1)}, num_steps=1500, lr=0.02)
        weight, bias = store["decoder$$$linear.weight"].detach(), store["decoder$$$linear.bias"].detach()
        log_scale = store["decoder$$$log_scale"].detach()
    assert torch.allclose(weight, coef[:2].T, atol=1e-3) and torch.allclose(bias, coef[2], atol=1e-3), (weight, coef)
    assert math.isclose(float(log_scale.exp()), sigma, rel_tol=1e-3), (float(log_scale.exp()), sigma)
    # the returned loss: negative log-likelihood per data point at the fit, P (log sigma + log(2 pi) / 2 + 1/2), P = 4
    assert math.isclose(final, 4 * (math.log(sigma) + 0.5 * math.log(2 * math.pi) + 0.5), rel_tol=1e-3)


def test_gaussian_mixture_refinement_equals_scikit_learn_em_from_the_same_labels():
    """Full-covariance EM from k-means labels = scikit-learn's GaussianMixture started at the labels' M-step (same
    covariance floor, same number of rounds: its predict is one more E-step); on long parallel clusters, which
    k-means cuts across, it recovers them."""
    from sklearn.mixture import GaussianMixture

    from ppl.inference.svae.warmup import EM_REG, gaussian_mixture_labels

    g = torch.Generator().manual_seed(4)
    truth = torch.arange(3).repeat_interleave(200)
    local = torch.randn(600, 2, generator=g, dtype=torch.float64) * torch.tensor([3.0, 0.3], dtype=torch.float64)
    x = local + torch.tensor([[0.0, 0.0], [0.0, 3.0], [0.0, 6.0]], dtype=torch.float64)[truth]
    start = kmeans(x, 3, seed=0)
    onehot = torch.nn.functional.one_hot(start, 3).double()
    counts = onehot.sum(0)
    means = onehot.T @ x / counts[:, None]
    dev = x[:, None] - means
    eps = EM_REG * float(x.var(0).mean())
    covs = torch.einsum("nk,nkf,nkg->kfg", onehot, dev, dev) / counts[:, None, None] + eps * torch.eye(2)
    for rounds in (1, 5, 20):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")   # ConvergenceWarning: stopped after `rounds` on purpose
            peer = GaussianMixture(3, covariance_type="full", reg_covar=eps, tol=0.0, max_iter=rounds,
                                   weights_init=(counts / 600).numpy(), means_init=means.numpy(),
                                   precisions_init=torch.linalg.inv(covs).numpy()).fit(x.numpy())
        ours = gaussian_mixture_labels(x, start, 3, iterations=rounds + 1, tol=0.0)
        assert torch.equal(ours, torch.as_tensor(peer.predict(x.numpy()))), rounds
    refined = gaussian_mixture_labels(x, start, 3)
    assert _ari(truth, start) < 0.5 and _ari(truth, refined) == 1.0, (_ari(truth, start), _ari(truth, refined))
    # a component left with too few points for a covariance: the start is returned unchanged
    tiny = torch.cat([torch.zeros(598, dtype=torch.long), torch.tensor([1, 1])])
    assert torch.equal(gaussian_mixture_labels(x, tiny, 2), tiny)
