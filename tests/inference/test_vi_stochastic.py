"""Stochastic natural-gradient VI (``inference/vi/stochastic.py``, Hoffman et al. 2013) in backend "vi":

- the full batch with step size 1 *is* one coordinate-ascent sweep (bit for bit);
- the minibatch statistics scaled by D/B are unbiased: their average over every minibatch of B documents equals
  the full-corpus statistics (enumerated exactly on a tiny corpus);
- the step-size schedule, its validation, and a clear error where minibatches are not implemented;
- a stochastic fit reaches the batch fit's held-out perplexity and ELBO (the oracle: batch coordinate ascent,
  itself checked against scikit-learn and a dense implementation in test_vi_lda.py).
"""
import itertools

import pytest
import torch

import ppl
from ppl import dist
from ppl.inference.vi import lda as L
from ppl.expfam import natural_step
from ppl.inference.vi import stochastic
from ppl.models import lda

D64 = torch.float64


def structure(D=30, L_=12, seed=0):
    sim = lda.simulate(seed=seed, D=D, L=L_)
    kw = {**sim.kwargs, "dtype": D64}
    plan = ppl.compile(lda.model, *sim.args, **kw)
    return L.analyse(lda.model, sim.args, kw, plan.facts), sim


def test_full_batch_with_step_one_is_one_coordinate_ascent_sweep():
    s, _ = structure()
    lam0 = L.initial_lambda(s.eta, torch.Generator().manual_seed(1))
    batch = L.coordinate_ascent(s, lam0, 1, 0.0)
    assert stochastic.step_size(1, 0.0, 0.7) == 1.0
    online = L.stochastic_fit(s, lam0, 1, 0.0, s.corpus.D, 0.0, 0.7, torch.Generator().manual_seed(5))
    assert torch.equal(online.lam, batch.lam)
    # and the shared update itself: natural_step with rho = 1 returns the coordinate-ascent target unchanged
    target = torch.rand(3, 4, dtype=D64)
    assert natural_step(torch.rand(3, 4, dtype=D64), target, 1.0) is target


def test_scaled_minibatch_statistics_are_unbiased():
    s, _ = structure(D=6, L_=8)
    lam = L.initial_lambda(s.eta, torch.Generator().manual_seed(2))
    elog_beta = L.dirichlet_expected_log((lam,))
    full = L.e_step(s.corpus, s.alpha, elog_beta, L.initial_gamma(s.corpus, s.alpha))
    D, B = s.corpus.D, 4
    total = torch.zeros_like(full.sstats)
    subsets = list(itertools.combinations(range(D), B))
    for docs in subsets:
        docs = torch.tensor(docs)
        sub = s.corpus.subset(docs)
        est = L.e_step(sub, s.alpha[docs], elog_beta, L.initial_gamma(sub, s.alpha[docs]))
        # each document's q(theta) is the same whatever minibatch it is in
        torch.testing.assert_close(est.gamma, full.gamma[docs], rtol=1e-12, atol=1e-12)
        total += (D / B) * est.sstats
    torch.testing.assert_close(total / len(subsets), full.sstats, rtol=1e-12, atol=1e-12)
    # and so lambda_hat = eta + (D/B) s_B is unbiased for the coordinate-ascent target eta + s
    assert not torch.allclose((D / B) * est.sstats, full.sstats)     # a single minibatch is not the full value


def test_step_sizes_and_option_validation():
    assert stochastic.step_size(1, 10.0, 0.7) == pytest.approx(11 ** -0.7)
    assert stochastic.step_size(5, 0.0, 1.0) == pytest.approx(0.2)
    rhos = [stochastic.step_size(t, 1.0, 0.6) for t in range(1, 50)]
    assert all(a > b for a, b in zip(rhos, rhos[1:]))
    for args, word in (((0, 10.0, 0.7), "batch_size"), ((True, 10.0, 0.7), "batch_size"),
                       ((5, float("nan"), 0.7), "tau0"), ((5, 1.0, 0.3), "kappa"), ((5, 1.0, "0.7"), "kappa")):
        with pytest.raises(ValueError, match=word):
            stochastic.check_schedule(*args, num_units=10, unit="documents")
    stochastic.check_schedule(None, 0.0, 1.0, num_units=10, unit="documents")
    batches = stochastic.batches(10, 4, torch.Generator().manual_seed(0))
    assert [len(b) for b in batches] == [4, 4, 2]
    assert sorted(torch.cat(batches).tolist()) == list(range(10))


def test_minibatches_for_a_single_local_model_are_refused_clearly():
    @ppl.model
    def gmm(x):
        w = ppl.sample("w", dist.Dirichlet(torch.ones(2, dtype=D64)))
        with ppl.plate("c", 2):
            mu = ppl.sample("mu", dist.Normal(torch.zeros((), dtype=D64), 5.0))
        with ppl.plate("data", x.shape[0]):
            z = ppl.sample("z", dist.Categorical(w))
            ppl.sample("x", dist.Normal(mu[z], 1.0), obs=x)

    x = torch.cat([torch.randn(20, dtype=D64) - 3, torch.randn(20, dtype=D64) + 3])
    with pytest.raises(ValueError, match="batch_size=10 .*LDA-style admixtures only"):
        ppl.infer(gmm, x, backend="vi", batch_size=10, progress=False)
    with pytest.raises(ValueError, match="kappa"):
        ppl.infer(gmm, x, backend="vi", kappa=2.0, progress=False)


def test_stochastic_fit_reaches_the_batch_fit():
    sim = lda.simulate(seed=0)
    kw = {**sim.kwargs, "dtype": D64}
    batch = ppl.infer(lda.model, *sim.args, model_kwargs=kw, backend="vi", progress=False, num_samples=10,
                      restarts=1)
    online = ppl.infer(lda.model, *sim.args, model_kwargs=kw, backend="vi", progress=False, num_samples=10,
                       restarts=1, batch_size=10, num_steps=20)
    alpha = kw["alpha"]
    held_out, _, _ = lda.draw_documents(sim.truth["topics"], alpha, 100, 30, torch.Generator().manual_seed(100))
    ppx_batch = lda.fold_in_perplexity(batch.point["topics"], held_out, alpha)
    ppx_online = lda.fold_in_perplexity(online.point["topics"], held_out, alpha)
    # 20 passes of 10 minibatches: within 1% of the batch fit's perplexity, 0.5% of its ELBO (measured on
    # seeds 0-2 of simulate: +0.2-0.4% perplexity, -0.1% ELBO)
    assert ppx_online == pytest.approx(ppx_batch, rel=0.01)
    assert online.log_evidence.value == pytest.approx(batch.log_evidence.value, rel=0.005)
    assert len(online.history) == 21     # 20 passes' estimates, then the exact ELBO at the end
