"""mcmc backend: batched NUTS (``nuts``), the model's potential (``potential``), the backend (``backend``)."""
from .backend import NUTSStats, continue_sampling
from .nuts import SamplerState, sample

__all__ = ["NUTSStats", "SamplerState", "continue_sampling", "sample"]
