"""Autoregressive likelihoods (ppl/autoregressive.py, models/autoregressive.py): teacher forcing against the
conditionals computed one step at a time, normalization over all 64 binary sequences of length 6, ancestral
samples against a fitted model's exact joint, bad input."""
import pytest
import torch

import ppl
from ppl.autoregressive import Autoregressive
from ppl.models import autoregressive as ar
from ppl.primitives import ModelInputError

T, K = 6, 3


def _one_step_log_prob(net, x: torch.Tensor) -> torch.Tensor:
    """Brute force: log p(x_t | x_<t) for each t from the network run on x_<t followed by noise (the entries at
    and after t replaced by random values), summed over t: ``(N, T) -> (N,)``."""
    gen = torch.Generator().manual_seed(7)
    total = torch.zeros(x.shape[0])
    for t in range(x.shape[1]):
        probe = x.clone()
        probe[:, t:] = torch.randint(0, K, probe[:, t:].shape, generator=gen)
        logits = torch.log_softmax(net(probe)[:, t, :], -1)
        total += logits.gather(-1, x[:, t:t + 1]).squeeze(-1)
    return total


@pytest.mark.parametrize("kind", ar.NETWORKS)
def test_teacher_forcing_equals_the_sum_of_the_conditionals_computed_one_step_at_a_time(kind):
    net = ar.make_network(kind, T, K, hidden=16, seed=1)
    with torch.no_grad():
        for p in net.parameters():                                   # weights far from the small start
            p.mul_(3.0)
        x = torch.randint(0, K, (20, T), generator=torch.Generator().manual_seed(0))
        teacher = Autoregressive(net, T, K).log_prob(x)
        brute = _one_step_log_prob(net, x)
    assert teacher.shape == (20,)
    assert torch.allclose(teacher, brute, atol=1e-5), (teacher - brute).abs().max()


@pytest.mark.parametrize("kind", ar.NETWORKS)
def test_the_exact_joint_over_every_sequence_sums_to_one(kind):
    net = ar.make_network(kind, T, 2, hidden=16, seed=2)
    joint = ar.exact_joint(net, T, 2)
    assert joint.shape == (64,) and abs(float(joint.sum()) - 1.0) < 1e-5


def _fit(net, x, steps=150, lr=0.05):
    """Maximum likelihood by Adam on the teacher-forced log-likelihood."""
    optim = torch.optim.Adam(net.parameters(), lr=lr)
    dist = Autoregressive(net, x.shape[1], 2)
    for _ in range(steps):
        loss = -dist.log_prob(x).mean()
        optim.zero_grad()
        loss.backward()
        optim.step()
    return net


@pytest.mark.parametrize("kind", ["made", pytest.param("conv", marks=pytest.mark.slow),
                                  pytest.param("lstm", marks=pytest.mark.slow)])
def test_ancestral_samples_follow_the_fitted_models_exact_joint(kind):
    """Fit on sequences of the second-order chain, then 20000 ancestral draws: their frequencies over the 64
    sequences match the model's exact joint (the sampler is one code path for every network; conv and lstm fit
    slower, so they run with the slow tests) (Pearson chi-square below the 0.999 quantile of chi2(63), ~103.4),
    and the fitted joint is near the true one (TV < 0.1; the sample of 2000 itself is ~0.06 away)."""
    sim = ar.simulate(seed=0, N=2000, network=kind, hidden=16)
    torch.manual_seed(0)
    net = _fit(sim.kwargs["net"], sim.args[0])
    joint = ar.exact_joint(net, T, 2).double()
    torch.manual_seed(1)
    draws = Autoregressive(net, T, 2).sample((20000,))
    assert draws.shape == (20000, T) and draws.dtype == torch.long
    index = (draws * (2 ** torch.arange(T - 1, -1, -1))).sum(-1)            # lexicographic, as all_sequences
    counts = torch.bincount(index, minlength=64).double()
    expected = 20000 * joint
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 103.4, chi2
    assert float(0.5 * (joint - sim.truth["joint"].double()).abs().sum()) < 0.1


def test_samples_under_a_plate_have_the_batch_shape():
    net = ar.make_network("made", T, K, hidden=8)
    assert Autoregressive(net, T, K).expand((5,)).sample((2,)).shape == (2, 5, T)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ar.NETWORKS)
def test_ppl_infer_fits_the_model_by_maximum_likelihood_on_the_exact_backend(kind):
    """The library protocol (as tests/models/test_library.py): simulate -> ppl.infer (auto) -> exact backend ->
    the joint recovered within TOLERANCES (measured TV 0.035-0.041 for made, conv, lstm)."""
    sim = ar.simulate(seed=0, network=kind)
    plan = ppl.compile(ar.model, *sim.args, **sim.kwargs)
    assert plan.backend == ar.EXPECTED_BACKEND and ar.EXPECTED_BACKEND in ar.__doc__
    post = ppl.infer(ar.model, *sim.args, model_kwargs=sim.kwargs, progress=False, **ar.infer_options(sim))
    errors = ar.recovery_errors(post, sim)
    assert errors["tv"] < ar.TOLERANCES["tv"], errors


def test_bad_inputs_name_the_argument_and_the_values():
    net = ar.make_network("made", T, 2)
    x = torch.zeros(4, T, dtype=torch.long)
    with pytest.raises(ModelInputError, match=r"values must lie in 0..K-1 = 0..1, got min 0 max 2"):
        ppl.compile(ar.model, x + 2 * (torch.arange(T) == 3), net=net, K=2)
    with pytest.raises(ModelInputError, match=r"long tensor \(sequences, length\), got \(4, 6\) torch.float32"):
        ppl.compile(ar.model, x.float(), net=net)
    with pytest.raises(ModelInputError, match="network must be one of"):
        ar.make_network("rnn", T, 2)
    with pytest.raises(ValueError, match=r"length must be a positive int, got 0"):
        Autoregressive(net, 0, 2)
    with pytest.raises(ValueError, match=r"net returned logits of shape \(4, 6, 2\) .* expected \(4, 6, 3\)"):
        Autoregressive(net, T, 3).log_prob(x)
