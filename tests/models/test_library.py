"""One table-driven test over the model library: simulate -> ppl.infer (auto) -> the backend the
docstring states, and the parameters recovered within each model's stated tolerances; on CUDA too when a device
is present (the data moved there with ``Simulated.to``; the posterior's draws must stay there)."""
import importlib

import pytest

import ppl
from ppl.models import GENERATIVE_MODULES, MODEL_MODULES

from tests.conftest import cuda_params


@pytest.mark.parametrize("name", MODEL_MODULES + tuple(pytest.param(n, marks=pytest.mark.slow)
                                                       for n in GENERATIVE_MODULES))
@pytest.mark.parametrize("device", cuda_params())
def test_model_recovers_parameters_with_expected_backend(name, device):
    module = importlib.import_module(f"ppl.models.{name}")
    assert module.EXPECTED_BACKEND in module.__doc__, "the docstring must state the backend"
    sim = module.simulate(seed=0).to(device)
    plan = ppl.compile(module.model, *sim.args, **sim.kwargs)
    assert plan.backend == module.EXPECTED_BACKEND, plan.explain()
    post = ppl.infer(module.model, *sim.args, model_kwargs=sim.kwargs, progress=False, **module.infer_options(sim))
    errors = module.recovery_errors(post, sim)
    assert set(errors) == set(module.TOLERANCES)
    for key, err in errors.items():
        assert err < module.TOLERANCES[key], f"{name}: {key} error {err:.3g} >= {module.TOLERANCES[key]}"
    draws = post.sample(2, seed=0)
    assert {v.device.type for v in draws.values()} <= {device}, {k: v.device for k, v in draws.items()}
