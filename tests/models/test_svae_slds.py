"""SLDS-SVAE (``ppl.models.svae_slds``) on synthetic data with known switches: routed to the svae backend
(structured mean field), the argmax of q(z) segments the regimes (accuracy against the simulated states,
up to relabelling), bad input is refused with a clear message."""
import pytest
import torch

import ppl
from ppl.models import svae_slds
from tests.conftest import cuda_params


def test_compiles_to_svae_with_structured_mean_field():
    sim = svae_slds.simulate(seed=0, N=2, T=5)
    plan = ppl.compile(svae_slds.model, *sim.args, **sim.kwargs)
    assert plan.backend == svae_slds.EXPECTED_BACKEND == "svae" and svae_slds.EXPECTED_BACKEND in svae_slds.__doc__
    assert plan.treatment("s_x") == "recognition potential" and plan.treatment("s_z") == "message passing"
    assert "structured mean field" in plan.explain()
    assert plan.facts.of("svae").targets["s_x"].node_shape == (2, 5)  # one chain per sequence


def test_simulation_has_switches_and_rotations():
    sim = svae_slds.simulate(seed=0, N=8, T=40)
    z, x = sim.truth["s_z"], sim.truth["s_x"].double()
    assert z.shape == (8, 40) and sim.args[0].shape == (8, 40, 10)
    assert 5 <= int((z[:, 1:] != z[:, :-1]).sum()) <= 40  # sticky 0.95: ~16 expected switches
    # the true regime is the one whose rotation predicts the next state best at most steps (noise 0.05)
    A = sim.truth["dynamics"].double()
    pred = torch.einsum("kij,ntj->ntki", A, x[:, :-1])
    best = (pred - x[:, 1:, None]).norm(dim=-1).argmin(-1)
    assert float((best == z[:, 1:]).double().mean()) > 0.9


@pytest.mark.parametrize("device", cuda_params())
def test_segmentation_recovers_the_switches(device):
    # 8 sequences x 40 steps, 200 Adam steps (~13-20 s on one CPU thread). Measured 1 - accuracy 0.000-0.016 at
    # seeds 0-9 (a segmentation ignoring the data scores ~0.5 with K = 2); TOLERANCES["segmentation"] = 0.2.
    sim = svae_slds.simulate(seed=0, N=8, T=40, device=device)
    post = ppl.infer(svae_slds.model, *sim.args, model_kwargs=sim.kwargs, progress=False,
                     **svae_slds.infer_options(sim))
    assert post.plan.backend == "svae"
    assert post.marginals("s_z").shape == (8, 40, 2)
    assert torch.allclose(post.marginals("s_z").sum(-1), torch.ones(8, 40, device=device, dtype=sim.args[0].dtype))
    errors = svae_slds.recovery_errors(post, sim)
    assert set(errors) == set(svae_slds.TOLERANCES)
    for key, err in errors.items():
        assert err < svae_slds.TOLERANCES[key], f"{key} error {err:.3g} >= {svae_slds.TOLERANCES[key]}"
    terms = post.elbo_terms
    assert min(terms["local_kl"]) >= -1e-2 * abs(max(terms["recon"]))  # a KL is >= 0 (float32 round-off)
    assert sum(post.history[-20:]) / 20 < sum(post.history[:20]) / 20


def test_bad_input_is_refused_with_the_argument_named():
    sim = svae_slds.simulate(seed=0, N=2, T=5)
    y, decoder = sim.args[0], sim.kwargs["decoder"]
    with pytest.raises(ValueError, match=r"y must be a floating tensor \(sequences, time >= 2, features\), "
                                         r"got \(2, 5\)"):
        ppl.compile(svae_slds.model, y[..., 0], decoder=decoder)
    with pytest.raises(ValueError, match="decoder must be a torch.nn.Module"):
        ppl.compile(svae_slds.model, y, decoder="mlp")
    with pytest.raises(ValueError, match="K must be an integer >= 1, got 1.5"):
        ppl.compile(svae_slds.model, y, decoder=decoder, K=1.5)
