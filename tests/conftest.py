"""Shared test settings: deterministic, float64 where tolerances are tight, 2 threads."""
import pyro
import pytest
import torch

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _fresh_state():
    """Each test starts from a fixed seed and an empty Pyro parameter store."""
    pyro.clear_param_store()
    torch.manual_seed(0)
    yield
    pyro.clear_param_store()


def cuda_params():
    """Devices to run a test on: CPU always, CUDA when present."""
    return [pytest.param("cpu")] + ([pytest.param("cuda")] if torch.cuda.is_available() else
                                    [pytest.param("cuda", marks=pytest.mark.skip(reason="no CUDA device"))])
