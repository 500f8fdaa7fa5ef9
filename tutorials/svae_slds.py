# %% [markdown]
# # A switching-LDS structured VAE segments regimes seen through a nonlinear map
#
# The SLDS-SVAE of Johnson, Duvenaud, Wiltschko, Datta & Adams, *Composing graphical models with
# neural networks for structured representations and fast inference* (NIPS 2016), on synthetic data
# with known switches. A 2-D latent path rotates counter-clockwise or clockwise (0.3 rad per step),
# the direction switching by a sticky Markov chain (mean dwell 20 steps); each step is observed through
# a fixed random nonlinear map into 10 dimensions, plus noise. The model (`ppl.models.svae_slds`):
#
# $z_t \mid z_{t-1} \sim \mathrm{Cat}(P_{z_{t-1}})$, $x_t \mid x_{t-1}, z_t \sim N(A_{z_t} x_{t-1}, Q)$,
# $y_t \sim N(f_\phi(x_t), \sigma^2 I)$ with an MLP decoder $f_\phi$,
#
# written with `ppl.switching_chain`. The compiler routes it to the `svae` backend: a recognition MLP
# emits Gaussian potentials on each $x_t$; local inference is structured mean field $q(z)q(x)$
# (HMM forward-backward alternating with a Kalman smoother); $A_k$, $P$ and the networks are trained on
# the ELBO. Neither the map nor the latent coordinates are known to the model.
#
# Measured: segmentation accuracy of the argmax of $q(z_t)$ against the true regimes, up to relabelling.
# Run: `python tutorials/svae_slds.py [--smoke] [--out DIR] [--seed S]`.

# %%
import math
import time

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

import ppl  # noqa: E402
from ppl.models import svae_slds  # noqa: E402

from _common import parse_args, prepare  # noqa: E402  (tutorials/_common.py)

args = parse_args("SLDS-SVAE: segmentation of switching rotations", ("--smoke", "--out", "--threads", "--seed"))
out = prepare(args)
sizes = dict(N=2, T=12, steps=10) if args.smoke else dict(N=32, T=100, steps=400)
start = time.perf_counter()

# %% [markdown]
# ## Data: N sequences of T steps, K = 2 regimes, P = 10 observed dimensions

# %%
sim = svae_slds.simulate(seed=args.seed, N=sizes["N"], T=sizes["T"])
y, truth_z, truth_x = sim.args[0], sim.truth["s_z"], sim.truth["s_x"]
K = sim.kwargs["K"]
switches = int((truth_z[:, 1:] != truth_z[:, :-1]).sum())
print(f"observations {tuple(y.shape)}; {switches} regime switches in total")
print(ppl.compile(svae_slds.model, y, **sim.kwargs).explain())

# %% [markdown]
# ## Fit

# %%
opts = svae_slds.infer_options(sim, num_steps=sizes["steps"])
fit_start = time.perf_counter()
post = ppl.infer(svae_slds.model, y, model_kwargs=sim.kwargs, progress=False, **opts)
fit_time = time.perf_counter() - fit_start
accuracy = 1.0 - svae_slds.recovery_errors(post, sim)["segmentation"]
perm = svae_slds.best_relabelling(svae_slds.segmentation(post), truth_z, K)
states = perm[svae_slds.segmentation(post)]             # inferred regimes under the true labels
probs = post.marginals("s_z")[..., perm.argsort()]      # q(z_t = k), k in the true labelling
A = post.point["dynamics"]
angles = [torch.linalg.eigvals(a.double()).angle().abs().max().item() for a in A]
print(f"-ELBO {post.history[0]:.0f} -> {post.history[-1]:.0f} in {sizes['steps']} steps ({fit_time:.0f} s, "
      f"{1000 * fit_time / sizes['steps']:.0f} ms/step)")
