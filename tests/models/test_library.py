"""One table-driven test over the model library: simulate -> ppl.infer (auto) -> the backend the
docstring states, and the parameters recovered within each model's stated tolerances."""
import importlib

import pytest

import ppl
from ppl.models import GENERATIVE_MODULES, MODEL_MODULES


@pytest.mark.parametrize("name", MODEL_MODULES + tuple(pytest.param(n, marks=pytest.mark.slow)
                                                       for n in GENERATIVE_MODULES))
def test_model_recovers_parameters_with_expected_backend(name):
    module = importlib.import_module(f"ppl.models.{name}")
    assert module.EXPECTED_BACKEND in module.__doc__, "the docstring must state the backend"
    sim = module.simulate(seed=0)
    plan = ppl.compile(module.model, *sim.args, **sim.kwargs)
    assert plan.backend == module.EXPECTED_BACKEND, plan.explain()
    post = ppl.infer(module.model, *sim.args, model_kwargs=sim.kwargs, progress=False, **module.infer_options(sim))
    errors = module.recovery_errors(post, sim)
    assert set(errors) == set(module.TOLERANCES)
    for key, err in errors.items():
        assert err < module.TOLERANCES[key], f"{name}: {key} error {err:.3g} >= {module.TOLERANCES[key]}"
