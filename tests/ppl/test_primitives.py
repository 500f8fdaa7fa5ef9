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


# ----------------------------------------------------------------------------- masks over single entries
def to_event_model(y, mask=None):
    loc = ppl.sample("loc", dist.Normal(0.0, 10.0))
    ppl.sample("y", dist.Normal(loc, 1.0).expand(y.shape).to_event(2), obs=y, mask=mask)


def test_full_shape_mask_on_to_event_site_counts_each_entry_once():
    """Before the fix Pyro broadcast a ``(T, P)`` mask into new batch dims of the ``()``-batched site: the
    log-density was counted T * P times (all-True mask: log evidence -3748 instead of -75)."""
    torch.manual_seed(0)
    y = torch.randn(5, 10)
    loc = torch.tensor(0.3)
    unmasked = ppl.log_joint(to_event_model, {"loc": loc}, y)
    all_true = ppl.log_joint(to_event_model, {"loc": loc}, y, mask=torch.ones(5, 10, dtype=torch.bool))
    assert torch.isclose(all_true, unmasked, rtol=1e-6)
    mask = torch.rand(5, 10) < 0.6
    y_missing = torch.where(mask, y, torch.tensor(float("nan")))
    got = ppl.log_joint(to_event_model, {"loc": loc}, y_missing, mask=mask)
    expected = dist.Normal(0.0, 10.0).log_prob(loc) + dist.Normal(loc, 1.0).log_prob(y[mask]).sum()
    assert torch.isclose(got, expected, rtol=1e-6)
    fixed = ppl.condition(to_event_model, {"loc": loc})
    post = ppl.infer(fixed, y, model_kwargs={"mask": torch.ones(5, 10, dtype=torch.bool)}, progress=False)
    assert abs(post.log_evidence.value - float(unmasked - dist.Normal(0.0, 10.0).log_prob(loc))) < 1e-4


def test_entry_mask_under_a_collapsed_chain_equals_the_step_mask():
    """A (T, P) mask whose rows are all True or all False is the per-step mask (T,): same exact evidence."""
    @ppl.model
    def hmm2(y, mask=None):
        loc = torch.tensor([[-2.0, 0.0], [2.0, 1.0]])
        z = ppl.markov_chain("z", 2, torch.tensor([[0.8, 0.2], [0.3, 0.7]]), length=y.shape[-2])
        ppl.sample("y", dist.Normal(loc[z], 1.0).to_event(1), obs=y, mask=mask)

    torch.manual_seed(1)
    y = torch.randn(12, 2)
    steps = torch.ones(12, dtype=torch.bool)
    steps[[3, 7]] = False
    by_step = ppl.infer(hmm2, y, model_kwargs={"mask": steps}, progress=False).log_evidence.value
    by_entry = ppl.infer(hmm2, y, model_kwargs={"mask": steps[:, None].expand(12, 2)}, progress=False)
    assert abs(by_entry.log_evidence.value - by_step) < 1e-4


def test_mask_reaching_into_a_multivariate_event_is_refused():
    def mvn(y, mask):
        with ppl.plate("data", y.shape[0]):
            ppl.sample("y", dist.MultivariateNormal(torch.zeros(3), torch.eye(3)), obs=y, mask=mask)

    with pytest.raises(ppl.ModelInputError, match=r"site 'y'.*mask has shape \(4, 3\).*batch shape \(4,\)"):
        run(mvn, torch.zeros(4, 3), torch.ones(4, 3, dtype=torch.bool))
    with pytest.raises(ppl.ModelInputError, match=r"site 'y'.*single entries of shape \(5, 10\)"):
        run(to_event_model, torch.zeros(5, 10), torch.ones(2, 5, 10, dtype=torch.bool))
