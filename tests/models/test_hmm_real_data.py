"""ppl.models.hmm with its defaults on real series shipped inside statsmodels (nothing downloaded), against
hmmlearn's best of several restarts on the same data (the peer; its initial distribution fixed to our uniform one,
``params`` without "s").

- Nile river annual flows 1871-1970 (``statsmodels.datasets.nile``, 100 values ~450-1400, a change point in 1898):
  Gaussian HMM, K = 2, routed to ``exact`` (MAP). Raw scale: with the old fixed priors (loc ~ N(0, 10^2), scale ~
  HalfNormal(10)) the fit settled ~470 nats below hmmlearn's, silently; the scale-aware default priors
  (``hmm.prior_location_scale``) and the data-driven restarts reach it.
- Yearly sunspot numbers 1700-2008 (``statsmodels.datasets.sunspots``, rounded to counts, 309 values 0-190):
  Poisson HMM, K = 3, routed to ``vi`` (a full posterior; ``post.point`` is q's mode).

- A user's own Gaussian HMM written in the DSL (``user_gaussian_hmm``: Dirichlet(1) transition rows, N(0, 100^2)
  means, HalfCauchy(50) scales, priors a user picks without looking at the library's) on the raw yearly sunspot
  numbers (309 values 0-190, K = 3), routed to ``exact``, against hmmlearn's best of 20 restarts: like with like,
  the initial distribution fixed uniform on both sides, or fitted on both (ours: a Dirichlet(1) latent ``p0``,
  whose MAP is hmmlearn's maximum-likelihood start probabilities).

Our log-likelihood is hmmlearn's ``score`` at our point estimate (same forward algorithm, float64).
"""
import warnings

import numpy as np
import pytest
import torch

import ppl
from ppl import dist
from ppl.inference.results import DegenerateFit
from ppl.models import hmm

hmmlearn_hmm = pytest.importorskip("hmmlearn.hmm")
sm_datasets = pytest.importorskip("statsmodels.datasets")

PEER_RESTARTS = 5   # hmmlearn's best of 5 here (bench/bench_fits.py compares with its best of 20)


def nile() -> torch.Tensor:
    """``(100,)`` float64 annual flows of the Nile at Aswan, 10^8 m^3."""
    return torch.tensor(sm_datasets.nile.load_pandas().data["volume"].values, dtype=torch.float64)


def sunspots() -> torch.Tensor:
    """``(309,)`` float64 yearly sunspot numbers rounded to integers (counts)."""
    return torch.tensor(np.round(sm_datasets.sunspots.load_pandas().data["SUNACTIVITY"].values), dtype=torch.float64)


def _peer(emission: str, K: int, seed: int, fit_initial: bool = False):
    """An unfitted hmmlearn HMM; the initial distribution fixed uniform (``params`` without "s") unless
    ``fit_initial``."""
    cls, params = (hmmlearn_hmm.GaussianHMM, "tmc") if emission == "gaussian" else (hmmlearn_hmm.PoissonHMM, "tl")
    params = "s" + params if fit_initial else params
    options = {"covariance_type": "diag"} if emission == "gaussian" else {}
    peer = cls(K, n_iter=200, tol=1e-6, random_state=seed, params=params, init_params=params, **options)
    if not fit_initial:
        peer.startprob_ = np.full(K, 1.0 / K)
    return peer


def peer_best(y: torch.Tensor, emission: str, K: int, restarts: int = PEER_RESTARTS, fit_initial: bool = False):
    """hmmlearn's fit with the best log-likelihood of ``restarts`` seeds (0, 1, ...)."""
    Y = y.numpy().reshape(-1, 1)
    fits = []
    for seed in range(restarts):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fits.append(_peer(emission, K, seed, fit_initial).fit(Y))
    return max(fits, key=lambda m: m.score(Y))


def our_log_likelihood(post, y: torch.Tensor, emission: str, K: int, scale_site: str = "scale") -> float:
    """hmmlearn's log p(y | our point estimate); the initial distribution is ``post.point["p0"]`` when the model
    has that site (fitted), else uniform. ``scale_site``: the site of the Gaussian emission sds."""
    peer = _peer(emission, K, 0)  # uniform startprob_ (kept: score does not initialize)
    if "p0" in post.point:
        peer.startprob_ = post.point["p0"].double().numpy()
    peer.transmat_ = post.point["trans"].double().numpy()
    if emission == "gaussian":
        peer.means_ = post.point["loc"].double().numpy()[:, None]
        peer.covars_ = post.point[scale_site].double().numpy()[:, None] ** 2
    else:
        peer.lambdas_ = post.point["rate"].double().numpy()[:, None]
    return float(peer.score(y.numpy().reshape(-1, 1)))


