r"""Recognition networks: data -> Gaussian potentials on a latent node.

A recognition network maps each observation ``y_n: (*feature_shape)`` to a Gaussian potential
on the latent node it informs, in mean/variance form (as in Johnson et al.'s code):
the network outputs ``(m, log v)`` and the potential is
:math:`\psi(x) = \exp(-\tfrac12 x^\top J x + h^\top x)`, :math:`J = \mathrm{diag}(1/v)`, :math:`h = m / v`.

Defaults are built from the data's shape: an MLP for vector features, a small conv net for
images (2-D ``(H, W)`` or 3-D ``(C, H, W)`` features). Any ``nn.Module`` with the same contract
(``forward(y: (B, *feature_shape)) -> (B, 2 * D)``) can replace it.
"""
from __future__ import annotations

import torch
from torch import nn

MIN_VARIANCE = 1e-4


class MLPRecognition(nn.Module):
    """``(B, F) -> (B, 2D)``: two hidden tanh layers."""

    def __init__(self, in_features: int, latent_dim: int, hidden: int = 64):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(in_features, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh(),
                                 nn.Linear(hidden, 2 * latent_dim))

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return self.net(y.flatten(1))


class ConvRecognition(nn.Module):
    """``(B, C, H, W)`` or ``(B, H, W)`` images -> ``(B, 2D)``: two strided convolutions and a linear head."""

    def __init__(self, feature_shape: tuple[int, ...], latent_dim: int, channels: int = 16):
        super().__init__()
        self.channels_in = 1 if len(feature_shape) == 2 else feature_shape[0]
        self.conv = nn.Sequential(nn.Conv2d(self.channels_in, channels, 3, stride=2, padding=1), nn.ReLU(),
                                  nn.Conv2d(channels, channels, 3, stride=2, padding=1), nn.ReLU())
        with torch.no_grad():
            probe = torch.zeros((1, self.channels_in) + tuple(feature_shape[-2:]))
            flat = self.conv(probe).numel()
        self.head = nn.Linear(flat, 2 * latent_dim)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        if y.dim() == 3:
            y = y.unsqueeze(1)
        return self.head(self.conv(y).flatten(1))


def default_recognition(feature_shape: tuple[int, ...], latent_dim: int) -> nn.Module:
    """An MLP for vector (or scalar) features, a conv net for 2-D / 3-D image features."""
    if len(feature_shape) in (2, 3) and min(feature_shape[-2:]) >= 4:
        return ConvRecognition(feature_shape, latent_dim)
    return MLPRecognition(max(1, int(torch.Size(feature_shape).numel())), latent_dim)


def potentials(net: nn.Module, y: torch.Tensor, node_shape: tuple[int, ...], latent_dim: int
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Run ``net`` on every node's data and return ``(J (*node_shape, D, D), h (*node_shape, D))``.

    y: ``(*node_shape, *feature_shape)``: the leading dims index the latent nodes (e.g. batch, time).
    """
    n = len(node_shape)
    if tuple(y.shape[:n]) != tuple(node_shape):
        raise ValueError(f"recognition input has shape {tuple(y.shape)}; its leading dims must equal the latent "
                         f"node shape {tuple(node_shape)}")
    flat = y.reshape((-1,) + tuple(y.shape[n:])) if y.dim() > n else y.reshape(-1, 1)
    out = net(flat)
    if out.shape[-1] != 2 * latent_dim:
        raise ValueError(f"recognition network must output 2 * latent_dim = {2 * latent_dim} numbers per node, "
                         f"got {out.shape[-1]}")
    mean, log_var = out.reshape(tuple(node_shape) + (2, latent_dim)).unbind(-2)
    precision = 1.0 / (log_var.exp() + MIN_VARIANCE)
    return torch.diag_embed(precision), mean * precision
