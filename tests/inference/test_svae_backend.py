"""The svae backend end to end: training improves the ELBO, the three terms are reported, minibatches (unbiased),
amortized encoding of new data, user recognition networks, clear errors."""
import itertools

import pyro
import pytest
import torch

import ppl
from ppl import dist
from tests.conftest import cuda_params
from tests.ppl.models_for_tests import ScaledIdentity


class Decoder(torch.nn.Module):
    def __init__(self, D=2, P=4):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(D, 16), torch.nn.Tanh(), torch.nn.Linear(16, P))

    def forward(self, x):
        return self.net(x)


def make_model(decoder):
    def lds_vae(y, mask=None):
        dec = ppl.module("decoder", decoder)
        A = ppl.param("A", 0.9 * torch.eye(2, dtype=y.dtype, device=y.device))
        x = ppl.gaussian_chain("x", 2, A, 0.1 * torch.eye(2, dtype=y.dtype, device=y.device), length=y.shape[-2])
        ppl.sample("y", dist.Normal(dec(x), 0.3).to_event(1), obs=y, mask=mask)
    return lds_vae


def sine_data(T=20, P=4, device="cpu"):
    t = torch.arange(T, dtype=torch.float32, device=device)
    phase = torch.stack([torch.sin(0.4 * t), torch.cos(0.4 * t)], -1)
    return torch.tanh(phase @ torch.tensor([[1.0, -0.5, 0.3, 0.8], [0.2, 0.9, -0.7, 0.4]], device=device)[:, :P])


@pytest.mark.parametrize("device", cuda_params())
def test_training_improves_elbo_and_reports_three_terms(device):
    torch.manual_seed(0)
    y = sine_data(device=device)
    model = make_model(Decoder().to(device))
    post = ppl.infer(model, y, num_steps=150, lr=0.02, progress=False, device=device)
    assert post.plan.backend == "svae" and post.plan.treatment("x") == "recognition potential"
    terms = post.elbo_terms
    assert set(terms) == {"recon", "local_kl", "global_term", "global_kl"} and len(terms["recon"]) == 150
    assert all(v >= -1e-6 for v in terms["local_kl"])  # a KL is non-negative
    first, last = sum(post.history[:10]) / 10, sum(post.history[-10:]) / 10
    assert last < first - 5.0
    assert post.smoothed_means["x"].shape == (20, 2)


def test_encode_conditions_on_observed_frames_only():
    torch.manual_seed(1)
    y = sine_data()
    model = make_model(Decoder())
    post = ppl.infer(model, y, num_steps=30, progress=False)
    mask = torch.arange(20) < 10
    full = post.encode(y)["x"].mean
    half = post.encode(y, mask=mask)["x"].mean
    later = post.encode(torch.where(mask.unsqueeze(-1), y, torch.zeros_like(y) + 5.0), mask=mask)["x"].mean
    assert torch.allclose(half, later)  # masked frames carry no information
    assert not torch.allclose(full[10:], half[10:])


def test_user_recognition_network_and_errors():
    torch.manual_seed(2)
    y = sine_data()
    model = make_model(Decoder())
    mine = torch.nn.Linear(4, 4)
    weight = mine.weight.detach().clone()
    post = ppl.infer(model, y, num_steps=5, recognition={"x": mine}, progress=False)
    used = post.networks["x"]  # a trained copy of the user's network (the user's is left as it was)
    assert isinstance(used, torch.nn.Linear) and used is not mine and torch.equal(mine.weight, weight)
    assert not torch.equal(used.weight, weight)
    with pytest.raises(ValueError, match=r"recognition= names unknown site\(s\) \['z'\]"):
        ppl.infer(model, y, num_steps=5, recognition={"z": mine}, progress=False)
    with pytest.raises(ValueError, match=r"must output 2 \* latent_dim = 4 numbers per node, got 3"):
        ppl.infer(model, y, num_steps=5, recognition={"x": torch.nn.Linear(4, 3)}, progress=False)


def test_encode_needs_svae():
    y = torch.randn(10)
    post = ppl.infer(lambda y: ppl.sample("y", dist.Normal(0.0, 1.0).expand([10]).to_event(1), obs=y), y,
                     progress=False)
    with pytest.raises(RuntimeError, match="encode\\(\\) needs backend 'svae'"):
        post.encode(y)