print(f"fitted regimes rotate by {[round(a, 3) for a in angles]} rad/step in the learned latent (true 0.3)")
print(f"segmentation accuracy (argmax q(z), up to relabelling): {accuracy:.3f}")

# %% [markdown]
# ## Figure 1: true regimes, inferred regimes (relabelled) and q(z_t = 1), for the first sequences

# %%
shown = min(4, y.shape[0])
fig, axes = plt.subplots(shown, 1, figsize=(10, 1.5 * shown + 0.6), squeeze=False)
for i in range(shown):
    ax = axes[i, 0]
    ax.imshow(torch.stack([truth_z[i], states[i]]).float(), aspect="auto", cmap="coolwarm", vmin=0, vmax=K - 1,
              extent=(-0.5, y.shape[1] - 0.5, 1.5, -0.5), interpolation="nearest")
    ax.set_yticks([0, 1], ["true", "inferred"])
    ax2 = ax.twinx()
    ax2.plot(probs[i, :, 1], color="k", lw=1)
    ax2.set_ylim(-0.05, 1.05)
    ax2.set_ylabel("q(z = 1)")
    ax.set_title(f"sequence {i}", fontsize=9)
axes[-1, 0].set_xlabel("time step")
fig.suptitle(f"SLDS-SVAE segmentation: accuracy {accuracy:.3f}")
fig.tight_layout()
fig.savefig(out / "svae_slds_states.png", dpi=110)
plt.close(fig)

# %% [markdown]
# ## Figure 2: latent trajectories of one sequence, true x_t and inferred E_q[x_t], coloured by regime
# The learned latent is the true one up to an unknown smooth map (here close to a rotation, a reflection
# and a scaling), so we compare shapes and the phase: its slope is the rotation direction, which flips at
# every switch.

# %%
means = post.smoothed_means["s_x"]
i, steps = 0, min(60, y.shape[1])
colors = plt.get_cmap("coolwarm")
fig, axes = plt.subplots(1, 3, figsize=(14, 4.2))
for ax, path, lab, title in ((axes[0], truth_x[i, :steps], truth_z[i, :steps], "true path x_t"),
                             (axes[1], means[i, :steps], states[i, :steps], "inferred E_q[x_t]")):
    ax.plot(path[:, 0], path[:, 1], color="0.6", lw=0.8)
    ax.scatter(path[:, 0], path[:, 1], c=[colors(float(k) / max(K - 1, 1)) for k in lab], s=14)
    ax.set_aspect("equal", adjustable="datalim")
    ax.set_title(f"{title}, sequence {i}, steps 0-{steps - 1}", fontsize=10)
for path, style, name in ((truth_x[i], "k-", "true"), (means[i], "C2--", "inferred")):
    centred = path - path.mean(0)
    phase = torch.atan2(centred[:, 1], centred[:, 0]).numpy()
    unwrapped = torch.tensor(phase)
    jumps = torch.diff(unwrapped)
    unwrapped[1:] = unwrapped[0] + torch.cumsum(jumps - 2 * math.pi * torch.round(jumps / (2 * math.pi)), 0)
    axes[2].plot(unwrapped - unwrapped[0], style, lw=1.2, label=name)
for t in torch.nonzero(truth_z[i, 1:] != truth_z[i, :-1]).flatten().tolist():
    axes[2].axvline(t + 0.5, color="0.8", lw=0.8)
axes[2].set_xlabel("time step")
axes[2].set_ylabel("unwrapped phase (rad)")
axes[2].set_title("phase of the path (grey: true switches)", fontsize=10)
axes[2].legend()
fig.suptitle("regime colours: blue = counter-clockwise (true 0), red = clockwise (true 1)", fontsize=10)
fig.tight_layout()
fig.savefig(out / "svae_slds_latent.png", dpi=110)
plt.close(fig)
print(f"figures in {out}/ (svae_slds_states.png, svae_slds_latent.png); wall time {time.perf_counter() - start:.0f} s")
