"""DSL primitives: observed-data checks, masks, modules, the model decorator."""
import pyro.poutine as poutine
import pytest
import torch

import ppl
from ppl import dist


def run(model, *args):
    return poutine.trace(model).get_trace(*args)


def test_model_decorator_keeps_function_and_name():
    @ppl.model
    def my_model(x):
        return ppl.sample("a", dist.Normal(0.0, 1.0))

    assert my_model.name == "my_model" and callable(my_model)
    assert ppl.model(my_model) is my_model
    with pytest.raises(TypeError, match="expects a function"):
        ppl.model(3)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_or_inf_in_observed_data_names_site(bad):
    y = torch.zeros(5)
    y[2] = bad

    def model(y):
        with ppl.plate("data", 5):
            ppl.sample("y", dist.Normal(0.0, 1.0), obs=y)

    with pytest.raises(ppl.ModelInputError, match=r"site 'y'.*NaN/inf.*index \(2,\)"):
        run(model, y)


def test_masked_missing_values_are_allowed_and_excluded():
    y = torch.tensor([0.5, float("nan"), -1.0])
    mask = torch.tensor([True, False, True])

    def model(y):
        with ppl.plate("data", 3):
            ppl.sample("y", dist.Normal(0.0, 1.0), obs=y, mask=mask)

    tr = run(model, y)
    tr.compute_log_prob()
    expected = dist.Normal(0.0, 1.0).log_prob(torch.tensor([0.5, -1.0])).sum()
    assert torch.isclose(tr.nodes["y"]["log_prob_sum"], expected, atol=1e-6)
    assert torch.isnan(y[1])  # the user's tensor is not modified


def test_observed_shape_mismatch_names_site_and_shapes():
    def model(y):
        ppl.sample("y", dist.MultivariateNormal(torch.zeros(3), torch.eye(3)), obs=y)

    with pytest.raises(ppl.ModelInputError, match=r"site 'y'.*shape \(4, 2\).*event shape \(3,\)"):
        run(model, torch.zeros(4, 2))

    def batched(y):
        with ppl.plate("data", 5):
            ppl.sample("y", dist.Normal(0.0, 1.0), obs=y)

    with pytest.raises(ppl.ModelInputError, match=r"site 'y'.*batch shape \(4,\).*\(5,\)"):
        run(batched, torch.zeros(4))


def test_observed_must_be_tensor():
    def model():
        ppl.sample("y", dist.Normal(0.0, 1.0), obs=[1.0])

    with pytest.raises(ppl.ModelInputError, match="site 'y'.*torch.Tensor"):
        run(model)


def test_module_registers_parameters_and_rejects_non_modules():
    net = torch.nn.Linear(2, 1)

    def model(x):
        f = ppl.module("net", net)
        ppl.sample("y", dist.Normal(f(x).squeeze(-1), 1.0).to_event(1), obs=torch.zeros(4))

    tr = run(model, torch.randn(4, 2))
    assert {"net$$$weight", "net$$$bias"} <= set(tr.nodes)
    with pytest.raises(TypeError, match="torch.nn.Module"):
        ppl.module("bad", lambda x: x)
