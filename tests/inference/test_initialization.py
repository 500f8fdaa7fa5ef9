"""Data-driven starts and restarts of the exact backend's MAP fit (inference/initialization.py): k-means hard
assignments of the finite discrete latents, a complete-data MAP, the best of several starts kept."""
import itertools
import warnings

import pytest
import torch

import ppl
from ppl import dist
from ppl.chain_dists import MarkovChain
from ppl.inference import training
from ppl.inference.initialization import (START_STEPS, align_labels, complete_data_map, complete_data_plan,
                                          discrete_features, hard_assignments, kmeans_labels)
from ppl.inference.results import DegenerateFit, warn_if_nearly_empty
from ppl.models import gmm as gmm_lib
from ppl.models import hmm as hmm_lib
from ppl.models._util import best_permutation


def test_kmeans_separates_well_separated_blobs():
    gen = torch.Generator().manual_seed(0)
    centers = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    truth = torch.arange(3).repeat_interleave(30)
    x = centers[truth] + torch.randn(90, 2, generator=gen)
    x[5, 0] = float("nan")                                     # a missing entry is filled, not fatal
    labels = kmeans_labels(x, 3, torch.Generator().manual_seed(1))
    table = torch.zeros(3, 3, dtype=torch.long).index_put_((truth, labels), torch.ones(90, dtype=torch.long),
                                                           accumulate=True)
    assert sorted(table.max(1).values.tolist()) == [30, 30, 30]   # each true blob in one cluster


def test_hard_assignments_follow_the_latents_shapes():
    sim = hmm_lib.simulate(seed=0, N=2, T=30)
    plan = ppl.compile(hmm_lib.hmm, *sim.args, **sim.kwargs)
    labels = hard_assignments(hmm_lib.hmm, sim.args, sim.kwargs, plan, torch.Generator().manual_seed(0))
    assert labels["z"].shape == (2, 30) and set(labels["z"].unique().tolist()) <= {0, 1, 2}
    (x,), kwargs, _ = gmm_lib.simulate(seed=0, N=50)
    plan = ppl.compile(gmm_lib.gmm, x, **kwargs)
    assert hard_assignments(gmm_lib.gmm, (x,), kwargs, plan, torch.Generator().manual_seed(0))["z"].shape == (50,)


def test_features_read_once_give_the_same_labels():
    """``data_driven_starts`` traces the model once (``discrete_features``) for all its restarts: the labels from
    those rows equal the ones ``hard_assignments`` computes from its own trace, seed by seed."""
    sim = hmm_lib.simulate(seed=0, N=2, T=30)
    plan = ppl.compile(hmm_lib.hmm, *sim.args, **sim.kwargs)
    features = discrete_features(hmm_lib.hmm, sim.args, sim.kwargs, plan)
    rows, K = features["z"]
    assert K == 3 and torch.equal(rows.double(), sim.args[0].reshape(-1, 1).double())
    for seed in range(3):
        once = hard_assignments(hmm_lib.hmm, sim.args, sim.kwargs, plan, torch.Generator().manual_seed(seed), features)
        own = hard_assignments(hmm_lib.hmm, sim.args, sim.kwargs, plan, torch.Generator().manual_seed(seed))
        assert torch.equal(once["z"], own["z"])


def test_features_are_read_without_sampling_the_chain(monkeypatch):
    """``discrete_features`` gives the latent chain the all-zeros path (``FirstStatePaths``) instead of a draw: the
    chain's sampler is never called, and the rows are the observed data (what a sampled trace gave)."""
    sim = hmm_lib.simulate(seed=1, N=2, T=40)
    plan = ppl.compile(hmm_lib.hmm, *sim.args, **sim.kwargs)

    def refuse(*args, **kwargs):
        raise AssertionError("the chain was sampled")

    monkeypatch.setattr(MarkovChain, "sample", refuse)
    rows, K = discrete_features(hmm_lib.hmm, sim.args, sim.kwargs, plan)["z"]
    assert K == 3 and torch.equal(rows.double(), sim.args[0].reshape(-1, 1).double())


