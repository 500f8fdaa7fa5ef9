# %% [markdown]
# # An RBM on scikit-learn's digits: log-likelihood by annealed importance sampling, next to a mixture and a VAE
#
# A restricted Boltzmann machine with 64 visible and 50 hidden units (`ppl.models.rbm`), written as
# `ppl.sample("v", ppl.RBM(W, b, c), obs=v)`: its log-density is known up to the partition function. The
# compiler routes it to the `energy` backend: contrastive divergence (here CD-10; persistent CD is the default)
# with block Gibbs sampling, then log Z by annealed importance sampling (AIS). We compare held-out log-likelihoods per digit with
#
# - a mixture of 20 products of Bernoullis fitted by EM (exact log-likelihood), and
# - the binary-latent VAE of `tutorials/discrete_vae_digits.py` (its ELBO, a lower bound).
#
# Run: `python tutorials/rbm_digits.py [--smoke] [--out DIR]`.

# %%
import time

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

import ppl  # noqa: E402
from ppl.inference.discrete_vi.backend import elbo_of  # noqa: E402
from ppl.inference.energy import ais  # noqa: E402
from ppl.inference.energy.backend import base_bias, log_likelihood  # noqa: E402
from ppl.models import discrete_vae, rbm  # noqa: E402

from _common import parse_args, prepare  # noqa: E402  (tutorials/_common.py)

args = parse_args("RBM on digits: AIS log-likelihood vs a Bernoulli mixture and a VAE",
                  ("--smoke", "--out", "--threads", "--seed"))
out = prepare(args)
steps, hidden, n_train = (20, 8, 300) if args.smoke else (3000, 50, 1500)
start = time.perf_counter()

images, labels = discrete_vae.load_digits()
perm = torch.randperm(images.shape[0], generator=torch.Generator().manual_seed(args.seed))
train, test = images[perm[:n_train]], images[perm[1500:]]
print(f"train {tuple(train.shape)}, held out {tuple(test.shape)}")

# %% [markdown]
# ## The RBM: CD-10, then AIS (1000 temperatures, 100 runs; the base is the data's pixel means)
# (PCD-1 with the same Adam steps reached -19.8 nats per held-out digit, CD-10 -17.0.)

# %%
print(ppl.compile(rbm.model, train, num_hidden=hidden).explain())
post = ppl.infer(rbm.model, train, model_kwargs=dict(num_hidden=hidden), progress=False, num_steps=steps,
                 lr=0.01, batch_size=100, method="cd", gibbs_steps=10, seed=args.seed)
fn = ppl.RBM(post.params["weights"], post.params["visible_bias"], post.params["hidden_bias"])
params = ais.RBMParams(fn.weights.detach(), fn.visible_bias.detach(), fn.hidden_bias.detach())
log_z = ais.ais_log_z(params, 1000, 100, base_bias(train), torch.Generator().manual_seed(args.seed)).log_z
results = {"RBM (AIS)": (log_likelihood(fn, train, log_z) / train.shape[0], log_likelihood(fn, test, log_z) / test.shape[0])}
print(f"RBM: {post.log_evidence.kind}; again with another seed: log Z = {log_z:.3f}")

# %% [markdown]
# ## A mixture of Bernoullis by EM
# $p(x) = \sum_k \pi_k \prod_p \mu_{kp}^{x_p} (1 - \mu_{kp})^{1 - x_p}$; E-step: responsibilities, M-step:
# weighted means (a Beta(2, 2) prior keeps $\mu$ off 0 and 1).


# %%
def mixture_log_lik(x, weights, means):
    """log p(x_n) per image and the log joint per component: (N,), (N, K)."""
    joint = x @ torch.log(means).T + (1 - x) @ torch.log1p(-means).T + torch.log(weights)
    return torch.logsumexp(joint, 1), joint


def fit_mixture(x, K=20, iters=100, seed=0):
    """EM from K random images' smoothed pixels: (weights (K,), means (K, P))."""
    gen = torch.Generator().manual_seed(seed)
    means = (x[torch.randperm(x.shape[0], generator=gen)[:K]] + 1.0) / 3.0
    weights = torch.full((K,), 1.0 / K, dtype=x.dtype)
    for _ in range(iters):
        ll, joint = mixture_log_lik(x, weights, means)
        resp = torch.exp(joint - ll[:, None])
        counts = resp.sum(0)
        weights = counts / counts.sum()
        means = (resp.T @ x + 1.0) / (counts[:, None] + 2.0)
    return weights, means


weights, means = fit_mixture(train.double(), iters=10 if args.smoke else 200, seed=args.seed)
results["Bernoulli mixture (EM, exact)"] = (float(mixture_log_lik(train.double(), weights, means)[0].mean()),
                                            float(mixture_log_lik(test.double(), weights, means)[0].mean()))

# %% [markdown]
# ## The binary-latent VAE (20 bits, RELAX): its ELBO

# %%
decoder = discrete_vae.make_decoder(20, 64, hidden=128, seed=args.seed)
vae = ppl.infer(discrete_vae.model, train, model_kwargs=dict(decoder=decoder, K=20), progress=False,
                num_steps=10 if args.smoke else 3000, lr=3e-3, batch_size=100, seed=args.seed)
results["binary VAE (ELBO, a bound)"] = (float(vae.log_evidence) / train.shape[0],
                                         elbo_of(vae, test, decoder=vae.kwargs["decoder"], K=20) / test.shape[0])

print(f"{'model':<32} {'train':>9} {'held out':>9}  (nats per digit)")
for name, (tr, te) in results.items():
    print(f"{name:<32} {tr:9.2f} {te:9.2f}")
print(f"total {time.perf_counter() - start:.0f} s")

# %% [markdown]
# ## Figures: log-likelihoods, and RBM samples (Gibbs chains)

# %%
fig, ax = plt.subplots(figsize=(6, 3))
names = list(results)
ax.barh(names, [results[n][1] for n in names], color=["C0", "C1", "C2"])
ax.set_xlabel("held-out log-likelihood (nats per digit)")
fig.tight_layout()
fig.savefig(out / "rbm_digits_loglik.png", dpi=110)

torch.manual_seed(args.seed)
samples = fn.gibbs(torch.bernoulli(torch.full((16, 64), 0.5)), 20 if args.smoke else 1000).reshape(16, 8, 8)
fig, axes = plt.subplots(2, 8, figsize=(8, 2.2))
for ax, img in zip(axes.flat, samples):
    ax.imshow(img.detach(), cmap="gray_r")
    ax.axis("off")
fig.tight_layout()
fig.savefig(out / "rbm_digits_samples.png", dpi=110)
print(f"figures in {out}")
