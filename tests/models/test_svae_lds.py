"""LDS-SVAE (``ppl.models.svae_lds``) and its plain-VAE baseline (``ppl.models.vae``) on bouncing-dot
videos: both routed to the svae backend; the LDS-SVAE recovers the dot's angular frequency (closed form
pi v / (P-1)) in the eigenvalues of its dynamics and forecasts held-out videos far better than the
average frame; the VAE reconstructs held-out frames; missing frames and bad input are handled."""
import math

import pytest
import torch

import ppl
from ppl.models import svae_lds, vae
from ppl.primitives import ModelInputError
from tests.conftest import cuda_params


def check_errors(module, errors):
    assert set(errors) == set(module.TOLERANCES)
    for key, err in errors.items():
        assert err < module.TOLERANCES[key], f"{module.__name__}: {key} error {err:.3g} >= {module.TOLERANCES[key]}"


def fit(module, sim, **overrides):
    options = dict(module.infer_options(sim), **overrides)
    return ppl.infer(module.model, *sim.args, model_kwargs=sim.kwargs, progress=False, **options)


def test_both_compile_to_svae():
    sim = svae_lds.simulate(seed=0, N=4, T=6, num_test=1)
    plan = ppl.compile(svae_lds.model, *sim.args, **sim.kwargs)
    assert plan.backend == svae_lds.EXPECTED_BACKEND == "svae" and "``svae``" in svae_lds.__doc__
    assert plan.treatment("x") == "recognition potential" and plan.treatment("dynamics") == "point estimate"
    assert plan.facts.of("svae").targets["x"].kind == "lds"
    sim = vae.simulate(seed=0, N=10, num_test=1)
    plan = ppl.compile(vae.model, *sim.args, **sim.kwargs)
    assert plan.backend == vae.EXPECTED_BACKEND == "svae" and "``svae``" in vae.__doc__
    assert plan.treatment("x") == "recognition potential" and plan.facts.of("svae").targets["x"].kind == "gaussian"


@pytest.mark.parametrize("device", cuda_params())
def test_lds_svae_recovers_frequency_and_forecasts(device):
    # Protocol sizes (32 videos x 30 frames, 400 Adam steps, ~5 s on one CPU thread). Measured at seeds 0-3:
    # frequency error 0.08-1.1 %, forecast MSE 0.009-0.029 of the average frame's (tolerances 5 % and 0.25:
    # see svae_lds.TOLERANCES).
    sim = svae_lds.simulate(seed=0, device=device)
    post = fit(svae_lds, sim)
    assert post.plan.backend == "svae"
    check_errors(svae_lds, svae_lds.recovery_errors(post, sim))
    assert post.history[-1] < post.history[0]
    # the fitted dynamics is a rotation: |lambda| near 1 (a decaying A would forecast the mean frame)
    radius = torch.linalg.eigvals(post.point["dynamics"].detach().double().cpu()).abs()
    assert float((radius - 1).abs().max()) < 0.05


@pytest.mark.parametrize("device", cuda_params())
def test_vae_reconstructs_held_out_frames(device):
    # 300 frames, 800 steps (~3 s). Measured at seeds 0-3: relative MSE 0.011-0.016, centroid error
    # 0.09-0.16 px (tolerances 0.05 and 0.5 px: see vae.TOLERANCES).
    sim = vae.simulate(seed=0, device=device)
    post = fit(vae, sim)
    check_errors(vae, vae.recovery_errors(post, sim))
    # a masked frame's q is the prior, so its prediction is decoder(0) whatever the frame shows
    test = sim.truth["test_frames"][:4]
    mask = torch.tensor([True, False, True, False], device=test.device)
    pred = vae.reconstruct(post, test, mask=mask, **sim.kwargs)
    with torch.no_grad():
        prior_frame = post.kwargs["decoder"](test.new_zeros(2))  # the trained copy (ppl.infer fits a copy)
    torch.testing.assert_close(pred[1], prior_frame)
    torch.testing.assert_close(pred[3], prior_frame)


