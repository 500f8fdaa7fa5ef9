"""The Posterior result type: sample, summary, marginals, predictive, arviz export."""
import pickle

import pytest
import torch

import ppl
from tests.ppl import models_for_tests as M
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
    with pytest.raises(ValueError, match="n must be an integer >= 1"):
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


# ----------------------------------------------------------------------------- sites fixed by ppl.condition
TRANS = torch.tensor([[0.9, 0.1], [0.2, 0.8]])


@ppl.model
def normal_two(y):
    mu = ppl.sample("mu", ppl.dist.Normal(0.0, 2.0))
    s = ppl.sample("s", ppl.dist.LogNormal(0.0, 1.0))
    with ppl.plate("data", y.shape[0]):
        ppl.sample("y", ppl.dist.Normal(mu, s), obs=y)


@ppl.model
def neural_lds_noise(y, D=2):
    decoder = ppl.module("decoder", M.Decoder(D, y.shape[-1]))
    noise = ppl.sample("noise", ppl.dist.LogNormal(0.0, 1.0))
    x = ppl.gaussian_chain("x", D, 0.9 * torch.eye(D), 0.1 * torch.eye(D), length=y.shape[-2])
    ppl.sample("y", ppl.dist.Normal(decoder(x), noise).to_event(2), obs=y)


def _conditioned_fit(case: str):
    """(posterior, site -> the value it was fixed to) for a small fit of each backend."""
    torch.manual_seed(0)
    y = torch.cat([torch.randn(8) - 4, torch.randn(8) + 4])
    if case in ("exact", "svi"):
        post = ppl.infer(ppl.condition(M.hmm, {"trans": TRANS}), y, model_kwargs={"K": 2}, backend=case,
                         num_steps=5 if case == "svi" else 100, progress=False)
        return post, {"trans": TRANS}
    if case == "chain path":  # a conditioned chain: compiled to mcmc over loc
        path = (y > 0).long()
        post = ppl.infer(ppl.condition(M.hmm, {"z": path}), y, model_kwargs={"K": 2}, num_samples=5,
                         warmup_steps=5, progress=False)
        return post, {"z": path}
    if case == "mcmc":
        s = torch.tensor(0.5)
        return ppl.infer(ppl.condition(normal_two, {"s": s}), y, backend="mcmc", num_samples=5, warmup_steps=5,
                         progress=False), {"s": s}
    noise = torch.tensor(0.3)
    post = ppl.infer(ppl.condition(neural_lds_noise, {"noise": noise}), torch.randn(6, 3), backend="svae",
                     num_steps=2, num_samples=3, progress=False)
    return post, {"noise": noise}


@pytest.mark.parametrize("case", ["exact", "svi", "mcmc", "svae", "chain path"])
def test_predictive_keeps_sites_fixed_by_condition(case):
    """Before the fix the predictive ran ``poutine.uncondition(model)``, which also freed ppl.condition's
    sites: a conditioned transition matrix (or path, or noise scale) was redrawn from its prior."""
    post, fixed = _conditioned_fit(case)
    rep = post.predictive(4, seed=1)
    for site, value in fixed.items():
        assert (rep[site].reshape(4, -1) == value.reshape(1, -1)).all(), f"{case}: '{site}' was redrawn"
    restored = pickle.loads(pickle.dumps(post))
    for site, value in fixed.items():
        assert (restored.predictive(2)[site].reshape(2, -1) == value.reshape(1, -1)).all(), f"{case}: pickling"
    assert not torch.equal(rep["y"][0], post.args[0]), "the data are still redrawn"


def test_simulate_keeps_sites_fixed_by_condition():
    y = torch.randn(10)
    draws = ppl.simulate(ppl.condition(ppl.condition(M.hmm, {"trans": TRANS}), {"loc": torch.tensor([-1.0, 1.0])}),
                         y, K=2, num_samples=3)
    assert torch.equal(draws["trans"], TRANS.expand(3, 2, 2))
    assert torch.equal(draws["loc"], torch.tensor([-1.0, 1.0]).expand(3, 2))


def test_log_evidence_converts_to_float(post):
    assert float(post.log_evidence) == post.log_evidence.value
