# %% [markdown]
# # A Gaussian-mixture structured VAE clusters the pinwheel
#
# Reproduction of the pinwheel experiment of Johnson, Duvenaud, Wiltschko, Datta & Adams,
# *Composing graphical models with neural networks for structured representations and fast
# inference* (NIPS 2016). The data are 5 curved spiral arms in 2-D: no Gaussian mixture fits them
# in data space. The GMM-SVAE (`ppl.models.svae_gmm`) puts the mixture in a learned latent space:
#
# $\pi \sim \mathrm{Dir}(\alpha)$, $(\mu_k, \Sigma_k) \sim \mathrm{NIW}(0, \kappa_0, \psi I, \nu_0)$,
# $z_n \sim \mathrm{Cat}(\pi)$, $x_n \mid z_n \sim N(\mu_{z_n}, \Sigma_{z_n})$,
# $y_n \mid x_n \sim N(f_\phi(x_n), \mathrm{diag}(\sigma^2))$ with an MLP decoder $f_\phi$.
#
# The compiler routes it to the `svae` backend: a recognition MLP emits Gaussian potentials on each
# $x_n$, local inference is mean field $q(z)q(x)$; the paper's conjugate globals, a Dirichlet $q(\pi)$
# and a normal-inverse-Wishart $q(\mu_k, \Sigma_k)$ per component (`ppl.NormalInverseWishart`), are
# updated by natural-gradient steps, and the networks are trained on the ELBO by Adam. A fit can lose a
# component in a poor local optimum, so we run a few restarts and keep the best ELBO (no labels used).
#
# Measured: the adjusted Rand index (ARI) of the argmax of $q(z)$ against the true arms.
# Run: `python tutorials/svae_gmm_pinwheel.py [--smoke] [--out DIR] [--seed S]`.

# %%
import math
import time

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

import ppl  # noqa: E402
from ppl.models import svae_gmm  # noqa: E402

from _common import parse_args, prepare  # noqa: E402  (tutorials/_common.py)

args = parse_args("GMM-SVAE on the pinwheel (Johnson et al. 2016)", ("--smoke", "--out", "--threads", "--seed"))
out = prepare(args)
sizes = dict(per_class=10, restarts=1, steps=20) if args.smoke else dict(per_class=100, restarts=3, steps=600)
start = time.perf_counter()

# %% [markdown]
# ## Data: 5 arms of points (radial sd 0.3, tangential sd 0.05, twist rate 0.25), as in the paper

# %%
sim = svae_gmm.simulate(seed=args.seed, num_classes=5, num_per_class=sizes["per_class"])
y, labels = sim.args[0], sim.truth["labels"]
print(f"pinwheel: {tuple(y.shape)} points in {sim.kwargs['K']} arms")
print(ppl.compile(svae_gmm.model, y, **sim.kwargs).explain())

# %% [markdown]
# ## Fit: restarts from different network initializations, the best ELBO kept

# %%
fit = svae_gmm.fit(sim, restarts=sizes["restarts"], num_steps=sizes["steps"])
post, kwargs = fit.posterior, fit.kwargs
ari = 1.0 - svae_gmm.recovery_errors(post, sim)["ari"]
clusters = svae_gmm.clusters(post)
print(f"final ELBO of each restart: {[round(e, 1) for e in fit.elbos]}")
print(f"cluster sizes {torch.bincount(clusters, minlength=sim.kwargs['K']).tolist()}")
print(f"adjusted Rand index vs the true arms: ARI = {ari:.3f}")

# %% [markdown]
# ## Figure: data by true arm; latent space by inferred cluster with the components' 2-sd ellipses of
# $E_q[\Sigma_k]$ around $E_q[\mu_k]$; data generated from the fitted model (posterior predictive: $z \sim E_q[\pi]$,
# $(\mu_z, \Sigma_z)$ a draw of $q$, $x \sim N(\mu_z, \Sigma_z)$, $y \sim p(y \mid x)$)

# %%
theta_draws = post.draws["theta"][0]                                             # (S, K, D, D + 1): q(theta) draws
# E_q[mu_k] (K, D) and E_q[Sigma_k] (K, D, D) as Monte-Carlo means over the S draws of the NIW q
loc, cov = ppl.NormalInverseWishart.unpack(theta_draws.mean(0))
weights = post.mean("weights")                                                   # E_q[pi] (K,)
latent = post.smoothed_means["x"]                                 # (N, D): E_q[x_n]
gen = torch.Generator().manual_seed(args.seed)
num_gen = y.shape[0]
with torch.no_grad():
    z_gen = torch.multinomial(weights, num_gen, replacement=True, generator=gen)
    pick = torch.randint(theta_draws.shape[0], (num_gen,), generator=gen)
    loc_gen, cov_gen = ppl.NormalInverseWishart.unpack(theta_draws[pick, z_gen])  # (num_gen, D), (num_gen, D, D)
    eps = torch.randn(num_gen, cov.shape[-1], generator=gen, dtype=cov.dtype)
    x_gen = loc_gen + (torch.linalg.cholesky(cov_gen) @ eps.unsqueeze(-1)).squeeze(-1)
    mean, obs_scale = kwargs["decoder"](x_gen)
    y_gen = mean + obs_scale * torch.randn(mean.shape, generator=gen, dtype=mean.dtype)
print(f"E_q[pi] = {[round(float(w), 3) for w in weights]}")

cmap = plt.get_cmap("tab10")
fig, axes = plt.subplots(1, 3, figsize=(14, 4.6))
axes[0].scatter(y[:, 0], y[:, 1], c=[cmap(int(k)) for k in labels], s=8)
axes[0].set_title("data, coloured by true arm", fontsize=10)
axes[1].scatter(latent[:, 0], latent[:, 1], c=[cmap(int(k)) for k in clusters], s=8)
angle = torch.linspace(0, 2 * math.pi, 100, dtype=cov.dtype)
circle = torch.stack([angle.cos(), angle.sin()], -1)
for k in range(loc.shape[0]):
    ring = loc[k] + 2 * circle @ torch.linalg.cholesky(cov[k]).mT
    axes[1].plot(ring[:, 0], ring[:, 1], color=cmap(k), lw=1.5 * (0.3 + float(weights[k]) * 3.5))
axes[1].set_title(f"latent E[x] by argmax q(z) (ARI {ari:.3f}),\n2-sd ellipses of E[Sigma_k] around E[mu_k]",
                  fontsize=10)
axes[2].scatter(y_gen[:, 0], y_gen[:, 1], c=[cmap(int(k)) for k in z_gen], s=8)
axes[2].set_title("generated: z ~ E[pi], (mu, Sigma) ~ q,\nx ~ N(mu_z, Sigma_z), y ~ p(y|x)", fontsize=10)
for ax in axes:
    ax.set_aspect("equal", adjustable="datalim")
fig.tight_layout()
fig.savefig(out / "svae_gmm_pinwheel.png", dpi=110)
plt.close(fig)

fig, ax = plt.subplots(figsize=(5, 3.4))
ax.plot(post.history)
ax.set_yscale("symlog")
ax.set_xlabel("Adam step")
ax.set_ylabel("-ELBO (best restart)")
fig.tight_layout()
fig.savefig(out / "svae_gmm_elbo.png", dpi=110)
plt.close(fig)
print(f"figures in {out}/ (svae_gmm_pinwheel.png, svae_gmm_elbo.png); wall time {time.perf_counter() - start:.0f} s")
