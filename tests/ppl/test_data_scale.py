"""ppl.infer warns (DataScaleWarning, naming the site and the scales) when observed continuous data are far
larger than what the model's priors predict, and stays silent on data of the model's scale."""
import warnings

import pytest
import torch

import ppl
from ppl import dist
from ppl.data_scale import magnitude, scale_mismatches
from tests.ppl.models_for_tests import hmm, lds


def two_levels(n=30):
    torch.manual_seed(0)
    return torch.cat([torch.randn(n) - 5, torch.randn(n) + 5])


# the fits below take one step: the warning comes before fitting (so do NotConverged warnings after it)
pytestmark = pytest.mark.filterwarnings("ignore::ppl.inference.training.NotConverged")


def test_hmm_on_data_of_scale_1e8_warns_naming_the_site():
    """Before: the fit stopped at state means ~5 for data at 4e8, silently."""
    y = two_levels() * 4e7 + 4e8
    with pytest.warns(ppl.DataScaleWarning, match=r"site 'y'.*scale \d\.\d+e\+08.*Standardize"):
        ppl.infer(hmm, y, model_kwargs={"K": 2}, num_steps=1, progress=False)


def test_lds_on_data_of_scale_1e8_warns():
    torch.manual_seed(0)
    y = 1e8 * torch.randn(20, 2)
    with pytest.warns(ppl.DataScaleWarning, match="site 'y'"):
        ppl.infer(lds, y, num_steps=1, progress=False)


@ppl.model
def wide_prior(y):
    loc = ppl.sample("loc", dist.Normal(0.0, 1e9))
    with ppl.plate("data", y.shape[0]):
        ppl.sample("y", dist.Normal(loc, 1e8), obs=y)


@ppl.model
def counts(y):
    rate = ppl.sample("rate", dist.LogNormal(0.0, 1.0))
    with ppl.plate("data", y.shape[0]):
        ppl.sample("y", dist.Poisson(rate), obs=y)


@pytest.mark.parametrize("case", ["standardized", "1e3", "wide prior", "counts", "conditioned global"])
def test_no_warning_on_data_the_model_can_reach(case):
    y = two_levels()
    model, data = {"standardized": (hmm, (y - y.mean()) / y.std()), "1e3": (hmm, 1e3 * y),
                   "wide prior": (wide_prior, 4e8 + 1e7 * y), "counts": (counts, torch.full((10,), 1e6)),
                   "conditioned global": (ppl.condition(hmm, {"loc": torch.tensor([1e9, -1e9])}), y)}[case]
    assert scale_mismatches(model, (data,), {"K": 2} if model is not wide_prior and model is not counts
                            else {}) == []


def test_warning_is_silent_in_a_plain_fit():
    y = two_levels()
    with warnings.catch_warnings():
        warnings.simplefilter("error", ppl.DataScaleWarning)
        ppl.infer(hmm, y, model_kwargs={"K": 2}, num_steps=1, progress=False)


def test_magnitude_is_robust():
    x = torch.ones(1000)
    x[:5] = 1e12                          # a few outliers do not set the scale
    x[5:10] = float("nan")                # missing entries are ignored
    assert magnitude(x) == 1.0
    assert magnitude(torch.tensor([float("nan")])) == 0.0
