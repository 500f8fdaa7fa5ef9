"""``ppl.log_joint``: the log joint of given values, with latents left out of ``values`` summed out exactly
(issue 16: it used to refuse any model with a chain, and any model with a plate).

Oracles on the same inputs: enumeration of every state path of a tiny HMM and every assignment of a tiny
two-component mixture (``tests/reference/brute_force.py``), a dense joint Gaussian for a tiny LDS
(``tests/reference/dense_gaussian.py``), and the closed-form Normal density when every latent is given.
Float64 throughout, tolerance 1e-8 relative.
"""
from __future__ import annotations

import contextlib
import itertools

import pytest
import torch

import ppl
from ppl import dist
from tests.conftest import cuda_params
from tests.ppl.models_for_tests import normal_normal
from tests.reference import dense_gaussian
from tests.reference.brute_force import all_paths, path_log_potentials

F64 = torch.float64
TOL = 1e-8


def close(a, b) -> bool:
    a, b = float(torch.as_tensor(a).detach()), float(torch.as_tensor(b).detach())
    return abs(a - b) <= TOL * max(1.0, abs(b))


# ----------------------------------------------------------------------------- a tiny HMM (K = 3, T = 5)
@ppl.model
def hmm(y, K=3):
    trans = ppl.sample("trans", dist.Dirichlet(y.new_ones(K, K)).to_event(1))  # y: float64, on any device
    loc = ppl.sample("loc", dist.Normal(y.new_zeros(K), 10.0).to_event(1))
    init = y.new_tensor([0.5, 0.3, 0.2])
    with ppl.plate("sequences", y.shape[0]) if y.dim() == 2 else contextlib.nullcontext():
        z = ppl.markov_chain("z", K, trans, initial=init, length=y.shape[-1])
        ppl.sample("y", dist.Normal(loc[z], 1.0).to_event(1), obs=y)  # one event per sequence


HMM_VALUES = {"trans": torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.8, 0.1], [0.3, 0.3, 0.4]], dtype=F64),
              "loc": torch.tensor([-2.0, 0.5, 3.0], dtype=F64)}


def hmm_brute_force(y: torch.Tensor, values: dict) -> torch.Tensor:
    """log p(trans, loc) + sum over sequences of log sum over all K^T paths of p(path) p(y | path)."""
    trans, loc = values["trans"], values["loc"]
    K = loc.shape[0]
    prior = (dist.Dirichlet(torch.ones(K, K, dtype=F64)).to_event(1).log_prob(trans)
             + dist.Normal(torch.zeros(K, dtype=F64), 10.0).to_event(1).log_prob(loc))
    init = torch.tensor([0.5, 0.3, 0.2], dtype=F64)
    total = prior
    for seq in y.reshape(-1, y.shape[-1]):
        paths = all_paths(K, seq.shape[0])
        log_lik = dist.Normal(loc, 1.0).log_prob(seq[:, None])  # (T, K)
        total = total + torch.logsumexp(path_log_potentials(init.log(), trans.log(), log_lik, paths, False), 0)
    return total


def test_hmm_chain_summed_out_equals_enumerating_every_path():
    y = torch.tensor([-2.1, -1.5, 0.7, 2.9, 3.2], dtype=F64)
    got = ppl.log_joint(hmm, HMM_VALUES, y)
    assert got.dtype == F64 and got.dim() == 0
    assert close(got, hmm_brute_force(y, HMM_VALUES))


def test_hmm_batch_of_sequences_sums_each_sequence():
    y = torch.tensor([[-2.1, -1.5, 0.7, 2.9], [0.4, 0.6, -1.9, 3.3]], dtype=F64)
    assert close(ppl.log_joint(hmm, HMM_VALUES, y), hmm_brute_force(y, HMM_VALUES))


def test_hmm_with_the_path_given_is_the_plain_differentiable_joint():
    """Nothing left to sum out: the sum of every site's log-density, with gradients to the values."""
    y = torch.tensor([-2.1, -1.5, 0.7, 2.9, 3.2], dtype=F64)
    path = torch.tensor([0, 0, 1, 2, 2])
    loc = HMM_VALUES["loc"].clone().requires_grad_(True)
    got = ppl.log_joint(hmm, {"trans": HMM_VALUES["trans"], "loc": loc, "z": path}, y)
    trans = HMM_VALUES["trans"]
    want = (dist.Dirichlet(torch.ones(3, 3, dtype=F64)).to_event(1).log_prob(trans)
            + dist.Normal(torch.zeros(3, dtype=F64), 10.0).to_event(1).log_prob(loc)
            + torch.tensor([0.5, 0.3, 0.2], dtype=F64).log()[0]
            + trans.log()[path[:-1], path[1:]].sum()
            + dist.Normal(loc[path], 1.0).log_prob(y).sum())
    assert close(got, want)
    (grad,) = torch.autograd.grad(got, loc)
    residual = (y - loc[path]).detach()
    assert torch.allclose(grad, torch.zeros(3, dtype=F64).index_add(0, path, residual) - loc.detach() / 100.0)


