"""ppl.models.hmm against hmmlearn (the peer), plus recovery for Poisson / categorical emissions.

Convention for "our log-likelihood": log p(y | params) with the chain summed out, computed through
the model code: the model with its globals fixed by ``ppl.condition``, its chain tabulated by the
collapse interpreter (``ppl.handlers.tabulate``) and summed out by the exact forward algorithm
(``collapsed_log_normalizer``). (``post.log_evidence`` of the conditioned model would also count
log p(conditioned values) under their priors, since they become observed sites.) hmmlearn's
``startprob_`` is our fixed uniform initial distribution; no transition precedes the first step in
either library.
"""
import numpy as np
import pytest
import torch

import ppl
from ppl.models import hmm
from tests.reference.collapsed import exact_log_likelihood

hmmlearn_hmm = pytest.importorskip("hmmlearn.hmm")


def _params(sim, dtype):
    return {k: v.to(dtype) for k, v in sim.truth.items() if k != "z"}


def _lengths(y):
    return [y.shape[-1]] * (y.shape[0] if y.dim() == 2 else 1)


def _gaussian_peer(params, K):
    peer = hmmlearn_hmm.GaussianHMM(n_components=K, covariance_type="diag")
    peer.startprob_ = np.full(K, 1.0 / K)
    peer.transmat_ = params["trans"].double().numpy()
    peer.means_ = params["loc"].double().numpy()[:, None]
    peer.covars_ = (params["scale"].double().numpy() ** 2)[:, None]
    return peer


@pytest.mark.parametrize("N", [None, 3])
def test_gaussian_log_likelihood_matches_hmmlearn_float64(N):
    sim = hmm.simulate(seed=1, N=N, T=60)
    y = sim.args[0].double()
    params = _params(sim, torch.float64)
    ours = exact_log_likelihood(hmm.model, params, y, **sim.kwargs)
    theirs = _gaussian_peer(params, 3).score(y.reshape(-1, 1).numpy(), lengths=_lengths(y))
    assert abs(float(ours) - theirs) < 1e-8 * abs(theirs)  # same arithmetic up to rounding


def test_gaussian_log_likelihood_matches_hmmlearn_float32():
    sim = hmm.simulate(seed=2, N=2, T=80)
    y = sim.args[0].float()
    params = _params(sim, torch.float32)
    ours = exact_log_likelihood(hmm.model, params, y, **sim.kwargs)
    assert ours.dtype == torch.float32
    theirs = _gaussian_peer(params, 3).score(y.double().reshape(-1, 1).numpy(), lengths=_lengths(y))
    assert abs(float(ours) - theirs) < 1e-5 * abs(theirs)  # float32 rounding over 160 steps


def test_posterior_marginals_and_viterbi_match_hmmlearn():
    sim = hmm.simulate(seed=3, N=None, T=70)
    y = sim.args[0].double()
    params = _params(sim, torch.float64)
    post = ppl.infer(ppl.condition(hmm.model, params), y, model_kwargs=sim.kwargs, progress=False)
    peer = _gaussian_peer(params, 3)
    X = y.reshape(-1, 1).numpy()
    assert np.abs(post.marginals("z").numpy() - peer.predict_proba(X)).max() < 1e-8
    assert np.array_equal(post.viterbi("z").numpy(), peer.decode(X, algorithm="viterbi")[1])


def test_poisson_and_categorical_log_likelihoods_match_hmmlearn():
    sim = hmm.simulate(seed=4, N=2, T=50, emission="poisson")
    y, params = sim.args[0].double(), _params(sim, torch.float64)
    peer = hmmlearn_hmm.PoissonHMM(n_components=3)
    peer.startprob_, peer.transmat_ = np.full(3, 1 / 3), params["trans"].numpy()
    peer.lambdas_ = params["rate"].numpy()[:, None]
    theirs = peer.score(y.reshape(-1, 1).numpy().astype(int), lengths=_lengths(y))
    assert abs(float(exact_log_likelihood(hmm.model, params, y, **sim.kwargs)) - theirs) < 1e-8 * abs(theirs)

    sim = hmm.simulate(seed=4, N=2, T=50, emission="categorical", num_categories=5)
    y, params = sim.args[0], _params(sim, torch.float64)
    peer = hmmlearn_hmm.CategoricalHMM(n_components=3, n_features=5)
    peer.startprob_, peer.transmat_ = np.full(3, 1 / 3), params["trans"].numpy()
    peer.emissionprob_ = params["emission_probs"].numpy()
    theirs = peer.score(y.reshape(-1, 1).numpy(), lengths=_lengths(y))
    ours = exact_log_likelihood(hmm.model, params, y, **sim.kwargs)
    assert abs(float(ours) - theirs) < 1e-6 * abs(theirs)  # default float32 parameters for integer data


