"""ppl.models.lds against pykalman (the peer); slds and factorial_hmm checks against dense oracles.

Convention for "our log-likelihood": log p(y | params) with the path integrated out, computed through
the model code: the model with its globals fixed by ``ppl.condition``, its chain probed by the
collapse interpreter (``ppl.handlers.tabulate``: Gaussian potentials of y in x) and integrated by the
exact Kalman kernel (``collapsed_log_normalizer``). pykalman's ``initial_state_mean/covariance`` are the
distribution of x_0, the state at the FIRST observation (no transition before it), as in our
gaussian_chain; its ``transition_offsets[t - 1]`` enters the step into t, so it gets ``B u_t`` for
t = 1..T-1 (u_0 is unused by both).
"""
import itertools

import numpy as np
import pytest
import torch

import ppl
from ppl import dist
from ppl.handlers import tabulate
from ppl.inference.chains import collapsed_log_normalizer
from ppl.models import factorial_hmm, lds, slds
from tests.reference.collapsed import exact_log_likelihood

pykalman = pytest.importorskip("pykalman")

GLOBALS = ("dynamics", "state_noise", "obs_offset", "obs_noise", "emission_free", "input_matrix")


def _peer(params: dict, inputs: torch.Tensor | None):
    p = {k: v.double().numpy() for k, v in params.items()}
    C = lds.emission_matrix(params.get("emission_free"), 2, params["dynamics"]).double().numpy()
    offsets = (inputs[1:].double() @ params["input_matrix"].double().T).numpy() if inputs is not None else None
    return pykalman.KalmanFilter(
        transition_matrices=p["dynamics"], observation_matrices=C,
        transition_covariance=np.diag(p["state_noise"] ** 2), observation_covariance=np.diag(p["obs_noise"] ** 2),
        transition_offsets=offsets,
        observation_offsets=p["obs_offset"], initial_state_mean=np.zeros(2), initial_state_covariance=np.eye(2))


@pytest.mark.parametrize("U", [1, None])
def test_log_likelihood_matches_pykalman_float64(U):
    sim = lds.simulate(seed=1, T=80, U=U)
    y = sim.args[0].double()
    kwargs = {k: (v.double() if isinstance(v, torch.Tensor) else v) for k, v in sim.kwargs.items()}
    params = {k: sim.truth[k].double() for k in GLOBALS if k in sim.truth}
    ours = exact_log_likelihood(lds.model, params, y, **kwargs)
    theirs = _peer(params, kwargs.get("inputs")).loglikelihood(y.numpy())
    assert abs(float(ours) - theirs) < 1e-9 * abs(theirs)  # same Gaussian, different algorithms: rounding only


def test_log_likelihood_matches_pykalman_float32():
    sim = lds.simulate(seed=2, T=100)
    y = sim.args[0].float()
    params = {k: sim.truth[k].float() for k in GLOBALS}
    ours = exact_log_likelihood(lds.model, params, y, **sim.kwargs)
    assert ours.dtype == torch.float32
    theirs = _peer(params, sim.kwargs["inputs"]).loglikelihood(y.double().numpy())
    assert abs(float(ours) - theirs) < 1e-4 * abs(theirs)  # float32 information-form filter over 100 steps


def test_smoothed_means_match_pykalman():
    sim = lds.simulate(seed=3, T=50)
    y = sim.args[0].double()
    kwargs = {"D": 2, "inputs": sim.kwargs["inputs"].double()}
    params = {k: sim.truth[k].double() for k in GLOBALS}
    post = ppl.infer(ppl.condition(lds.model, params), y, model_kwargs=kwargs, progress=False)
    theirs = _peer(params, kwargs["inputs"]).smooth(y.numpy())[0]
    assert np.abs(post.smoothed_means["x"].numpy() - theirs).max() < 1e-9


def test_batched_sequences_add_their_log_likelihoods():
    sim = lds.simulate(seed=4, N=3, T=40)
    y, u = sim.args[0].double(), sim.kwargs["inputs"].double()
    params = {k: sim.truth[k].double() for k in GLOBALS}
    ours = exact_log_likelihood(lds.model, params, y, D=2, inputs=u)
    theirs = sum(_peer(params, u[n]).loglikelihood(y[n].numpy()) for n in range(3))
    assert abs(float(ours) - theirs) < 1e-9 * abs(theirs)


@pytest.mark.parametrize("args, kwargs, match", [
    ((torch.zeros(10),), {}, "y must be a floating tensor of shape"),
    ((torch.zeros(10, 1),), {"D": 2}, "P >= D"),
    ((torch.zeros(10, 3),), {"D": 0}, "D must be an integer"),
    ((torch.zeros(10, 3),), {"inputs": torch.zeros(9, 1)}, "inputs must be a floating tensor of shape"),
])
def test_lds_bad_input_raises_value_error_naming_the_argument(args, kwargs, match):
    with pytest.raises(ValueError, match=match):
        lds.model(*args, **kwargs)


# --- slds: the collapsed chain given a path, against brute force over all regime paths -------------