def test_encoding_one_model_leaves_the_other_decoder_alone():
    # Both models name their network "decoder"; encoding with the SVAE must not copy its weights into
    # the VAE's decoder (ppl.module reads the parameter store), nor the reverse.
    sim = svae_lds.simulate(seed=1, N=8, T=12, num_test=2)
    post_lds = fit(svae_lds, sim, num_steps=5)
    nets = vae.make_networks(2, 16, seed=1)
    kwargs = {"decoder": nets.decoder, "D": 2}
    post_vae = ppl.infer(vae.model, sim.args[0].reshape(-1, 16), model_kwargs=kwargs, progress=False, num_steps=5,
                         recognition={"x": nets.encoder})
    before = {k: v.clone() for k, v in nets.decoder.state_dict().items()}
    lds_before = {k: v.clone() for k, v in sim.kwargs["decoder"].state_dict().items()}
    svae_lds.predict_frames(post_lds, sim.truth["test_frames"], 6, **sim.kwargs)
    vae.reconstruct(post_vae, sim.truth["test_frames"].reshape(-1, 16), **kwargs)
    svae_lds.predict_frames(post_lds, sim.truth["test_frames"], 6, **sim.kwargs)
    for k, v in nets.decoder.state_dict().items():
        assert torch.equal(v, before[k]), k
    for k, v in sim.kwargs["decoder"].state_dict().items():
        assert torch.equal(v, lds_before[k]), k


def test_forecast_ignores_masked_frames_even_if_nan():
    # Frames after the prefix are masked: their values (here NaN) must not reach q(x). The forecast equals
    # the one made with the true frames there; the smoothed path follows the dynamics, x_{t+1} = A x_t.
    sim = svae_lds.simulate(seed=2, N=8, T=12, num_test=3)
    post = fit(svae_lds, sim, num_steps=20)
    test = sim.truth["test_frames"]
    holes = test.clone()
    holes[:, 6:] = float("nan")
    a = svae_lds.predict_frames(post, test, 6, **sim.kwargs)
    b = svae_lds.predict_frames(post, holes, 6, **sim.kwargs)
    assert bool(torch.isfinite(b.frames).all())
    torch.testing.assert_close(a.frames, b.frames)
    A = post.point["dynamics"]
    torch.testing.assert_close(b.latent_mean[:, 7:], b.latent_mean[:, 6:-1] @ A.mT, atol=1e-4, rtol=1e-4)
    # and training itself accepts NaN where the mask is False
    y = sim.args[0].clone()
    mask = svae_lds.prefix_mask(8, 12, 9)
    y[~mask] = float("nan")
    post = ppl.infer(svae_lds.model, y, model_kwargs=dict(sim.kwargs, mask=mask), progress=False, num_steps=3,
                     **{k: v for k, v in svae_lds.infer_options(sim).items() if k != "num_steps"})
    assert all(math.isfinite(v) for v in post.history)


def test_bad_input_is_refused_with_the_argument_named():
    sim = svae_lds.simulate(seed=0, N=4, T=6, num_test=1)
    y, dec = sim.args[0], sim.kwargs["decoder"]
    with pytest.raises(ValueError, match=r"y must be \(sequences, time >= 2, pixels\), got \(4, 6\)"):
        ppl.compile(svae_lds.model, y[..., 0], decoder=dec)
    with pytest.raises(ValueError, match="decoder must be a torch.nn.Module"):
        ppl.compile(svae_lds.model, y, decoder=lambda x: x)
    with pytest.raises(ValueError, match="D must be an integer >= 1, got 0"):
        ppl.compile(svae_lds.model, y, decoder=dec, D=0)
    with pytest.raises(ValueError, match=r"mask must be a bool tensor of shape \(sequences, time\) = \(4, 6\), "
                                         r"got \(6,\)"):
        ppl.compile(svae_lds.model, y, decoder=dec, mask=torch.ones(6, dtype=torch.bool))
    bad = y.clone()
    bad[0, 0, 0] = float("nan")
    with pytest.raises(ModelInputError, match="site 'y'"):
        ppl.compile(svae_lds.model, bad, decoder=dec)
    with pytest.raises(ValueError, match=r"observed must be in \[0, T=6\], got 7"):
        svae_lds.prefix_mask(4, 6, 7)
    frames = vae.simulate(seed=0, N=5, num_test=1)
    with pytest.raises(ValueError, match=r"y must be \(frames, pixels\), got \(4, 6, 16\)"):
        ppl.compile(vae.model, y, decoder=dec)
    with pytest.raises(ValueError, match=r"mask must be a bool tensor of shape \(frames,\) = \(5,\), got \(4,\)"):
        ppl.compile(vae.model, *frames.args, decoder=dec, mask=torch.ones(4, dtype=torch.bool))
