"""The model library (``ppl.models``): classic graphical models written in the DSL.

Every model module follows one protocol, so that one table-driven test covers them all:

    model                the model function (``@ppl.model``); also exported under its own name
    EXPECTED_BACKEND     the backend ``ppl.compile`` chooses for it (stated in the docstring too)
    simulate(seed=0, **sizes) -> Simulated   a data set drawn from known parameters
    infer_options(simulated) -> dict   options for ``ppl.infer`` used by the tests (steps, lr, init, ...)
    recovery_errors(posterior, simulated) -> dict[str, float]   parameter errors, permutation-invariant
    TOLERANCES           name -> the largest error the test accepts, for each key of recovery_errors

Each model is a submodule: ``from ppl.models import lda`` (or ``import ppl.models`` and then
``ppl.models.lda``, imported on first access) gives the module, ``ppl.models.lda.model`` (the same
object as ``ppl.models.lda.lda``) the model function.
"""
import importlib
from typing import Any, NamedTuple

import torch


class Simulated(NamedTuple):
    """A simulated data set: ``ppl.infer(module.model, *args, model_kwargs=kwargs)`` fits it;
    ``truth`` holds the parameters and latents it was drawn from."""

    args: tuple
    kwargs: dict
    truth: dict[str, Any]

    def to(self, device) -> "Simulated":
        """The same data set on ``device``: every tensor in ``args``, ``kwargs`` and ``truth`` (nested in tuples,
        lists and dicts too) copied there; an ``nn.Module`` among them (a network argument) is moved in place,
        as ``Module.to`` does."""
        return Simulated(_to_device(self.args, device), _to_device(self.kwargs, device),
                         _to_device(self.truth, device))


def _to_device(obj, device):
    """``obj`` with every tensor and module inside (tuples, lists, dicts) on ``device``; other values as they are."""
    if isinstance(obj, (torch.Tensor, torch.nn.Module)):
        return obj.to(device)
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):
        return type(obj)(*(_to_device(v, device) for v in obj))
    if isinstance(obj, (tuple, list)):
        return type(obj)(_to_device(v, device) for v in obj)
    if isinstance(obj, dict):
        return {k: _to_device(v, device) for k, v in obj.items()}
    return obj


MODEL_MODULES = ("gmm", "hmm", "lds", "slds", "factorial_hmm",
                 "iohmm", "mixture_of_experts", "cca", "lda", "nmf")
NEURAL_MODULES = ("vae", "svae_gmm", "svae_lds", "svae_slds", "autoregressive")  # structured VAEs (their tests, tutorials)
# no tractable likelihood: a simulator (GAN), 2^K binary latents (discrete VAE), an unnormalized density (RBM);
# their fits take minutes: the library test runs them as slow rows, tests/inference covers their backends fast
GENERATIVE_MODULES = ("gan", "discrete_vae", "rbm")
__all__ = ["MODEL_MODULES", "NEURAL_MODULES", "GENERATIVE_MODULES", "Simulated", *MODEL_MODULES, *NEURAL_MODULES,
           *GENERATIVE_MODULES]


def __getattr__(name: str):
    """Import a model submodule on first attribute access (``ppl.models.lda`` after ``import ppl``)."""
    if name in MODEL_MODULES or name in NEURAL_MODULES or name in GENERATIVE_MODULES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