def test_restarts_find_the_optimum_on_raw_scale_data():
    """A Gaussian HMM on data of scale ~300 +- 30: started with every mean at the prior's 0 and every sd at 1, a
    single fit stalls at the symmetric point (all three states the same, 276 nats below the optimum measured) and
    says so; the default data-driven restarts reach the fit started at the true parameters."""
    sim = hmm_lib.simulate(seed=1, N=1, T=300)
    y = sim.args[0] * 10 + 300
    kwargs = dict(sim.kwargs, prior_scale=1000.0)
    truth = {"trans": sim.truth["trans"], "loc": sim.truth["loc"] * 10 + 300, "scale": sim.truth["scale"] * 10}
    reference = ppl.infer(hmm_lib.hmm, y, model_kwargs=kwargs, init=truth, restarts=1, progress=False)
    with pytest.warns(DegenerateFit, match="of 'z' have the same probabilities"):  # no longer silent
        single = ppl.infer(hmm_lib.hmm, y, model_kwargs=kwargs, init={"loc": torch.zeros(3), "scale": torch.ones(3)},
                           restarts=1, progress=False)
    default = ppl.infer(hmm_lib.hmm, y, model_kwargs=kwargs, progress=False)
    assert single.log_evidence.value < reference.log_evidence.value - 20          # the failure restarts fix
    assert default.log_evidence.value > reference.log_evidence.value - 0.5
    perm = best_permutation(default.point["loc"], truth["loc"])
    assert float((default.point["loc"][perm] - truth["loc"]).abs().max()) < 3.0  # sd ~10, ~100 points a state


def test_a_mixture_needs_no_hand_made_init():
    (x,), kwargs, truth = gmm_lib.simulate(seed=3, N=300, K=3)
    post = ppl.infer(gmm_lib.gmm, x, model_kwargs=kwargs, progress=False)
    assert post.backend == "exact"
    perm = best_permutation(post.point["loc"], truth["loc"])
    assert float((post.point["loc"][perm] - truth["loc"]).abs().max()) < 0.35      # ~100 points a component


def test_restarts_must_be_a_positive_integer():
    (x,), kwargs, _ = gmm_lib.simulate(seed=0, N=20)
    with pytest.raises(ValueError, match="restarts must be an integer >= 1"):
        ppl.infer(gmm_lib.gmm, x, model_kwargs=kwargs, restarts=0, progress=False)


def test_an_empty_component_is_reported():
    """Two clusters fitted with K = 3 components whose third location is fixed far away: it stays empty."""
    x = torch.cat([torch.randn(40, 2) - 4, torch.randn(40, 2) + 4])
    fixed = ppl.condition(gmm_lib.gmm, {"loc": torch.tensor([[-4.0, -4.0], [4.0, 4.0], [100.0, 100.0]])})
    with pytest.warns(DegenerateFit, match="state 2 of 'z'"):
        ppl.infer(fixed, x, model_kwargs={"K": 3, "covariance": "diag"}, restarts=1, progress=False)


def test_nearly_empty_and_coinciding_states_are_reported():
    """The exact backend's checks on q(z) itself: a state holding ~1 of 40 entries, two identical columns; a clean
    q(z) passes silently."""
    gen = torch.Generator().manual_seed(0)
    clean = torch.softmax(5 * torch.randn(40, 3, generator=gen), -1)
    with warnings.catch_warnings():
        warnings.simplefilter("error", DegenerateFit)
        warn_if_nearly_empty({"z": clean}, "exact")
    lonely = torch.zeros(40, 3)
    lonely[:20, 0], lonely[20:, 1] = 1.0, 1.0
    lonely[7] = torch.tensor([0.0, 0.0, 1.0])                                   # state 2 holds one entry
    with pytest.warns(DegenerateFit, match="state 2 of 'z' holds an expected 1 of 40"):
        warn_if_nearly_empty({"z": lonely}, "exact")
    same = torch.cat([clean[:, :1], 0.5 * (1 - clean[:, :1]).expand(40, 2)], -1)   # states 1 and 2 coincide
    with pytest.warns(DegenerateFit, match="states 1 and 2 of 'z' have the same probabilities at all 40"):
        warn_if_nearly_empty({"z": same}, "exact")


