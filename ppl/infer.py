"""``ppl.infer``: compile a model, run the chosen (or requested) backend, return a Posterior."""
from __future__ import annotations

import contextlib
import inspect
from typing import Callable

import torch

import pyro

from .backends import get_backend
from .compiler import compile as compile_model
from .posterior import Posterior
from .primitives import copy_modules
from .validate import (check_backend_options, check_conditioned, check_device, check_model, check_options,
                       check_plan, check_traced)


def _to_device(value, device):
    return value.to(device) if isinstance(value, torch.Tensor) else value


def _backend_options(backend, options: dict) -> dict:
    """Keep the options the backend's ``run`` accepts; reject the rest by name."""
    accepted = inspect.signature(backend.run).parameters
    unknown = [k for k in options if k not in accepted]
    if unknown:
        names = [p for p in accepted if p not in ("model", "args", "kwargs", "plan", "unused")]
        raise TypeError(f"backend '{backend.name}' does not take option(s) {', '.join(unknown)}; "
                        f"it takes: {', '.join(names)}")
    return options


@contextlib.contextmanager
def isolated(seed: int):
    """Seeded RNG and a fresh Pyro parameter store; both restored on exit (no global leakage)."""
    with torch.random.fork_rng(), pyro.get_param_store().scope():
        torch.manual_seed(seed)
        yield


