"""GMM-SVAE (``ppl.models.svae_gmm``) on a small pinwheel: routed to the svae backend, the clusters of
q(z) match the true spiral arms (adjusted Rand index against the simulation's labels), the ELBO terms
are consistent, bad input is refused with a clear message."""
import pytest
import torch

import ppl
from ppl.models import svae_gmm
from tests.conftest import cuda_params


def test_compiles_to_svae_with_mixture_message_passing():
    sim = svae_gmm.simulate(seed=0, num_per_class=10)
    plan = ppl.compile(svae_gmm.model, *sim.args, **sim.kwargs)
    assert plan.backend == svae_gmm.EXPECTED_BACKEND == "svae" and svae_gmm.EXPECTED_BACKEND in svae_gmm.__doc__
    assert plan.treatment("x") == "recognition potential" and plan.treatment("z") == "message passing"
    assert plan.treatment("weights") == "natural gradient" and plan.treatment("loc") == "point estimate"


@pytest.mark.parametrize("device", cuda_params())
def test_clusters_recover_the_spiral_arms(device):
    # 5 arms x 40 points, 2 restarts x 300 Adam steps (~10 s on one CPU thread), the best ELBO kept.
    # Measured 1 - ARI = 0.05, 0.10, 0.00, 0.02, 0.04, 0.00 at seeds 0-5 (a random clustering has ~1; two arms merged
    # into one cluster ~0.3), so TOLERANCES["ari"] = 0.2, i.e. ARI >= 0.8.
    sim = svae_gmm.simulate(seed=0, num_per_class=40, device=device)
    fit = svae_gmm.fit(sim, restarts=2, num_steps=300)
    post = fit.posterior
    assert post.plan.backend == "svae"
    errors = svae_gmm.recovery_errors(post, sim)
    assert set(errors) == set(svae_gmm.TOLERANCES)
    for key, err in errors.items():
        assert err < svae_gmm.TOLERANCES[key], f"{key} error {err:.3g} >= {svae_gmm.TOLERANCES[key]}"
    assert post.log_evidence.value == max(fit.elbos)  # the restart kept is the one with the best ELBO

    # ELBO terms: a KL is >= 0; the objective improved; the reported ELBO is recon - KL + global terms.
    terms = post.diagnostics["elbo_terms"]
    assert min(terms["local_kl"]) >= -1e-3 and min(terms["global_kl"]) >= -1e-6
    assert sum(post.history[-20:]) / 20 < sum(post.history[:20]) / 20 - 100.0
    # q(pi) = Dir(alpha_0 + sum_n q(z_n)) at convergence of the natural-gradient steps (step 0.1,
    # 300 steps: (0.9)^300 ~ 1e-14 of the start is left; q(z) moves little over the last steps).
    counts = post.marginals("z").sum(0)
    alpha = sim.kwargs["concentration"] + counts
    expected = alpha / alpha.sum()
    # the posterior mean of "weights" averages 100 Dirichlet draws: sd ~ 0.003 per entry.
    assert torch.allclose(post.mean("weights"), expected.to(post.mean("weights")), atol=0.02)


def test_bad_input_is_refused_with_the_argument_named():
    sim = svae_gmm.simulate(seed=0, num_per_class=5)
    y, decoder = sim.args[0], sim.kwargs["decoder"]
    with pytest.raises(ValueError, match=r"y must be \(points, features\), got \(25,\)"):
        ppl.compile(svae_gmm.model, y[:, 0], decoder=decoder)
    with pytest.raises(ValueError, match="decoder must be a torch.nn.Module"):
        ppl.compile(svae_gmm.model, y, decoder=lambda x: x)
    with pytest.raises(ValueError, match="K must be an integer >= 1, got 0"):
        ppl.compile(svae_gmm.model, y, decoder=decoder, K=0)
    with pytest.raises(ValueError, match="restarts must be >= 1, got 0"):
        svae_gmm.fit(sim, restarts=0)