def test_a_component_on_one_outlier_is_reported():
    """Two clusters and one far outlier with K = 3: the third component fits the outlier alone (its scale collapses
    onto it, held only by the prior); the fit says so."""
    gen = torch.Generator().manual_seed(0)
    x = torch.cat([torch.randn(40, 2, generator=gen) - 4, torch.randn(40, 2, generator=gen) + 4,
                   torch.tensor([[25.0, 25.0]])])
    with pytest.warns(DegenerateFit, match="holds an expected 1"):
        ppl.infer(gmm_lib.gmm, x, model_kwargs={"K": 3, "covariance": "diag"}, progress=False)


def test_align_labels_recovers_a_relabelling_and_matches_the_best_permutation_when_labels_agree_mostly():
    """Oracle: brute force over all K! permutations of the agreement count. A permuted copy of the reference
    with 10% of the entries changed is mapped back onto the reference's labels exactly."""
    gen = torch.Generator().manual_seed(0)
    K = 4
    reference = torch.randint(K, (200,), generator=gen)
    perm = torch.tensor([2, 0, 3, 1])
    labels = perm[reference]
    noisy = torch.rand(200, generator=gen) < 0.1
    labels[noisy] = torch.randint(K, (int(noisy.sum()),), generator=gen)
    aligned = align_labels(labels, reference, K)
    best = max(int((torch.tensor(p)[labels] == reference).sum()) for p in itertools.permutations(range(K)))
    assert int((aligned == reference).sum()) == best
    assert sorted(aligned.unique().tolist()) == sorted(labels.unique().tolist())


def _site(fn) -> dict:
    return {"name": "s", "fn": fn, "is_observed": False, "type": "sample", "infer": {}, "value": None}


def test_complete_data_starts_are_at_the_prior_mean_where_it_is_finite():
    """training.init_to_prior_mean (the first complete-data MAP's start): the prior mean, deterministic and of the
    site's shape, where it is finite and in the support; a HalfCauchy (infinite mean) falls back to the median of
    draws, which lies in the support."""
    normal = dist.Normal(torch.zeros(3), 10.0).to_event(1)
    assert torch.equal(training.init_to_prior_mean(_site(normal)), torch.zeros(3))
    dirichlet = dist.Dirichlet(torch.ones(2, 4))
    assert torch.allclose(training.init_to_prior_mean(_site(dirichlet)), torch.full((2, 4), 0.25))
    gamma = dist.Gamma(torch.tensor([2.0, 3.0]), 1.0)
    assert torch.equal(training.init_to_prior_mean(_site(gamma)), torch.tensor([2.0, 3.0]))
    half_cauchy = dist.HalfCauchy(torch.full((3,), 50.0))
    value = training.init_to_prior_mean(_site(half_cauchy))
    assert value.shape == (3,) and bool(torch.isfinite(value).all()) and bool((value > 0).all())


def test_the_first_complete_data_map_from_the_prior_mean_reaches_the_closed_form_optimum():
    """Oracle: with the labels fixed, a 1-D two-component mixture under N(0, 10^2) means, known unit scales and
    Dirichlet(1) weights has the complete-data MAP mean_k = sum_{z=k} x / (n_k + 1/100) and weights n_k / n."""
    gen = torch.Generator().manual_seed(0)
    labels = torch.arange(2).repeat_interleave(40)
    x = torch.tensor([-30.0, 50.0], dtype=torch.float64)[labels] + torch.randn(80, generator=gen, dtype=torch.float64)

    @ppl.model
    def mixture(x):
        weights = ppl.sample("weights", dist.Dirichlet(x.new_ones(2)))
        with ppl.plate("components", 2):
            loc = ppl.sample("loc", dist.Normal(x.new_zeros(()), 10.0))
        with ppl.plate("data", x.shape[0]):
            z = ppl.sample("z", dist.Categorical(weights))
            ppl.sample("x", dist.Normal(loc[z], 1.0), obs=x)

    fixed = complete_data_plan(mixture, (x,), {}, {"z": labels})
    point = complete_data_map(mixture, (x,), {}, {"z": labels}, fixed, START_STEPS)
    n = torch.bincount(labels).double()
    expected = torch.zeros(2, dtype=torch.float64).index_add_(0, labels, x) / (n + 1 / 100)
    assert torch.allclose(point["loc"], expected, atol=1e-5)
    assert torch.allclose(point["weights"], n / n.sum(), atol=1e-5)