@ppl.model
def user_gaussian_hmm(y: torch.Tensor, K: int = 3, fit_initial: bool = False):
    """A new user's Gaussian HMM on ``y: (T,)``, priors chosen as a user would (not the library's data-scaled ones):
    transition rows ~ Dirichlet(1), means ~ N(0, 100^2), sds ~ HalfCauchy(50); the initial distribution uniform, or
    ``p0 ~ Dirichlet(1)`` when ``fit_initial``."""
    trans = ppl.sample("trans", dist.Dirichlet(y.new_ones(K, K)).to_event(1))
    loc = ppl.sample("loc", dist.Normal(y.new_zeros(K), 100.0).to_event(1))
    sigma = ppl.sample("sigma", dist.HalfCauchy(y.new_full((K,), 50.0)).to_event(1))
    p0 = ppl.sample("p0", dist.Dirichlet(y.new_ones(K))) if fit_initial else None
    z = ppl.markov_chain("z", num_states=K, transition=trans, initial=p0, length=y.shape[-1])
    ppl.sample("y", dist.Normal(loc[z], sigma[z]), obs=y)


def raw_sunspots() -> torch.Tensor:
    """``(309,)`` float64 yearly sunspot numbers 1700-2008, raw (not rounded)."""
    return torch.tensor(sm_datasets.sunspots.load_pandas().data["SUNACTIVITY"].values, dtype=torch.float64)


def test_gaussian_hmm_on_raw_scale_river_flows_reaches_hmmlearn():
    y = nile()
    with warnings.catch_warnings():
        warnings.simplefilter("error", DegenerateFit)            # a degenerate fit would fail here
        post = ppl.infer(hmm.hmm, y, model_kwargs={"K": 2}, progress=False)
    assert post.backend == "exact"
    theirs = peer_best(y, "gaussian", 2)
    ours = our_log_likelihood(post, y, "gaussian", 2)
    # MAP under weak priors (s_0 = 10 sd) vs maximum likelihood: the priors move the optimum by << 0.3 nats
    assert ours > theirs.score(y.numpy().reshape(-1, 1)) - 0.3
    assert sorted(post.point["loc"].tolist()) == pytest.approx(sorted(theirs.means_.ravel().tolist()), abs=5.0)


def test_fixed_small_prior_scale_on_raw_scale_data_is_what_failed():
    """The old default (prior_scale=10, priors centred at 0) on the same river flows: the fit is pulled far below
    the data-scaled default's, which is why the default follows the data."""
    y = nile()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fixed = ppl.infer(hmm.hmm, y, model_kwargs={"K": 2, "prior_scale": 10.0}, progress=False)
        default = ppl.infer(hmm.hmm, y, model_kwargs={"K": 2}, progress=False, restarts=1)
    assert our_log_likelihood(fixed, y, "gaussian", 2) < our_log_likelihood(default, y, "gaussian", 2) - 100


def test_poisson_hmm_on_yearly_sunspot_counts_finds_hmmlearns_optimum():
    """Default backend ``vi``: ``post.point`` (the mode of q: for the Dirichlet(1) transition rows the normalized
    expected counts n_ij / n_i, the EM update, not q's mean (n_ij + 1) / (n_i + K)) is at hmmlearn's maximum-
    likelihood optimum: rates within 1.0 (~3 sd of a rate estimated from ~100 counts of ~50) and log p(y | point)
    within the issue's 0.3 nats of hmmlearn's best (measured 0.012 below its best of 20; it was 1.17 at q's mean)."""
    y = sunspots()
    post = ppl.infer(hmm.hmm, y, model_kwargs={"K": 3, "emission": "poisson"}, progress=False)
    assert post.backend == "vi"
    theirs = peer_best(y, "poisson", 3)
    assert sorted(post.point["rate"].tolist()) == pytest.approx(sorted(theirs.lambdas_.ravel().tolist()), abs=1.0)
    ours = our_log_likelihood(post, y, "poisson", 3)
    assert ours > theirs.score(y.numpy().reshape(-1, 1)) - 0.3