def test_map_fit_is_at_least_as_likely_as_hmmlearn_em():
    """Our MAP (flat Dirichlet, weak N(0, 10^2) / HalfNormal(10) priors) vs hmmlearn's EM from the
    same start: both are (local) maximizers of nearly the same objective."""
    sim = hmm.simulate(seed=0, N=4, T=100)
    y = sim.args[0].double()
    init = hmm.init_values(y, 3)
    post = ppl.infer(hmm.model, y, model_kwargs=sim.kwargs, progress=False, num_steps=400, lr=0.05, init=init)
    peer = hmmlearn_hmm.GaussianHMM(n_components=3, covariance_type="diag", params="tmc", init_params="",
                                    n_iter=200, tol=1e-8)
    peer.startprob_ = np.full(3, 1 / 3)
    peer.transmat_, peer.means_ = init["trans"].numpy(), init["loc"].numpy()[:, None]
    peer.covars_ = (init["scale"].numpy() ** 2)[:, None]
    X, lengths = y.reshape(-1, 1).numpy(), _lengths(y)
    em_score = peer.fit(X, lengths).score(X, lengths)
    ours = {k: post.mean(k) for k in ("trans", "loc", "scale")}
    our_score = float(exact_log_likelihood(hmm.model, ours, y, **sim.kwargs))
    assert our_score > em_score - 0.05  # at EM's maximum up to the weak priors' pull (measured 2e-4 nat)
    assert abs(post.log_evidence.value - our_score) < 1e-6 * abs(our_score)


@pytest.mark.parametrize("emission", ["poisson", "categorical"])
def test_poisson_and_categorical_fits_recover_their_parameters(emission):
    """Poisson and categorical emissions have conjugate priors (Gamma rates, Dirichlet rows): the compiler sends them
    to the vi backend (a full posterior in closed form, defaults only); the Gaussian one (a HalfNormal scale) to
    exact."""
    sim = hmm.simulate(seed=0, emission=emission)
    plan = ppl.compile(hmm.model, *sim.args, **sim.kwargs)
    assert plan.backend == hmm.BACKEND_BY_EMISSION[emission], plan.explain()
    post = ppl.infer(hmm.model, *sim.args, model_kwargs=sim.kwargs, progress=False)
    errors = hmm.recovery_errors(post, sim)
    tolerances = hmm.TOLERANCES_BY_EMISSION[emission]
    assert set(errors) == set(tolerances)
    for key, err in errors.items():
        assert err < tolerances[key], f"{emission}: {key} error {err:.3g} >= {tolerances[key]}"


@pytest.mark.parametrize("args, kwargs, match", [
    ((torch.zeros(2, 3, 4),), {}, "y must be a tensor of shape"),
    ((torch.zeros(10),), {"emission": "binomial"}, "emission must be one of"),
    ((torch.zeros(10),), {"K": 0}, "K must be an integer"),
    ((torch.zeros(10, dtype=torch.long),), {}, "floating point"),
    ((torch.tensor([0.0, 1.5, 2.0]),), {"emission": "poisson"}, "non-negative integers"),
    ((torch.tensor([0, 1, 2]),), {"emission": "categorical"}, "num_categories must be"),
    ((torch.tensor([0, 1, 5]),), {"emission": "categorical", "num_categories": 3},
     r"y must lie in \[0, num_categories"),
])
def test_bad_input_raises_value_error_naming_the_argument(args, kwargs, match):
    with pytest.raises(ValueError, match=match):
        hmm.model(*args, **kwargs)