# ----------------------------------------------------------------------------- a two-component mixture, N = 6
@ppl.model
def mixture(x):
    weights = ppl.sample("weights", dist.Dirichlet(torch.ones(2, dtype=F64)))
    with ppl.plate("components", 2):
        loc = ppl.sample("loc", dist.Normal(torch.zeros((), dtype=F64), 5.0))
    with ppl.plate("data", x.shape[0]):
        z = ppl.sample("z", dist.Categorical(weights))
        ppl.sample("x", dist.Normal(loc[z], 1.0), obs=x)


def test_mixture_assignments_summed_out_equals_enumerating_every_assignment():
    x = torch.tensor([-1.8, -2.2, 0.1, 2.4, 1.9, 2.6], dtype=F64)
    values = {"weights": torch.tensor([0.35, 0.65], dtype=F64), "loc": torch.tensor([-2.0, 2.0], dtype=F64)}
    scores = []
    for z in itertools.product(range(2), repeat=x.shape[0]):  # all 2^6 joint assignments
        z = torch.tensor(z)
        scores.append(values["weights"].log()[z].sum() + dist.Normal(values["loc"][z], 1.0).log_prob(x).sum())
    want = (torch.logsumexp(torch.stack(scores), 0)
            + dist.Dirichlet(torch.ones(2, dtype=F64)).log_prob(values["weights"])
            + dist.Normal(0.0, 5.0).log_prob(values["loc"]).sum())
    assert close(ppl.log_joint(mixture, values, x), want)


# ----------------------------------------------------------------------------- a tiny LDS (D = 2, N = 3, T = 5)
LDS_C = torch.tensor([[1.0, 0.0], [0.5, 1.0], [-0.3, 0.8]], dtype=F64)
LDS_Q = torch.tensor([[0.2, 0.05], [0.05, 0.1]], dtype=F64)


@ppl.model
def lds(y):
    A = ppl.sample("A", dist.Normal(torch.zeros(2, 2, dtype=F64), 0.5).to_event(2))
    x = ppl.gaussian_chain("x", 2, A, LDS_Q, initial_loc=torch.tensor([1.0, -1.0], dtype=F64),
                           length=y.shape[-2])
    ppl.sample("y", dist.Normal(x @ LDS_C.T, 0.4).to_event(2), obs=y)


def test_lds_path_integrated_out_equals_the_dense_gaussian():
    g = torch.Generator().manual_seed(3)
    y = torch.randn(5, 3, generator=g, dtype=F64)
    A = torch.tensor([[0.9, -0.2], [0.1, 0.8]], dtype=F64)
    T = y.shape[0]
    oracle = dense_gaussian.log_marginal(
        torch.tensor([1.0, -1.0], dtype=F64), torch.eye(2, dtype=F64), A.expand(T - 1, 2, 2), LDS_Q.expand(T - 1, 2, 2),
        torch.zeros(T - 1, 2, dtype=F64), LDS_C.expand(T, 3, 2), torch.zeros(T, 3, dtype=F64),
        (0.16 * torch.eye(3, dtype=F64)).expand(T, 3, 3), y, torch.ones(T, dtype=torch.bool))
    want = oracle + dist.Normal(torch.zeros(2, 2, dtype=F64), 0.5).to_event(2).log_prob(A)
    assert close(ppl.log_joint(lds, {"A": A}, y), want)


# ----------------------------------------------------------------------------- a plate, everything given
def test_a_plate_needs_no_value():
    """A plate is recorded as a sample site of its own; log_joint asked for its value (and refused every model
    with a plate)."""
    y = torch.tensor([0.3, -1.2, 2.0])
    got = ppl.log_joint(normal_normal, {"mu": torch.tensor(0.5)}, y)
    want = dist.Normal(1.0, 2.0).log_prob(torch.tensor(0.5)) + dist.Normal(0.5, 1.5).log_prob(y).sum()
    assert torch.allclose(got, want, atol=1e-6)


def test_summing_out_leaves_the_global_rng_alone():
    y = torch.tensor([-2.1, -1.5, 0.7], dtype=F64)
    torch.manual_seed(11)
    before = torch.rand(3)
    torch.manual_seed(11)
    ppl.log_joint(hmm, HMM_VALUES, y)
    assert torch.equal(torch.rand(3), before)


@pytest.mark.parametrize("values,site", [({"trans": HMM_VALUES["trans"]}, "'loc'"), ({}, "'trans'")])
def test_a_missing_continuous_global_is_refused_by_name(values, site):
    y = torch.tensor([-2.1, -1.5, 0.7], dtype=F64)
    with pytest.raises(ppl.ModelInputError, match=f"no value given for latent site.*{site}.*outside any chain"):
        ppl.log_joint(hmm, values, y)


@pytest.mark.parametrize("device", cuda_params())
def test_summed_out_result_is_on_the_datas_device_and_device_independent(device):
    y = torch.tensor([-2.1, -1.5, 0.7, 2.9, 3.2], dtype=F64)
    values = {k: v.to(device) for k, v in HMM_VALUES.items()}
    got = ppl.log_joint(hmm, values, y.to(device))
    assert got.device.type == device and close(got.cpu(), hmm_brute_force(y, HMM_VALUES))