def test_prior_location_scale_follows_the_observed_data():
    y = torch.tensor([100.0, 102.0, float("nan"), 98.0])
    mask = torch.tensor([True, True, False, True])
    center, s0 = hmm.prior_location_scale(y, mask, "gaussian", None)
    assert center == pytest.approx(100.0) and s0 == pytest.approx(hmm.PRIOR_WIDTH * 2.0)
    assert hmm.prior_location_scale(y[:2] * 0 + 5, None, "gaussian", None) == (5.0, hmm.PRIOR_WIDTH)  # constant
    assert hmm.prior_location_scale(torch.tensor([7.0]), None, "gaussian", None) == (7.0, hmm.PRIOR_WIDTH)
    assert hmm.prior_location_scale(torch.tensor([40.0, 80.0]), None, "poisson", None) == (0.0, hmm.PRIOR_WIDTH)
    assert hmm.prior_location_scale(y, mask, "gaussian", 3.0) == (0.0, 3.0)


@pytest.mark.parametrize("bad", [0.0, -1.0, True, "10"])
def test_prior_scale_must_be_positive_or_none(bad):
    with pytest.raises(ValueError, match="prior_scale must be a number > 0 or None"):
        hmm.prior_location_scale(torch.ones(5), None, "gaussian", bad)


@pytest.mark.parametrize("fit_initial", [False, True])
def test_user_gaussian_hmm_on_raw_sunspots_reaches_hmmlearns_best_of_20(fit_initial):
    """The user's model with ``ppl.infer`` defaults (exact backend: z summed out, MAP by L-BFGS from k-means
    starts) vs hmmlearn's best of 20 restarts, like with like (initial distribution uniform on both sides, or
    fitted on both). Measured gaps 0.004 nats in both cases (the priors' pull); 0.3 is the issue's bound. Both
    fits are deterministic (our seed 0, hmmlearn's seeds 0-19)."""
    y = raw_sunspots()
    with warnings.catch_warnings():
        warnings.simplefilter("error", DegenerateFit)
        post = ppl.infer(user_gaussian_hmm, y, model_kwargs={"K": 3, "fit_initial": fit_initial}, progress=False)
    assert post.backend == "exact"
    theirs = peer_best(y, "gaussian", 3, restarts=20, fit_initial=fit_initial)
    best = float(theirs.score(y.numpy().reshape(-1, 1)))
    ours = our_log_likelihood(post, y, "gaussian", 3, scale_site="sigma")
    assert ours > best - 0.3
    assert sorted(post.point["loc"].tolist()) == pytest.approx(sorted(theirs.means_.ravel().tolist()), abs=2.0)


@ppl.model
def wide_prior_hmm(y, K=2):
    """A user's Gaussian HMM with a fitted initial distribution (Dirichlet(1) ``p0``, whose MAP from one sequence is
    a vertex of the simplex) and wide priors: means N(0, 1000^2), sds Gamma(2, 0.01)."""
    trans = ppl.sample("trans", dist.Dirichlet(y.new_ones(K, K)).to_event(1))
    loc = ppl.sample("loc", dist.Normal(y.new_zeros(K), 1000.0).to_event(1))
    sigma = ppl.sample("sigma", dist.Gamma(y.new_full((K,), 2.0), 0.01).to_event(1))
    p0 = ppl.sample("p0", dist.Dirichlet(y.new_ones(K)))
    z = ppl.markov_chain("z", num_states=K, transition=trans, initial=p0, length=y.shape[-1])
    ppl.sample("y", dist.Normal(loc[z], sigma[z]), obs=y)


def test_a_simplex_latent_at_its_vertex_does_not_stop_the_fit():
    """p0's unconstrained coordinates run off to the vertex, where p0 rounds to exactly (0, 1) and the gradient is
    NaN (0 * log 0): L-BFGS used to keep that point as its best and stop there, silently (complete-data MAP means
    -231 and -175 for flows ~450-1400, 216 nats below); a NaN gradient now counts as outside the domain."""
    y = nile()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        post = ppl.infer(wide_prior_hmm, y, progress=False)
    best = peer_best(y, "gaussian", 2, fit_initial=True).score(y.numpy().reshape(-1, 1))
    assert our_log_likelihood(post, y, "gaussian", 2, scale_site="sigma") > best - 1.0
