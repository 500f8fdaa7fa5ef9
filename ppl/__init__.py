"""graphppl: structured latent-variable models with neural parts (import name ``ppl``).

Write a model as a Python function with ``ppl.sample``/``ppl.plate`` and the structured
blocks (``markov_chain``, ``gaussian_chain``, ``switching_chain``); ``ppl.compile`` says how
it will be inferred and why; ``ppl.infer`` runs it and returns a ``Posterior``.
"""
import importlib

from pyro import distributions as dist

from .blocks import gaussian_chain, markov_chain, switching_chain
from .compiler import compile  # noqa: A004
from .conjugate_dists import MatrixNormalInverseWishart, NormalInverseWishart
from .data import extend, missing_mask
from .data_scale import DataScaleWarning
from .flows import Flow, FlowGuide, flow, flow_guide
from .implicit import RBM, EnergyBased, Implicit, NoDensityError
from .infer import infer
from .interpret import log_joint, simulate
from .plan import Plan
from .posterior import LogEvidence, Posterior
from .primitives import Model, ModelInputError, condition, deterministic, factor, model, module, param, plate, sample
from .trace import ModelTraceError

__version__ = "0.1.0"

__all__ = [
    "dist", "NormalInverseWishart", "MatrixNormalInverseWishart",
    "model", "condition", "sample", "param", "plate", "deterministic", "factor", "module",
    "markov_chain", "gaussian_chain", "switching_chain",
    "flow", "flow_guide", "Flow", "FlowGuide",
    "compile", "infer", "simulate", "log_joint", "extend", "missing_mask", "Plan", "Posterior", "LogEvidence", "Model", "ModelInputError", "ModelTraceError",
    "DataScaleWarning", "Implicit", "EnergyBased", "RBM", "NoDensityError",
]


def __getattr__(name: str):
    """``ppl.models`` and ``ppl.inference`` are imported on first access, so ``import ppl`` loads no backend."""
    if name in ("models", "inference"):
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
