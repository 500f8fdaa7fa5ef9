# %% [markdown]
# # A structured VAE with linear dynamics forecasts a bouncing dot; a plain VAE cannot
#
# Reproduction of the "bouncing dot" experiment of Johnson, Duvenaud, Wiltschko, Datta & Adams,
# *Composing graphical models with neural networks for structured representations and fast
# inference* (NIPS 2016). Each video shows a dot moving at constant speed along a line of P pixels
# and bouncing at its ends; a frame is the line's image (a Gaussian bump at the dot's position, plus
# noise). Two models share the same decoder and recognition MLPs:
#
# - **LDS-SVAE** (`ppl.models.svae_lds`): per video, a latent path
#   $x_t = A x_{t-1} + w_t$ in $\mathbb{R}^2$, frames $y_t \sim N(f_\phi(x_t), \sigma^2 I)$.
#   The compiler routes it to the `svae` backend: the recognition net emits Gaussian potentials on
#   each $x_t$, a Kalman smoother combines them with the dynamics, $A$ is trained (MAP) with the nets.
# - **plain VAE** (`ppl.models.vae`): $x_t \sim N(0, I)$ i.i.d. for every frame, no dynamics.
#
# Test: on held-out videos, condition on the first half (the second half's frames are masked, so they
# give no recognition potential), forecast the second half by decoding the posterior mean of $x_t$,
# and compare with the true (noise-free) frames. The SVAE forecasts through its dynamics; the VAE can
# only decode its prior mean. Run: `python tutorials/svae_lds_dot.py [--smoke] [--out DIR]`.

# %%
import time

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

import ppl  # noqa: E402
from ppl.models import svae_lds, vae  # noqa: E402

from _common import parse_args, prepare  # noqa: E402  (tutorials/_common.py)

args = parse_args("LDS-SVAE vs plain VAE on bouncing-dot videos", ("--smoke", "--out", "--threads", "--seed"),
                  helps={"--threads": "torch threads (the 2x2 Kalman algebra is fastest on 1)"})
out = prepare(args)
sizes = (dict(N=8, T=12, num_test=4, steps=30) if args.smoke else dict(N=64, T=40, num_test=64, steps=1000))
P, D, start = 16, 2, time.perf_counter()

# %% [markdown]
# ## Data: N videos of T frames, P = 16 pixels; the dot moves one pixel per frame
# The dot's position is a triangle wave of period 2(P-1) = 30 frames: angular frequency
# $\omega = \pi / 15 \approx 0.209$ rad per frame. `simulate` also draws held-out videos.

# %%
sim = svae_lds.simulate(seed=args.seed, N=sizes["N"], T=sizes["T"], P=P, D=D, num_test=sizes["num_test"])
y = sim.args[0]
test, clean = sim.truth["test_frames"], sim.truth["test_clean"]
T, half = y.shape[1], y.shape[1] // 2
print(f"training videos {tuple(y.shape)}, held-out {tuple(test.shape)}, conditioning on {half} frames")

# %% [markdown]
# ## Fit the LDS-SVAE
# The dynamics start as a slow rotation (0.1 rad/frame): from A = I (a random walk) gradient descent
# tends to stop at real eigenvalues, i.e. no oscillation.

# %%
print(ppl.compile(svae_lds.model, y, **sim.kwargs).explain())
lds_kwargs = sim.kwargs
lds_opts = svae_lds.infer_options(sim)
lds_opts["num_steps"] = sizes["steps"]
post_lds = ppl.infer(svae_lds.model, y, model_kwargs=lds_kwargs, progress=False, **lds_opts)
angles = svae_lds.rotation_angles(post_lds.point["dynamics"])
print(f"SVAE: -ELBO {post_lds.history[0]:.0f} -> {post_lds.history[-1]:.0f}; eigen-angles of A {angles.tolist()} "
      f"rad/frame (true omega {sim.truth['frequency']:.4f})")

# %% [markdown]
# ## Fit the plain VAE on the same frames, treated as i.i.d. (same decoder and encoder sizes)

# %%
nets = vae.make_networks(D, P, seed=args.seed)
vae_kwargs = {"decoder": nets.decoder, "D": D}
flat = y.reshape(-1, P)
post_vae = ppl.infer(vae.model, flat, model_kwargs=vae_kwargs, progress=False, num_steps=sizes["steps"], lr=0.01,
                     recognition={"x": nets.encoder})