def infer(model: Callable, *args, backend: str = "auto", num_steps: int | None = None,
          num_samples: int | None = None, device: str | torch.device | None = None, seed: int = 0,
          progress: bool = True, model_kwargs: dict | None = None, **options) -> Posterior:
    """Fit ``model(*args, **model_kwargs)`` and return its Posterior.

    Args:
        model: a model function.
        *args: the data (tensors are moved to ``device``).
        backend: "auto" (the compiler's rules decide; ``ppl.compile(model, *args).explain()`` says which and why)
            or a backend name (``ppl.backends.backend_names()``: "exact", "svae", "svi", "mcmc", "amortized",
            "vi", "adversarial", "discrete_vi", "energy").
        num_steps: optimization steps, rounds or sweeps (every backend but mcmc); None: the backend's default.
        num_samples: posterior draws kept; None: the backend's default (below).
        device: e.g. "cuda"; tensors the model creates without a device land there too.
        seed: random seed (the global RNG state is restored afterwards).
        progress: show a progress bar.
        model_kwargs: keyword arguments of the model.
        **options: the chosen backend's options (below); an option it does not take is an error naming the ones
            it does.

    Backend options, with their defaults (``plan.options`` and ``plan.explain()`` list them for a compiled
    model; ``post.plan.options`` holds what a fit ran with):

        exact (chains and finite discrete latents marginalized exactly; globals by MAP):
            num_steps=500         at most this many L-BFGS evaluations (it stops at convergence), or Adam steps
            lr=0.05               Adam's learning rate (optimizer="adam" only)
            num_samples=100       exact posterior draws of the chains kept
            init=None             site -> initial value of a global: the first start
            optimizer='lbfgs'     or 'adam'
            restarts=3            starts in all: init, then data-driven ones (k-means); the best fit is kept
            seed=0                seed of the data-driven starts (ppl.infer passes its seed)
            checkpoint=None       a file written every checkpoint_every steps, at the end and on Ctrl-C
            checkpoint_every=100  steps between checkpoints
            resume=None           a checkpoint file of the same fit: continues it bit-identically
        svae (structured VAE: recognition potentials, exact local message passing, natural gradients):
            num_steps=1000        Adam steps
            lr=0.01               Adam's learning rate (networks and non-conjugate globals)
            num_samples=100       draws of the conjugate globals' q kept
            recognition=None      site -> torch.nn.Module replacing the default recognition network
            num_iters=3           structured mean-field iterations (mixture, switching LDS)
            init=None             site -> initial value of a global
            natgrad_step=0.5      natural-gradient step size of the conjugate globals' q, in (0, 1]
            checkpoint=None       a file written every checkpoint_every steps, at the end and on Ctrl-C
            checkpoint_every=100  steps between checkpoints
            resume=None           a checkpoint file of the same fit: continues it bit-identically
            batch_size=None       data points (sequences) per step, all processes together, scaled N/B; None: all
            warmup=400            steps (at most num_steps // 2) with each mixture's q(z) held at k-means++ labels of
                                  the data refined by Gaussian-mixture EM, after a data-driven start (default
                                  recognition net pretrained to the principal components, decoders pretrained 200
                                  Adam steps when every node is a mixture with the default recognition net,
                                  point-estimate globals at their complete-data MAP); 0: off
            seed=0                seed of the k-means restarts (ppl.infer passes its seed)
        svi (SVI on the compiled log density; chains collapsed, finite discrete latents enumerated):
            num_steps=2000        Adam steps
            lr=0.02               Adam's learning rate
            num_samples=1000      guide draws kept
            guide='normal'        AutoNormal, 'delta' (AutoDelta: a MAP point), or a guide factory
                                  (model, init_loc_fn=...) -> autoguide, e.g. ppl.flow_guide("iaf")
            init=None             site -> initial value
            checkpoint=None       a file written every checkpoint_every steps, at the end and on Ctrl-C
            checkpoint_every=100  steps between checkpoints
            resume=None           a checkpoint file of the same fit: continues it bit-identically
            batch_size=None       data-plate rows per step, all processes together, scaled N/B (global latents
                                  only); None: all
        mcmc (NUTS on the continuous latents; chains collapsed, finite discrete latents enumerated):
            num_samples=500       draws kept per chain
            warmup_steps=None     adaptation steps per chain; None: num_samples
            num_chains=None       chains (None: 2), each with its own random stream from seed
            seed=0                (ppl.infer passes its seed)
            dense_mass=False      adapt a dense inverse mass matrix (else diagonal)
            target_accept=0.8     acceptance statistic the step-size adaptation aims at
            max_tree_depth=10     at most 2^max_tree_depth - 1 leapfrog steps per draw
            resume=None           a Posterior of this backend on the same model: continue its chains
        amortized (SVI with an encoder for the local latents of a data plate, on minibatches):
            num_steps=2000        Adam steps
            lr=0.01               Adam's learning rate
            num_samples=100       draws of the globals kept
            batch_size=None       data points per step, all processes together; None: min(N, 256)
            encoder=None          site -> torch.nn.Module emitting mean and log variance of a point's latent
            init=None             site -> initial value of a global
            checkpoint=None       a file written every checkpoint_every steps, at the end and on Ctrl-C
            checkpoint_every=100  steps between checkpoints
            resume=None           a checkpoint file of the same fit: continues it bit-identically
        vi (conjugate variational Bayes: closed-form coordinate ascent, exact local messages):
            num_steps=500         coordinate-ascent sweeps at most per start
            tol=1e-06             stop when the relative ELBO change is below this
            restarts=3            data-driven starts (k-means++); the best ELBO is kept (a mixture of more than
                                  20,000 rows ranks them on 10,000 random rows and fits the best on all)
            seed=0                seed of the starts (ppl.infer passes its seed)
            num_samples=1000      draws of the globals from q kept
            checkpoint=None       a file written every checkpoint_every sweeps, at the end and on Ctrl-C
            checkpoint_every=100  sweeps between checkpoints
            resume=None           a checkpoint file of the same fit: continues it bit-identically
            batch_size=None       LDA-style admixtures: documents, mixtures with one data dim: rows per
                                  minibatch of stochastic natural-gradient VI (Hoffman et al. 2013; num_steps =
                                  passes); None: coordinate ascent (chains and factorizations: always)
            tau0=10.0             step size rho_t = (tau0 + t)^-kappa of the stochastic steps (tau0 >= 0)
            kappa=0.7             its decay, in (0.5, 1]
        adversarial (a simulator with no density, ppl.Implicit, fitted against a discriminator):
            num_steps=2000        rounds
            lr=0.001              Adam's learning rate, both players
            batch_size=256        data rows per round; None: all
            divergence='gan'      non-saturating GAN, or f-GAN 'kl' / 'reverse_kl'
            discriminator=None    a torch.nn.Module (B, *event) -> (B,); None: an MLP
            disc_steps=1          discriminator updates per round
            hidden=64             units of the default discriminator
            seed=0                (ppl.infer passes its seed)
            num_samples=1000      draws of q kept (with guide; else unused: use post.predictive(n))
            guide=None            a function sampling every latent site: adversarial variational Bayes
            draws=16              draws of q and of the prior per step (with guide)
        discrete_vi (binary latent vectors too large to enumerate: an encoder and a gradient estimator):
            num_steps=2000        Adam steps
            lr=0.001              Adam's learning rate
            batch_size=100        data rows per step; None: all
            estimator='relax'     or 'rebar', 'reinforce', 'gumbel'
            encoder=None          a torch.nn.Module (B, P) -> (B, K) logits; None: an MLP
            hidden=128            units of the default encoder
            temperature=0.5       of the concrete relaxation (REBAR / RELAX start from it and learn it)
            seed=0                (ppl.infer passes its seed)
            num_samples=100       draws of q per data point kept
        energy (an energy-based model, ppl.RBM: contrastive divergence, log Z by annealed importance sampling):
            num_steps=1000        Adam steps
            lr=0.01               Adam's learning rate
            method='pcd'          persistent contrastive divergence, or 'cd'
            gibbs_steps=1         Gibbs sweeps per step (the k of CD-k)
            batch_size=100        data rows per step
            num_chains=100        persistent chains of PCD
            ais_betas=1000        AIS temperatures
            ais_chains=100        AIS runs
            seed=0                (ppl.infer passes its seed)
            num_samples=0         unused (draw with post.predictive(n): block Gibbs)

    Networks (``torch.nn.Module``) in ``args``, ``model_kwargs`` and the options are fitted as deep copies:
    the caller's modules are left untouched; the trained ones are in ``post.args``, ``post.kwargs`` (and the
    recognition networks in ``post.networks``).
    """
    check_model(model)
    check_options(num_steps, num_samples, seed, model_kwargs)
    check_backend_options(options)
    device = check_device(device)
    memo: dict = {}  # networks are fitted as copies: the caller's modules stay untouched (trained: post.kwargs)
    args, model_kwargs = copy_modules(args, memo), copy_modules(dict(model_kwargs or {}), memo)
    options = copy_modules(options, memo)
    args = tuple(_to_device(a, device) for a in args) if device else args
    model_kwargs = {k: _to_device(v, device) for k, v in model_kwargs.items()} if device else model_kwargs
    with (torch.device(device) if device else contextlib.nullcontext()):
        check_conditioned(model, args, model_kwargs)
        plan = compile_model(model, *args, backend=backend, **model_kwargs)
        check_plan(plan, options)
        check_traced(model, args, model_kwargs, options)
        runner = get_backend(plan.backend)
        if num_steps is not None:
            options["num_steps"] = num_steps
        if num_samples is not None:
            options["num_samples"] = num_samples
        if "seed" in inspect.signature(runner.run).parameters:
            options.setdefault("seed", seed)
        options = _backend_options(runner, dict(options, progress=progress))
        with isolated(seed):
            return runner.run(model, args, model_kwargs, plan.with_options(**options), **options)