class ExactRecognition(torch.nn.Module):
    """Potentials of y = x + N(0, r I): mean y, variance r (no trainable parameters)."""

    def __init__(self, r):
        super().__init__()
        self.log_r = float(torch.tensor(r).log())

    def forward(self, y):
        return torch.cat([y, torch.full_like(y, self.log_r)], -1)


def test_conjugate_dirichlet_weights_get_natural_gradient_updates():
    """With exact potentials and separated clusters, q(pi) = Dir(alpha_0 + sum_n q(z_n)) -> the true counts."""
    torch.manual_seed(3)
    locs = torch.tensor([[-4.0, 0.0], [4.0, 0.0], [0.0, 5.0]], dtype=torch.float64)
    z = torch.tensor([0] * 30 + [1] * 15 + [2] * 5)
    y = locs[z] + 0.5 * torch.randn(50, 2, dtype=torch.float64)

    decoder = ScaledIdentity()

    def model(y):
        dec = ppl.module("dec", decoder)
        weights = ppl.sample("weights", dist.Dirichlet(torch.ones(3, dtype=y.dtype)))
        with ppl.plate("data", y.shape[0]):
            k = ppl.sample("z", dist.Categorical(weights))
            x = ppl.sample("x", dist.MultivariateNormal(locs[k], 0.1 * torch.eye(2, dtype=y.dtype)))
            ppl.sample("y", dist.Normal(dec(x), 0.15 ** 0.5).to_event(1), obs=y)

    plan = ppl.compile(model, y, backend="svae")
    assert plan.treatment("weights") == "natural gradient" and plan.treatment("z") == "message passing"
    post = ppl.infer(model, y, backend="svae", num_steps=10, lr=1e-6, natgrad_step=1.0,
                     recognition={"x": ExactRecognition(0.15)}, num_samples=2000, progress=False)
    counts = post.marginals("z").sum(0)
    assert torch.allclose(counts, torch.tensor([30.0, 15.0, 5.0], dtype=torch.float64), atol=0.1)
    alpha_mean = (1 + counts) / (3 + 50)
    assert torch.allclose(post.mean("weights"), alpha_mean, atol=0.01)  # 2000 Dirichlet draws: sd ~0.001
    kl = post.elbo_terms["global_kl"]
    assert kl[-1] > 0 and abs(kl[-1] - kl[-2]) < 1e-6  # converged coordinate ascent


def test_local_draws_follow_the_seed():
    """``post.sample(n, seed)`` draws the svae's local latents from the fitted q: the same seed gives the same
    draws, another seed other draws (the seed reaches the local sampler's generator)."""
    from tests.ppl.models_for_tests import neural_lds

    torch.manual_seed(0)
    post = ppl.infer(neural_lds, torch.randn(6, 3), num_steps=3, num_samples=2, progress=False)
    assert post.plan.backend == "svae"
    first, again, other = post.sample(4, seed=1)["x"], post.sample(4, seed=1)["x"], post.sample(4, seed=2)["x"]
    assert first.shape == (4, 6, 2)
    assert torch.equal(first, again), "same seed, same local draws"
    assert not torch.allclose(first, other), "another seed, other local draws"
    assert not torch.allclose(first[0], first[1]), "the n draws differ from each other"