print(f"VAE:  -ELBO {post_vae.history[0]:.0f} -> {post_vae.history[-1]:.0f}")

# %% [markdown]
# ## Forecast the second half of held-out videos from their first half

# %%
pred_lds = svae_lds.predict_frames(post_lds, test, half, **lds_kwargs)
mask = svae_lds.prefix_mask(test.shape[0], T, half).reshape(-1)
pred_vae = vae.reconstruct(post_vae, test.reshape(-1, P), mask=mask, **vae_kwargs).reshape(test.shape)
mse_lds = svae_lds.forecast_mse(pred_lds.frames, clean, half)
mse_vae = svae_lds.forecast_mse(pred_vae, clean, half)
mse_flat = svae_lds.forecast_mse(clean.mean((0, 1)).expand_as(clean), clean, half)
print(f"forecast MSE of frames {half}..{T - 1} vs the true frames: SVAE {mse_lds:.5f}, VAE {mse_vae:.5f}, "
      f"average frame {mse_flat:.5f}")
print(f"MSE(SVAE) / MSE(VAE) = {mse_lds / mse_vae:.4f}")

# %% [markdown]
# ## Figure: true vs forecast frames (time runs left to right; the red line ends the conditioning)

# %%
shown = min(3, test.shape[0])
fig, axes = plt.subplots(3, shown, figsize=(4.2 * shown, 5.4), squeeze=False)
for j in range(shown):
    for i, (label, frames) in enumerate([("true", clean), ("LDS-SVAE", pred_lds.frames), ("plain VAE", pred_vae)]):
        ax = axes[i, j]
        ax.imshow(frames[j].T.cpu(), aspect="auto", cmap="gray", vmin=-0.1, vmax=1.1, origin="lower")
        ax.axvline(half - 0.5, color="r", linewidth=2)
        ax.set_title(f"{label}, video {j}", fontsize=9)
        ax.set_xlabel("frame t" if i == 2 else "")
        ax.set_ylabel("pixel" if j == 0 else "")
fig.suptitle(f"forecast MSE: SVAE {mse_lds:.4f}, VAE {mse_vae:.4f} (ratio {mse_lds / mse_vae:.3f})")
fig.tight_layout()
fig.savefig(out / "svae_lds_forecast.png", dpi=110)
plt.close(fig)

# %% [markdown]
# ## Figure: the SVAE's latent trajectory
# Left: the posterior mean path of held-out videos in the latent plane (solid: conditioned on frames;
# dashed: forecast by the dynamics alone), coloured by the dot's true position. Right: training curves.

# %%
fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4.6))
lat, pos = pred_lds.latent_mean.cpu(), sim.truth["test_positions"].cpu()
for j in range(shown):
    ax.plot(lat[j, :half, 0], lat[j, :half, 1], "-", color="0.5", linewidth=1)
    ax.plot(lat[j, half - 1:, 0], lat[j, half - 1:, 1], "--", color="0.5", linewidth=1)
    sc = ax.scatter(lat[j, :, 0], lat[j, :, 1], c=pos[j], cmap="viridis", vmin=0, vmax=P - 1, s=18, zorder=3)
    ax.annotate(f"video {j}, t=0", lat[j, 0].tolist(), fontsize=8)
fig.colorbar(sc, ax=ax, label="true dot position (pixel)")
ax.set_xlabel("$x_1$")
ax.set_ylabel("$x_2$")
ax.set_title(f"E[x_t | first {half} frames]; A rotates by {float(angles[-1]):.3f} rad/frame")
ax.set_aspect("equal", adjustable="datalim")
frames_seen = y.shape[0] * T
curves = {"LDS-SVAE": -torch.tensor(post_lds.history) / frames_seen,
          "plain VAE": -torch.tensor(post_vae.history) / frames_seen}
for label, curve in curves.items():
    ax2.plot(curve, label=label)
settled = torch.cat([c[len(c) // 10:] for c in curves.values()])
ax2.set_ylim(float(settled.min()) - 2, float(settled.max()) + 2)  # the first steps start far below
ax2.set_xlabel("Adam step")
ax2.set_ylabel("ELBO per frame (training, nats)")
ax2.legend()
fig.tight_layout()
fig.savefig(out / "svae_lds_latent.png", dpi=110)
plt.close(fig)
print(f"figures in {out}/ (svae_lds_forecast.png, svae_lds_latent.png); wall time {time.perf_counter() - start:.0f} s")
