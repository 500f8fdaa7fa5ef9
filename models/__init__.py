"""The model library (``ppl.models``): classic graphical models written in the DSL.

Every model module follows one protocol, so that one table-driven test covers them all:

    model                the model function (``@ppl.model``); also exported under its own name
    EXPECTED_BACKEND     the backend ``ppl.compile`` chooses for it (stated in the docstring too)
    simulate(seed=0, **sizes) -> Simulated   a data set drawn from known parameters
    infer_options(simulated) -> dict   options for ``ppl.infer`` used by the tests (steps, lr, init, ...)
    recovery_errors(posterior, simulated) -> dict[str, float]   parameter errors, permutation-invariant
    TOLERANCES           name -> the largest error the test accepts, for each key of recovery_errors
"""
from typing import Any, NamedTuple


class Simulated(NamedTuple):
    """A simulated data set: ``ppl.infer(module.model, *args, model_kwargs=kwargs)`` fits it;
    ``truth`` holds the parameters and latents it was drawn from."""

    args: tuple
    kwargs: dict
    truth: dict[str, Any]


MODEL_MODULES = ("gmm", "hmm", "lds", "slds", "factorial_hmm")