def test_networks_passed_in_are_fitted_as_copies():
    """Before, a decoder given in model_kwargs (and a recognition network given in options) was trained in
    place: the same call twice started from different weights and gave different fits. Now ppl.infer fits
    deep copies: identical calls give identical ELBOs, the caller's modules keep their weights, and the
    trained ones live in the Posterior (``post.kwargs``, ``post.networks``)."""
    from ppl.models import svae_lds, vae

    sim = svae_lds.simulate(seed=0, N=4, T=6, num_test=1)
    decoder = sim.kwargs["decoder"]
    encoder = vae.make_networks(2, sim.args[0].shape[-1], seed=5).encoder
    before = {k: v.clone() for k, v in decoder.state_dict().items()}
    enc_before = {k: v.clone() for k, v in encoder.state_dict().items()}

    def fit():
        return ppl.infer(svae_lds.model, *sim.args, model_kwargs=sim.kwargs, num_steps=5, num_samples=2,
                         recognition={"x": encoder}, progress=False)

    first, second = fit(), fit()
    assert first.history == second.history, "the same call twice gives the same fit"
    for k, v in decoder.state_dict().items():
        assert torch.equal(v, before[k]), f"the caller's decoder was trained in place ({k})"
    for k, v in encoder.state_dict().items():
        assert torch.equal(v, enc_before[k]), f"the caller's encoder was trained in place ({k})"
    trained = first.kwargs["decoder"]
    assert trained is not decoder and any(not torch.equal(v, before[k]) for k, v in trained.state_dict().items())
    # encoding with the caller's (untrained) module runs the trained weights and leaves the module alone
    pred = svae_lds.predict_frames(first, sim.truth["test_frames"], 3, **sim.kwargs)
    assert torch.isfinite(pred.frames).all()
    for k, v in decoder.state_dict().items():
        assert torch.equal(v, before[k]), f"encode() loaded the fitted weights into the caller's decoder ({k})"


def test_the_minibatch_objective_and_conjugate_statistics_are_unbiased():
    """N = 5, B = 2: the average over all 10 batches of the scaled objective (likelihood and local KL times N/B,
    the global KL once) equals the full-data objective, and the average natural-gradient step (size 1: the
    coordinate optimum prior + N/B * batch counts) equals the full-data step. The decoder's scale is 0, so the
    likelihood does not depend on the draw of x and both sides are deterministic."""
    from tests.inference.test_distributed import dirichlet_mixture, mixture_data
    from ppl.inference.svae import backend as svae

    y = mixture_data(5)
    decoder = ScaledIdentity()
    with torch.no_grad():
        decoder.scale.zero_()
    model = dirichlet_mixture(decoder)
    plan = ppl.compile(model, y, backend="svae")
    with pyro.get_param_store().scope():
        step, _ = svae.build_step(model, (y,), {}, plan, natgrad_step=1.0)
        batches = svae._Minibatches(step, 5, 2)
        start = step.conjugates["weights"].natparam

        def evaluate(rows):
            step.conjugates["weights"].natparam = start
            loss = batches.loss_on(torch.tensor(rows), torch.Generator().manual_seed(0))
            return float(loss.detach()), step.conjugates["weights"].natparam

        full_loss, full_natparam = evaluate(list(range(5)))
        results = [evaluate(list(rows)) for rows in itertools.combinations(range(5), 2)]
    assert sum(r[0] for r in results) / len(results) == pytest.approx(full_loss, rel=1e-12)
    assert torch.allclose(torch.stack([r[1] for r in results]).mean(0), full_natparam, rtol=1e-12)
    assert not torch.allclose(results[0][1], full_natparam)   # one batch alone is not the full-data step


def test_minibatches_need_a_batch_of_sequences():
    from tests.ppl.models_for_tests import neural_lds

    with pytest.raises(ValueError, match=r"site 'x': batch_size= and data parallel training split a batch of "
                                         r"sequences \(a chain's nodes \(N, T\)\); its nodes have shape \(6,\)"):
        ppl.infer(neural_lds, torch.randn(6, 3), backend="svae", batch_size=2, num_steps=1, progress=False)
    with pytest.raises(ValueError, match="backend 'svae': batch_size must be None or an integer >= 1, got 0"):
        ppl.infer(neural_lds, torch.randn(6, 3), backend="svae", batch_size=0, num_steps=1, progress=False)


def test_minibatches_of_sequences_fit_the_lds_svae():
    """batch_size=2 of 8 sequences: the ELBO on all the data improves, the final pass covers every sequence."""
    from ppl.models import svae_lds

    sim = svae_lds.simulate(seed=0, N=8, T=6, P=4, num_test=1)
    post = ppl.infer(svae_lds.model, *sim.args, model_kwargs=sim.kwargs, backend="svae", num_steps=40,
                     batch_size=2, num_samples=2, progress=False)
    assert post.smoothed_means["x"].shape == (8, 6, 2)
    first, last = sum(post.history[:5]) / 5, sum(post.history[-5:]) / 5
    assert last < first
