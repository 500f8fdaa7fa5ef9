"""The diagnostics are what their docs say (issue 16: ``ess`` differed from ArviZ's without saying which
estimator it is; ``elbo_terms`` was undocumented):

- ``post.mcmc.ess`` is Pyro's ``effective_sample_size`` over all chains of the kept draws, and
  ``arviz.ess(post.to_arviz())`` is ArviZ's bulk ESS of the same draws (the export keeps chains and draws apart);
- ``post.elbo_terms`` holds one float per optimization step for each of its four terms, and step i's ELBO,
  recon - local_kl + global_term - global_kl, is ``-history[i]``.
"""
from __future__ import annotations

import pytest
import torch
from pyro.ops.stats import effective_sample_size

import ppl
from tests.ppl.models_for_tests import neural_lds, normal_normal

az = pytest.importorskip("arviz")


@pytest.fixture(scope="module")
def mcmc_post():
    y = torch.linspace(-1.0, 2.0, 12)
    return ppl.infer(normal_normal, y, backend="mcmc", num_samples=60, warmup_steps=30, num_chains=2,
                     progress=False)


def test_mcmc_ess_is_pyros_estimator_over_all_chains(mcmc_post):
    draws = mcmc_post.draws["mu"]  # (chains, draws)
    assert draws.shape == (2, 60)
    want = effective_sample_size(draws.double(), chain_dim=0, sample_dim=1)
    assert torch.allclose(mcmc_post.mcmc.ess["mu"], want, rtol=1e-10)
    assert mcmc_post.to_arviz().attrs["ess_mu"] == pytest.approx(float(want), rel=1e-10)


def test_arviz_ess_of_the_export_is_arvizs_bulk_ess_of_the_same_draws(mcmc_post):
    draws = mcmc_post.draws["mu"].double().numpy()
    bulk = float(az.ess(draws, method="bulk"))  # ArviZ on the raw (chain, draw) array
    assert float(az.ess(mcmc_post.to_arviz())["mu"]) == pytest.approx(bulk, rel=1e-12)
    assert float(mcmc_post.mcmc.ess["mu"]) != pytest.approx(bulk, rel=1e-6)  # two estimators, as documented


def test_elbo_terms_are_per_step_lists_whose_sum_is_the_history():
    steps = 4
    post = ppl.infer(neural_lds, torch.linspace(-1.0, 1.0, 18).reshape(6, 3), num_steps=steps, progress=False)
    terms = post.elbo_terms
    assert set(terms) == {"recon", "local_kl", "global_term", "global_kl"}
    assert all(isinstance(v, list) and len(v) == steps and all(isinstance(x, float) for x in v) for v in terms.values())
    for i in range(steps):
        elbo = terms["recon"][i] - terms["local_kl"][i] + terms["global_term"][i] - terms["global_kl"][i]
        assert post.history[i] == pytest.approx(-elbo, rel=1e-5, abs=1e-5)
