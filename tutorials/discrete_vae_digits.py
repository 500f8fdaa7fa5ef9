# %% [markdown]
# # A VAE with 20 binary latents on scikit-learn's digits: REINFORCE, concrete, REBAR, RELAX
#
# $b_n \sim \mathrm{Bernoulli}(1/2)^{20}$, $x_n \sim \mathrm{Bernoulli}(\sigma(f_\theta(b_n)))^{64}$ on the 8x8
# digits binarized at 8/16 (`ppl.models.discrete_vae`). The latent has $2^{20}$ joint states: the compiler
# sees a finite site too large to enumerate and routes the model to `discrete_vi` (an amortized Bernoulli
# encoder). The encoder's gradient $\nabla_\alpha E_q[\log p(x, b)]$ needs an estimator:
#
# - REINFORCE with a running-mean baseline (unbiased, high variance),
# - the concrete / Gumbel-softmax relaxation (low variance, biased),
# - REBAR (the relaxation as a control variate, unbiased) and RELAX (plus a learned network, unbiased).
#
# We train one model per estimator, report its held-out ELBO, and at the RELAX fit measure each estimator's
# gradient variance (and bias against the mean of the unbiased ones) side by side on 100 held-out digits.
# Run: `python tutorials/discrete_vae_digits.py [--smoke] [--out DIR]`.

# %%
import time

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

import ppl  # noqa: E402
from ppl.inference.discrete_vi.backend import elbo_of, gradient_variances  # noqa: E402
from ppl.models import discrete_vae  # noqa: E402

from _common import parse_args, prepare  # noqa: E402  (tutorials/_common.py)

args = parse_args("binary-latent VAE on digits: gradient estimators", ("--smoke", "--out", "--threads", "--seed"))
out = prepare(args)
steps, n_train, n_grad = (10, 200, 10) if args.smoke else (3000, 1500, 200)
K, start = 20, time.perf_counter()

# %% [markdown]
# ## Data: 1797 digits, 1500 to train (all of them in the full run), the rest held out

# %%
images, labels = discrete_vae.load_digits()
perm = torch.randperm(images.shape[0], generator=torch.Generator().manual_seed(args.seed))
train, test = images[perm[:n_train]], images[perm[1500:]]
print(f"train {tuple(train.shape)}, held out {tuple(test.shape)}")
decoder = discrete_vae.make_decoder(K, 64, hidden=128, seed=args.seed)
print(ppl.compile(discrete_vae.model, train, decoder=decoder, K=K).explain())

# %% [markdown]
# ## One fit per estimator; ELBO per held-out digit
# `elbo_of` runs the trained encoder and decoder on the held-out digits (10 draws of q per digit, entropy
# exact).

# %%
posts, test_elbo = {}, {}
for estimator in ("reinforce", "gumbel", "rebar", "relax"):
    t = time.perf_counter()
    post = ppl.infer(discrete_vae.model, train, model_kwargs=dict(decoder=decoder, K=K), progress=False,
                     estimator=estimator, num_steps=steps, lr=3e-3, batch_size=100, seed=args.seed)
    held = elbo_of(post, test, decoder=post.kwargs["decoder"], K=K)
    posts[estimator], test_elbo[estimator] = post, held / test.shape[0]
    print(f"{estimator:>9}: train ELBO {float(post.log_evidence) / train.shape[0]:8.2f}, held-out ELBO "
          f"{test_elbo[estimator]:8.2f} nats per digit ({time.perf_counter() - t:.0f} s)")

# %% [markdown]
# ## Gradient variance of the four estimators at the RELAX fit (100 held-out digits)

# %%
rows = torch.arange(min(100, train.shape[0]))
var = gradient_variances(posts["relax"], rows, n=n_grad, tune_steps=10 if args.smoke else 200)
ref = var["reinforce"]["variance"]
print(f"{'estimator':>9}  {'variance':>12}  {'ratio to REINFORCE':>18}  {'bias':>6}")
for name, v in var.items():
    print(f"{name:>9}  {v['variance']:12.4g}  {v['variance'] / ref:18.3f}  {v['bias']:6.3f}")
print(f"total {time.perf_counter() - start:.0f} s")

# %% [markdown]
# ## Figures

# %%
fig, axes = plt.subplots(1, 2, figsize=(9, 3))
names = list(var)
axes[0].bar(names, [var[n]["variance"] / ref for n in names], color=["C0", "C1", "C2", "C3"])
axes[0].set_yscale("log")
axes[0].set_ylabel("gradient variance / REINFORCE's")
axes[1].scatter(list(test_elbo), list(test_elbo.values()), c=["C0", "C1", "C2", "C3"], s=60)
axes[1].set_ylabel("held-out ELBO (nats / digit; higher is better)")
fig.tight_layout()
fig.savefig(out / "discrete_vae_estimators.png", dpi=110)

with torch.no_grad():
    codes = (torch.rand(16, K, generator=torch.Generator().manual_seed(1)) < 0.5).float()
    means = torch.sigmoid(posts["relax"].kwargs["decoder"](codes)).reshape(16, 8, 8)
fig, axes = plt.subplots(2, 8, figsize=(8, 2.2))
for ax, img in zip(axes.flat, means):
    ax.imshow(img, cmap="gray_r")
    ax.axis("off")
fig.tight_layout()
fig.savefig(out / "discrete_vae_samples.png", dpi=110)
print(f"figures in {out}")