def test_slds_collapsed_regimes_match_brute_force_enumeration():
    """With the globals and the path x fixed, the collapsed factor of s_z (forward algorithm over the
    regimes, x's per-step densities tabulated) equals log p(x | globals) = log sum over the K^T regime
    paths, by brute force. (y's density does not involve s_z: it is not part of that factor.)"""
    sim = slds.simulate(seed=5, T=6)
    y = sim.args[0].double()
    values = {k: v.double() for k, v in sim.truth.items() if k not in ("s_z",)}
    conditioned = ppl.condition(slds.slds, values)
    spec = ppl.compile(conditioned, y, **sim.kwargs).facts.collapse_spec()
    assert set(spec.discrete) == {"s_z"}
    ours = sum(collapsed_log_normalizer(t) for t in tabulate(conditioned, (y,), sim.kwargs, spec).values())
    x, trans, A, q = values["s_x"], values["trans"], values["dynamics"], values["state_noise"]
    terms = []
    for path in itertools.product(range(2), repeat=6):
        lp = torch.log(torch.tensor(0.5, dtype=torch.float64))
        lp = lp + sum(trans[a, b].log() for a, b in zip(path, path[1:]))
        lp = lp + dist.MultivariateNormal(x.new_zeros(2), torch.eye(2, dtype=x.dtype)).log_prob(x[0])
        for t in range(1, 6):
            lp = lp + dist.Normal(A[path[t]] @ x[t - 1], q).log_prob(x[t]).sum()
        terms.append(lp)
    assert abs(float(ours) - float(torch.logsumexp(torch.stack(terms), 0))) < 1e-9


def test_slds_bad_input_raises_value_error_naming_the_argument():
    with pytest.raises(ValueError, match="y must be a floating tensor of shape"):
        slds.model(torch.zeros(3, 10, 2))
    with pytest.raises(ValueError, match="K must be an integer"):
        slds.model(torch.zeros(10, 2), K=0)


# --- factorial HMM: the product-space chain against brute force over the M separate chains ---------

def test_factorial_log_likelihood_matches_brute_force_over_separate_chains():
    """log p(y | params) of the K^M joint chain equals the sum over all M-tuples of per-chain paths, and
    the per-chain marginals read off the joint chain's equal the brute-force ones."""
    sim = factorial_hmm.simulate(seed=6, N=None, T=4, M=2, K=2)
    y = sim.args[0].double()
    params = {k: sim.truth[k].double() for k in ("trans", "means", "scale")}
    ours = exact_log_likelihood(factorial_hmm.model, params, y, **sim.kwargs)
    M, K, T = 2, 2, 4
    terms = []
    for paths in itertools.product(itertools.product(range(K), repeat=T), repeat=M):
        lp = torch.tensor(M * np.log(1.0 / K), dtype=torch.float64)
        for m, path in enumerate(paths):
            lp = lp + sum(params["trans"][m, a, b].log() for a, b in zip(path, path[1:]))
        loc = torch.stack([sum(params["means"][m, paths[m][t]] for m in range(M)) for t in range(T)])
        terms.append(lp + dist.Normal(loc, params["scale"]).log_prob(y).sum())
    log_z = torch.logsumexp(torch.stack(terms), 0)
    assert abs(float(ours) - float(log_z)) < 1e-10
    weights = (torch.stack(terms) - log_z).exp()  # posterior probability of each M-tuple of paths
    tuples = list(itertools.product(itertools.product(range(K), repeat=T), repeat=M))
    brute = torch.zeros(T, M, K, dtype=torch.float64)
    for w, paths in zip(weights, tuples):
        for m, t in itertools.product(range(M), range(T)):
            brute[t, m, paths[m][t]] += w
    post = ppl.infer(ppl.condition(factorial_hmm.model, params), y, model_kwargs=sim.kwargs, progress=False)
    assert torch.allclose(factorial_hmm.chain_marginals(post.marginals("z"), M, K), brute, atol=1e-10)


def test_factorial_kron_and_state_digits_are_consistent():
    gen = torch.Generator().manual_seed(7)
    trans = torch.rand(3, 2, 2, generator=gen, dtype=torch.float64)
    trans = trans / trans.sum(-1, keepdim=True)
    joint = factorial_hmm.kron_transitions(trans)
    assert torch.allclose(joint, torch.kron(torch.kron(trans[0], trans[1]), trans[2]), atol=1e-15)
    digits = factorial_hmm.chain_states(torch.arange(8), 3, 2)
    for s, s2 in itertools.product(range(8), repeat=2):
        expected = torch.prod(torch.stack([trans[m, digits[s, m], digits[s2, m]] for m in range(3)]))
        assert abs(float(joint[s, s2] - expected)) < 1e-15


def test_factorial_bad_input_raises_value_error_naming_the_argument():
    with pytest.raises(ValueError, match="joint states exceed"):
        factorial_hmm.model(torch.zeros(10), M=5, K=4)
    with pytest.raises(ValueError, match="y must be a floating tensor"):
        factorial_hmm.model(torch.zeros(2, 3, 4))
