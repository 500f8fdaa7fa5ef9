# %% [markdown]
# # A GAN on a ring of 8 Gaussians: mode coverage over training
#
# An implicit model: $z_n \sim N(0, I_{16})$, $x_n = G_\theta(z_n)$ with $G_\theta$ an MLP. Written in the DSL as
# `ppl.sample("x", ppl.Implicit(G, z), obs=x)`: a simulator, cheap to sample, with no density. The compiler
# routes it to the `adversarial` backend: a discriminator learns the log density ratio data / model and the
# generator is trained through its draws (non-saturating GAN; `divergence="kl"` / `"reverse_kl"` for f-GANs).
#
# Data: the mode-collapse benchmark of Metz et al. (2017), 8 Gaussians of sd 0.05 on a circle of radius 2.
# Measured: how many modes hold at least 1 % of 2000 fresh draws within 3 sd, and the fraction of draws within
# 3 sd of a mode (targets: 8 modes, >= 90 %). Run: `python tutorials/gan_ring.py [--smoke] [--out DIR]`.

# %%
import time

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

import ppl  # noqa: E402
from ppl.models import gan  # noqa: E402

from _common import parse_args, prepare  # noqa: E402  (tutorials/_common.py)

args = parse_args("GAN on a ring of 8 Gaussians", ("--smoke", "--out", "--threads", "--seed"))
out = prepare(args)
lengths = (10, 20) if args.smoke else (500, 1000, 2000, 4000)
start = time.perf_counter()

# %% [markdown]
# ## Data and plan

# %%
sim = gan.simulate(seed=args.seed, N=300 if args.smoke else 2000)
x, centers, sd = sim.args[0], sim.truth["centers"], sim.truth["sd"]
print(ppl.compile(gan.model, *sim.args, **sim.kwargs).explain())

# %% [markdown]
# ## Coverage over training: fits of increasing length from the same start
# Each fit starts from the same untrained generator and seed, so the fit of n steps is the first n steps of the
# longest one (`ppl.infer` trains copies of the networks). Stopping and resuming instead (continuing from
# `post.kwargs["generator"]`) restarts Adam's moments and the game visibly jumps: we measure uninterrupted runs.

# %%
kwargs, snapshots, coverage = dict(sim.kwargs), [], []
for steps in lengths:
    post = ppl.infer(gan.model, x, model_kwargs=kwargs, progress=False, seed=args.seed,
                     **{**gan.infer_options(sim), "num_steps": steps})
    draws = post.predictive(1, seed=1)["x"][0]
    cov = gan.mode_coverage(draws, centers, sd)
    snapshots.append(draws)
    coverage.append(cov)
    print(f"after {steps:5d} steps: modes covered {cov.modes} / 8, within 3 sd: {cov.high_quality:.1%}")
final = coverage[-1]
print(f"final: modes covered {final.modes} / 8, within 3 sd {final.high_quality:.1%} "
      f"(targets 8 and >= 90%); {time.perf_counter() - start:.0f} s")

# %% [markdown]
# ## Figures: draws over training, and coverage

# %%
fig, axes = plt.subplots(1, len(lengths), figsize=(2.6 * len(lengths), 2.8))
for steps, ax, draws in zip(lengths, axes, snapshots):
    ax.scatter(x[:, 0], x[:, 1], s=2, c="0.8")
    ax.scatter(draws[:, 0], draws[:, 1], s=2, c="C3")
    ax.set_title(f"{steps} steps", fontsize=9)
    ax.set_xlim(-2.6, 2.6)
    ax.set_ylim(-2.6, 2.6)
    ax.set_aspect("equal")
    ax.axis("off")
fig.tight_layout()
fig.savefig(out / "gan_ring_samples.png", dpi=110)

fig, ax = plt.subplots(figsize=(5, 3))
ticks = list(lengths)
ax.plot(ticks, [c.modes for c in coverage], "o-", label="modes covered (of 8)")
ax2 = ax.twinx()
ax2.plot(ticks, [100 * c.high_quality for c in coverage], "s--", c="C1", label="% within 3 sd")
ax2.axhline(90, c="C1", lw=0.5)
ax.set_xlabel("training steps")
ax.set_ylabel("modes")
ax2.set_ylabel("% draws within 3 sd")
fig.legend(loc="lower right", fontsize=8)
fig.tight_layout()
fig.savefig(out / "gan_ring_coverage.png", dpi=110)
print(f"figures in {out}")
