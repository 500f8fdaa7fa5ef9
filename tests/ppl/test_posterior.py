"""The Posterior result type: sample, summary, marginals, predictive, arviz export."""
import pytest
import torch

import ppl
from tests.ppl.models_for_tests import gmm


@pytest.fixture(scope="module")
def post():
    torch.manual_seed(0)
    x = torch.cat([torch.randn(40, 2) - 4, torch.randn(40, 2) + 4])
    return ppl.infer(gmm, x, model_kwargs={"K": 2}, backend="svi", num_steps=200, num_samples=100,
                     init={"loc": torch.tensor([[-3.0, -3.0], [3.0, 3.0]])}, progress=False)


def test_sample_shapes_and_seeding(post):
    s = post.sample(7, seed=1)
    assert s["loc"].shape == (7, 2, 2) and s["weights"].shape == (7, 2)
    assert torch.equal(s["loc"], post.sample(7, seed=1)["loc"])
    with pytest.raises(ValueError, match="n must be >= 1"):
        post.sample(0)


def test_summary_table(post):
    summary = post.summary()
    assert set(summary) == {"weights", "loc"}
    text = str(summary)
    assert "mean" in text and "loc[1, 1]" in text
    label, mean, sd, lo, hi = summary["weights"][0]
    assert lo <= mean <= hi and sd >= 0


def test_marginals_and_errors(post):
    probs = post.marginals("z")
    assert probs.shape == (80, 2)
    assert (probs[:40].argmax(-1) == 0).all() and (probs[40:].argmax(-1) == 1).all()
    with pytest.raises(KeyError, match="no discrete marginals for site 'loc'"):
        post.marginals("loc")


def test_predictive_replicates_data(post):
    rep = post.predictive(5)
    assert rep["x"].shape[-2:] == (80, 2) and rep["x"].shape[0] == 5
    assert rep["z"].shape[-1] == 80


def test_log_evidence_is_labelled(post):
    assert post.log_evidence.kind == "elbo" and torch.isfinite(torch.tensor(post.log_evidence.value))
    assert "svi" in repr(post)


def test_to_arviz(post):
    pytest.importorskip("arviz")
    idata = post.to_arviz()
    assert "loc" in idata.posterior and idata.posterior["loc"].shape == (1, 100, 2, 2)
