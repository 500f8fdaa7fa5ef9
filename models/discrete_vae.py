r"""Variational autoencoder with binary latents: K bits per image, too many states to enumerate (2^20).

Generative process, for n = 1..N binary images of P pixels:

.. math::
    b_n \sim \mathrm{Bernoulli}(\tfrac12)^{K}, \qquad
    x_n \mid b_n \sim \mathrm{Bernoulli}\big(\sigma(f_\theta(b_n))\big)^{P}

with :math:`f_\theta` an MLP decoder (``MLPDecoder``). The latent ``b`` is written as
``Bernoulli(logits).to_event(1)``: one site of :math:`2^K` joint states, which the compiler sees as finite
but too large to enumerate (``Facts.combinatorial``).

Shapes: ``x: (N, P)`` in {0, 1}; ``b: (N, K)``.

Data of ``simulate``: images drawn from the model with a random decoder (K = 8 bits, P = 16 pixels, so the
exact log-likelihood sums 2^8 states); the tutorial ``tutorials/discrete_vae_digits.py`` fits scikit-learn's
8x8 digits (binarized) with K = 20.

Backend the compiler chooses: ``discrete_vi`` (rule ``binary-latent-vectors``: an amortized Bernoulli encoder
trained with a low-variance gradient estimator, RELAX by default; ``estimator=`` picks REBAR, REINFORCE with a
baseline, or the concrete / Gumbel-softmax relaxation).
"""
from __future__ import annotations

import itertools

import torch
from torch import nn

import ppl
from ppl import dist
from ppl.primitives import ModelInputError

from . import Simulated

EXPECTED_BACKEND = "discrete_vi"


class MLPDecoder(nn.Module):
    """Decoder :math:`f_\\theta`: ``b (..., K) -> pixel logits (..., P)``, one tanh hidden layer."""

    def __init__(self, bits: int, pixels: int, hidden: int = 64):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(bits, hidden), nn.Tanh(), nn.Linear(hidden, pixels))

    def forward(self, b: torch.Tensor) -> torch.Tensor:
        return self.net(b)


def make_decoder(bits: int, pixels: int, hidden: int = 64, seed: int = 0, device="cpu", dtype=torch.float32):
    """A decoder initialized from ``seed`` without touching the global RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return MLPDecoder(bits, pixels, hidden).to(device=device, dtype=dtype)


@ppl.model
def discrete_vae(x: torch.Tensor, decoder: nn.Module, K: int = 20):
    """Binary-latent VAE on images ``x: (N, P)`` in {0, 1}: b_n ~ Bernoulli(1/2)^K, x_n ~ Bernoulli(sigmoid(decoder(b_n)))."""
    if not isinstance(x, torch.Tensor) or x.dim() != 2 or not x.is_floating_point():
        got = f"shape {tuple(x.shape)}, dtype {x.dtype}" if isinstance(x, torch.Tensor) else type(x).__name__
        raise ModelInputError(f"x must be a floating (images, pixels) tensor of 0/1, got {got}")
    dec = ppl.module("decoder", decoder)
    with ppl.plate("data", x.shape[0]):
        b = ppl.sample("b", dist.Bernoulli(logits=x.new_zeros(K)).to_event(1))
        ppl.sample("x", dist.Bernoulli(logits=dec(b)).to_event(1), obs=x)


def exact_log_likelihood(decoder: nn.Module, x: torch.Tensor, K: int) -> float:
    r""":math:`\sum_n \log \sum_b p(b) p(x_n \mid b)` by enumerating all :math:`2^K` codes (K <= 16)."""
    if K > 16:
        raise ValueError(f"exact_log_likelihood enumerates 2^K codes; K = {K} is too many (at most 16)")
    codes = torch.tensor(list(itertools.product([0.0, 1.0], repeat=K))).to(x)
    with torch.no_grad():
        lik = dist.Bernoulli(logits=decoder(codes)).to_event(1).log_prob(x.unsqueeze(1))  # (N, 2^K)
        return float((torch.logsumexp(lik, 1) - K * torch.log(x.new_tensor(2.0))).sum())


def load_digits(threshold: float = 8.0, dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's 8x8 digits binarized at ``threshold`` (of 16): ``(images (1797, 64), labels (1797,))``."""
    from sklearn.datasets import load_digits as _load

    data = _load()
    return (torch.tensor(data.data >= threshold, dtype=dtype), torch.tensor(data.target))


def simulate(seed: int = 0, N: int = 500, K: int = 8, P: int = 16, device="cpu", dtype=torch.float32) -> Simulated:
    """``x: (N, P)`` drawn from the model with a random decoder (weights scaled by 3 for clear images); a fresh
    decoder of the same size to fit."""
    gen = torch.Generator().manual_seed(seed)
    true = make_decoder(K, P, seed=seed + 1, dtype=torch.float64)
    with torch.no_grad():
        for p in true.parameters():
            p.mul_(3.0)
        b = (torch.rand(N, K, generator=gen, dtype=torch.float64) < 0.5).double()
        x = (torch.rand(N, P, generator=gen, dtype=torch.float64) < torch.sigmoid(true(b))).double()
    truth = {"decoder": true, "b": b}
    return Simulated((x.to(device=device, dtype=dtype),), {"decoder": make_decoder(K, P, seed=seed, device=device,
                                                                                   dtype=dtype), "K": K}, truth)


def infer_options(sim: Simulated) -> dict:
    """RELAX, Adam."""
    return dict(num_steps=1500, lr=0.01, batch_size=100, estimator="relax")


def recovery_errors(post, sim: Simulated) -> dict[str, float]:
    """``nll_gap``: exact negative log-likelihood per image of the fitted decoder minus the true one's;
    ``elbo_gap``: exact log-likelihood of the fit minus its ELBO, per image (the encoder's looseness)."""
    x, K = sim.args[0], sim.kwargs["K"]
    fitted = exact_log_likelihood(post.kwargs["decoder"], x, K)
    true = exact_log_likelihood(sim.truth["decoder"].to(x.dtype), x, K)
    N = x.shape[0]
    return {"nll_gap": (true - fitted) / N, "elbo_gap": (fitted - float(post.log_evidence)) / N}


# measured at seeds 0, 1: nll_gap -0.12, -0.09 (the fit beats the true decoder on its own training images);
# elbo_gap 0.11, 0.08 nats per image. Half a nat per image allows for a slower start (a poor local optimum of
# the encoder costs several nats).
TOLERANCES = {"nll_gap": 0.5, "elbo_gap": 0.5}
model = discrete_vae
