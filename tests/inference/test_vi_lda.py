"""LDA in backend "vi" (``inference/vi/lda.py``) against oracles on the same input:

- a direct dense implementation of the same updates (explicit per-token phi, no sparse aggregation) written
  here: gamma, the expected topic-word counts, lambda and every ELBO term (with its own Dirichlet KL from
  lgamma/digamma) after a fixed number of E-step iterations;
- scikit-learn's ``LatentDirichletAllocation(learning_method="batch")`` with the same priors: its variational
  bound (``score``) at our q(topics) equals our ELBO, and the two fits reach the same bound, the same held-out
  perplexity and the same topics up to permutation;
- the ELBO never decreases in batch mode (float64 and float32); routing of the library model and of a user's
  own LDA written the same way; clear errors for bad options and for an admixture that is not conjugate;
- memory linear in the tokens: no tensor of the whole ``ppl.infer`` call has tokens x vocabulary elements.
"""
import copy
import itertools
import warnings

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import ppl
from ppl import dist
from ppl.inference.vi import lda as L
from ppl.inference.vi.cavi import ELBODecreased
from ppl.inference.vi.families import dirichlet_expected_log
from ppl.models import lda

D64 = torch.float64


def structure_of(model, args, kwargs) -> L.LDAStructure:
    plan = ppl.compile(model, *args, **kwargs)
    return L.analyse(model, args, kwargs, plan.facts)


def tiny():
    """4 documents of different lengths (padding masked) over V=6 words, K=2."""
    words = torch.tensor([[0, 1, 1, 2, 0], [3, 4, 5, 5, 3], [0, 5, 1, 4, 0], [2, 2, 3, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 1, 0], [1, 1, 1, 1, 1], [1, 1, 1, 0, 0]], dtype=torch.bool)
    return (words,), {"K": 2, "V": 6, "alpha": 0.7, "eta": 0.3, "mask": mask, "dtype": D64}


def dense_lkl(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """KL(Dir(a) || Dir(b)) per row, written out from lgamma and digamma."""
    a0 = a.sum(-1)
    return (torch.lgamma(a0) - torch.lgamma(a).sum(-1) - torch.lgamma(b.sum(-1)) + torch.lgamma(b).sum(-1)
            + ((a - b) * (torch.digamma(a) - torch.digamma(a0)[..., None])).sum(-1))


def dense_sweep(words, mask, alpha, eta, lam, gamma, iters):
    """The Blei et al. updates per token: phi (D, L, K), ``iters`` phi/gamma iterations, then phi at the final
    gamma, lambda = eta + sum phi, and the ELBO terms at (phi, gamma, lambda)."""
    m = mask.to(D64)
    elog_beta = torch.digamma(lam) - torch.digamma(lam.sum(-1, keepdim=True))      # (K, V)
    tok = elog_beta.T[words]                                                        # (D, L, K)

    def phi_of(g):
        elog_theta = torch.digamma(g) - torch.digamma(g.sum(-1, keepdim=True))
        return torch.softmax(elog_theta[:, None, :] + tok, -1)

    for _ in range(iters):
        gamma = alpha + (phi_of(gamma) * m[..., None]).sum(1)
    phi = phi_of(gamma) * m[..., None]
    sstats = torch.zeros_like(lam).index_add_(1, words.reshape(-1), phi.reshape(-1, lam.shape[0]).T)
    new_lam = eta + sstats
    elog_theta = torch.digamma(gamma) - torch.digamma(gamma.sum(-1, keepdim=True))
    new_elog_beta = torch.digamma(new_lam) - torch.digamma(new_lam.sum(-1, keepdim=True))
    terms = {"E log p(w)": float((phi * new_elog_beta.T[words]).sum()),
             "E log p(z)": float((phi * elog_theta[:, None, :]).sum()),
             "entropy(z)": float(-(phi * torch.where(phi > 0, phi.log(), 0)).sum()),
             "-KL(doc_topics)": -float(dense_lkl(gamma, alpha).sum()),
             "-KL(topics)": -float(dense_lkl(new_lam, eta).sum())}
    return gamma, sstats, new_lam, terms


def test_sweep_equals_dense_per_token_updates(monkeypatch):
    args, kw = tiny()
    s = structure_of(lda.model, args, kw)
    assert (s.corpus.D, s.corpus.V, s.K) == (4, 6, 2)
    assert float(s.corpus.count.sum()) == 17.0 and s.corpus.doc.shape[0] < 17     # masked out, duplicates merged
    monkeypatch.setattr(L, "E_TOL", 0.0)        # every document runs exactly E_MAX_ITER iterations
    monkeypatch.setattr(L, "E_MAX_ITER", 7)
    lam = L.initial_lambda(s.eta, torch.Generator().manual_seed(3))
    gamma0 = L.initial_gamma(s.corpus, s.alpha)
    new_lam, est, elog_old = L.sweep(s, s.corpus, s.alpha, lam, gamma0, 1.0, 1.0)
    terms = L.elbo_terms(s, est, elog_old, new_lam)
    words, mask = args[0], kw["mask"]
    alpha = torch.full((4, 2), 0.7, dtype=D64)
    g, sstats, dlam, dterms = dense_sweep(words, mask, alpha, torch.full((2, 6), 0.3, dtype=D64), lam,
                                          gamma0.clone(), 7)
    # gamma0 = alpha + N_d / K: one dense step from uniform phi
    assert torch.allclose(gamma0, alpha + mask.sum(1, keepdim=True).to(D64) / 2)
    torch.testing.assert_close(est.gamma, g, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(est.sstats, sstats, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(new_lam, dlam, rtol=1e-12, atol=1e-12)
    ours = terms
    assert set(ours) == set(dterms)
    for k in dterms:
        assert ours[k] == pytest.approx(dterms[k], rel=1e-10, abs=1e-10), k


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_elbo_never_decreases_in_batch_mode(dtype):
    sim = lda.simulate(seed=1, D=60, L=20, V=25, K=3)
    s = structure_of(lda.model, sim.args, {**sim.kwargs, "dtype": dtype})
    assert s.dtype == dtype and s.eta.dtype == dtype
    with warnings.catch_warnings():
        warnings.simplefilter("error", ELBODecreased)
        fit = L.coordinate_ascent(s, L.initial_lambda(s.eta, torch.Generator().manual_seed(0)), 60, 0.0)
    h = torch.tensor(fit.history, dtype=D64)
    assert len(h) == 60 and bool(torch.isfinite(h).all())
    slack = 1e-9 if dtype == torch.float64 else 1e-4 * float(h.abs().max())   # float32 E-step: round-off only
    assert float((h[1:] - h[:-1]).min()) >= -slack
    assert float(h[-1] - h[0]) > 10.0                                           # it did climb
    assert sum(v[-1] for v in fit.terms.values()) == pytest.approx(fit.history[-1], rel=1e-12)


def _counts(words: torch.Tensor, V: int) -> torch.Tensor:
    return torch.zeros(words.shape[0], V, dtype=D64).scatter_add_(1, words, torch.ones(words.shape, dtype=D64))


def _matched_tv(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest total-variation distance between the rows of a and b under the best permutation."""
    K = a.shape[0]
    best = min(itertools.permutations(range(K)), key=lambda p: float((a[list(p)] - b).abs().sum()))
    return float(0.5 * (a[list(best)] - b).abs().sum(-1).max())


def test_matches_sklearn_batch_lda():
    decomposition = pytest.importorskip("sklearn.decomposition")
    sim = lda.simulate(seed=0)
    (words,), kw = sim.args, {**sim.kwargs, "dtype": D64}
    K, V, alpha, eta = kw["K"], kw["V"], kw["alpha"], kw["eta"]
    X = _counts(words, V).numpy()
    post = ppl.infer(lda.model, words, model_kwargs=kw, backend="vi", progress=False, num_samples=10, tol=1e-8,
                     restarts=1)
    assert post.plan.backend == "vi"
    s = structure_of(lda.model, sim.args, kw)
    best, _ = L.fit(s, 500, 1e-8, 1, 0, None, 10.0, 0.7, False)      # what run() did: the same start
    assert best.elbo == post.log_evidence.value
    torch.testing.assert_close(best.lam / best.lam.sum(-1, keepdim=True), post.point["topics"])
    peer = decomposition.LatentDirichletAllocation(
        n_components=K, doc_topic_prior=alpha, topic_word_prior=eta, learning_method="batch", max_iter=40,
        mean_change_tol=1e-4, max_doc_update_iter=200, random_state=0).fit(X)
    # 1. scikit-learn's bound at OUR q(topics) (its own E-step, its own formula) = our ELBO
    at_ours = copy.deepcopy(peer)
    at_ours.components_ = best.lam.numpy()
    at_ours.exp_dirichlet_component_ = torch.exp(dirichlet_expected_log((best.lam,))).numpy()
    assert at_ours.score(X) == pytest.approx(best.elbo, abs=0.05)
    # 2. the two fits reach the same bound (ours at least as high up to 0.5 nats on 3000 words)
    assert best.elbo >= peer.score(X) - 0.5
    # 3. the same topics up to permutation, and the same held-out perplexity
    theirs = torch.as_tensor(peer.components_ / peer.components_.sum(1, keepdims=True))
    assert _matched_tv(post.point["topics"], theirs) < 0.02
    held_out, _, _ = lda.draw_documents(sim.truth["topics"], alpha, 100, 30, torch.Generator().manual_seed(100))
    ppx_ours = lda.fold_in_perplexity(post.point["topics"], held_out, alpha)
    ppx_theirs = lda.fold_in_perplexity(theirs, held_out, alpha)
    assert ppx_ours == pytest.approx(ppx_theirs, rel=0.005)


def test_library_model_routes_to_vi_and_recovers_topics():
    sim = lda.simulate(seed=2)
    plan = ppl.compile(lda.model, *sim.args, **sim.kwargs)
    assert plan.backend == "vi" and plan.rule == "conjugate-exponential"
    assert "Dirichlet per topic" in plan.explain()
    post = ppl.infer(lda.model, *sim.args, model_kwargs=sim.kwargs, progress=False, num_samples=10)
    errors = lda.recovery_errors(post, sim)
    assert errors["topics_max_abs"] < lda.TOLERANCES["topics_max_abs"]
    assert errors["topics_tv"] < lda.TOLERANCES["topics_tv"]


@ppl.model
def my_lda(docs, n_topics, vocab):
    """A user's own LDA: other names, the document plate first, no mask."""
    D, N = docs.shape
    with ppl.plate("themes", n_topics):
        phi = ppl.sample("phi", dist.Dirichlet(torch.full((vocab,), 0.5, dtype=D64)))
    with ppl.plate("docs", D, dim=-1):
        mix = ppl.sample("mix", dist.Dirichlet(torch.full((n_topics,), 0.5, dtype=D64)))
        with ppl.plate("tokens", N, dim=-2):
            topic = ppl.sample("topic", dist.Categorical(mix))
            ppl.sample("token", dist.Categorical(phi[topic]), obs=docs.T)


def test_user_written_lda_routes_and_equals_library_fit():
    sim = lda.simulate(seed=0, D=40, L=15)
    (words,) = sim.args
    plan = ppl.compile(my_lda, words, 3, 30)
    assert plan.backend == "vi", plan.explain()
    ours = ppl.infer(my_lda, words, 3, 30, progress=False, num_samples=10, restarts=1)
    lib = ppl.infer(lda.model, words, model_kwargs={**sim.kwargs, "dtype": D64}, backend="vi", progress=False,
                    num_samples=10, restarts=1)
    assert ours.log_evidence.value == pytest.approx(lib.log_evidence.value, rel=1e-10)
    torch.testing.assert_close(ours.point["phi"], lib.point["topics"])


def test_bad_options_and_non_conjugate_admixture_are_refused():
    sim = lda.simulate(seed=0, D=20, L=10)
    for opts, word in (({"batch_size": 0}, "batch_size"), ({"batch_size": 21}, "batch_size"),
                       ({"batch_size": 2.5}, "batch_size"), ({"tau0": -1.0}, "tau0"), ({"kappa": 0.5}, "kappa"),
                       ({"kappa": 1.5}, "kappa")):
        with pytest.raises(ValueError, match=word):
            ppl.infer(lda.model, *sim.args, model_kwargs=sim.kwargs, backend="vi", progress=False, **opts)

    @ppl.model
    def lognormal_topics(words, K=3, V=30):
        D, N = words.shape
        with ppl.plate("topic_plate", K):
            topics = ppl.sample("topics", dist.Dirichlet(torch.full((V,), 0.5)))
        with ppl.plate("documents", D, dim=-1):
            raw = ppl.sample("doc_topics", dist.Normal(torch.zeros(K), 1.0).to_event(1))
            with ppl.plate("words_in_doc", N, dim=-2):
                z = ppl.sample("z", dist.Categorical(logits=raw))
                ppl.sample("w", dist.Categorical(topics[z]), obs=words.T)

    plan = ppl.compile(lognormal_topics, *sim.args)
    assert plan.backend != "vi"
    with pytest.raises(ppl.backends.UnsupportedModelError, match="doc_topics"):
        ppl.compile(lognormal_topics, *sim.args, backend="vi")


def test_float32_large_vocabulary_sparse():
    """Vocabulary 1538 in float32 (the issue's failing case, at 300 short documents): finite, climbing ELBO;
    the corpus is held as at most one triple per token."""
    gen = torch.Generator().manual_seed(0)
    topics = lda.true_topics(10, 1538)
    words, _, _ = lda.draw_documents(topics, 0.1, 300, 12, gen)
    kw = {"K": 10, "V": 1538, "alpha": 0.1, "eta": 0.01, "dtype": torch.float32}
    s = structure_of(lda.model, (words,), kw)
    assert s.corpus.doc.shape[0] <= words.numel() and s.dtype == torch.float32
    fit = L.coordinate_ascent(s, L.initial_lambda(s.eta, gen), 15, 0.0)
    h = torch.tensor(fit.history, dtype=D64)
    assert bool(torch.isfinite(h).all()) and float(h[-1] - h[0]) > 0
    assert fit.lam.dtype == torch.float32 and bool(torch.isfinite(fit.lam).all())


@pytest.mark.parametrize("slots", [16, L.BLOCK_SLOTS])
def test_e_step_stops_each_document_like_a_per_document_loop(monkeypatch, slots):
    """With the real stopping rule (documents stop at different iterations, the working set shrinks) on documents
    of 0 to 25 words (in several length blocks, padded, and in one): every gamma equals a plain per-document
    loop's."""
    monkeypatch.setattr(L, "BLOCK_SLOTS", slots)
    sim = lda.simulate(seed=3, D=80, L=25, V=30, K=3)
    gen = torch.Generator().manual_seed(0)
    lengths = torch.cat([torch.full((10,), 25), torch.randint(5, 15, (10,), generator=gen),
                         torch.randint(0, 5, (60,), generator=gen)])[torch.randperm(80, generator=gen)]
    mask = torch.arange(25)[None, :] < lengths[:, None]
    s = structure_of(lda.model, sim.args, {**sim.kwargs, "dtype": D64, "mask": mask})
    assert bool((s.corpus.ptr[1:] == s.corpus.ptr[:-1]).any())                # an empty document
    assert len(L.length_blocks(s.corpus)) == (1 if slots > 2000 else 2)
    lam = L.initial_lambda(s.eta, torch.Generator().manual_seed(0))
    elog_beta = dirichlet_expected_log((lam,))
    est = L.e_step(s.corpus, s.alpha, elog_beta, L.initial_gamma(s.corpus, s.alpha))
    E = elog_beta.exp()
    iterations = []
    for d in range(s.corpus.D):
        part = slice(int(s.corpus.ptr[d]), int(s.corpus.ptr[d + 1]))
        w, c = s.corpus.word[part], s.corpus.count[part]
        g = s.alpha[d] + c.sum() / s.K
        for it in range(1, L.E_MAX_ITER + 1):
            et = torch.exp(torch.digamma(g) - torch.digamma(g.sum()))
            new = s.alpha[d] + et * (E[:, w] @ (c / (et @ E[:, w])))
            change, g = float((new - g).abs().mean()), new
            if change < L.E_TOL:
                break
        iterations.append(it)
        torch.testing.assert_close(est.gamma[d], g, rtol=1e-12, atol=1e-12)
    assert min(iterations) < max(iterations) and est.iterations == max(iterations)


class LargestTensor(TorchDispatchMode):
    """Records the largest storage (in elements) of any tensor an operation returns while active (a broadcast view
    counts the storage it views, not its shape)."""

    def __init__(self):
        super().__init__()
        self.largest, self.op = 0, None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            size = t.untyped_storage().nbytes() // t.element_size() if isinstance(t, torch.Tensor) else 0
            if size > self.largest:
                self.largest, self.op = size, str(func)
        return out


def test_compile_and_infer_allocate_linearly_in_the_tokens():
    """A vocabulary far larger than the corpus: no tensor of the whole ppl.infer call (tracing, dependencies,
    routing, the probes, the stochastic fit, the draws) has tokens x V elements; the largest is of the size of
    the topics (num_samples draws of K x V), not of the tokens x vocabulary the model's topics[z] would be."""
    K, V, D, Lw = 3, 20000, 40, 25
    sim = lda.simulate(seed=0, D=D, L=Lw, V=V, K=K)
    kw = {**sim.kwargs, "dtype": torch.float32}
    with LargestTensor() as mode:
        plan = ppl.compile(lda.model, *sim.args, **kw)
        post = ppl.infer(lda.model, *sim.args, model_kwargs=kw, batch_size=10, num_steps=1, restarts=1,
                         num_samples=2, progress=False)
    assert plan.backend == "vi" and bool(torch.isfinite(post.point["topics"]).all())
    assert mode.largest <= 2 * K * V, (mode.largest, mode.op, f"tokens x V = {D * Lw * V}")


@pytest.mark.parametrize("slots", [16, L.BLOCK_SLOTS])
def test_length_blocks_partition_the_documents_within_the_padding_bound(monkeypatch, slots):
    monkeypatch.setattr(L, "BLOCK_SLOTS", slots)
    sim = lda.simulate(seed=1, D=200, L=40, V=300, K=3)
    gen = torch.Generator().manual_seed(1)
    lengths = torch.cat([torch.randint(30, 41, (20,), generator=gen), torch.randint(0, 10, (180,), generator=gen)])
    mask = torch.arange(40)[None, :] < lengths[:, None]
    s = structure_of(lda.model, sim.args, {**sim.kwargs, "mask": mask})
    blocks = L.length_blocks(s.corpus)
    assert len(blocks) >= (2 if slots == 16 else 1) and sorted(torch.cat(blocks).tolist()) == list(range(200))
    triples = s.corpus.ptr[1:] - s.corpus.ptr[:-1]
    for docs in blocks:
        padded = L.PaddedDocs.of(s.corpus, docs)
        assert padded.word.numel() <= max(2 * int(triples[docs].clamp_min(1).sum()), slots)
        for row, d in enumerate(docs.tolist()):           # each row holds its document's triples, then zeros
            part = slice(int(s.corpus.ptr[d]), int(s.corpus.ptr[d + 1]))
            n = part.stop - part.start
            assert torch.equal(padded.word[row, :n], s.corpus.word[part])
            assert torch.equal(padded.count[row, :n], s.corpus.count[part]) and not bool(padded.count[row, n:].any())


def test_run_with_the_compile_time_structure_equals_a_fresh_probe():
    sim = lda.simulate(seed=0, D=30, L=10)
    plan = ppl.compile(lda.model, *sim.args, **sim.kwargs)
    s = L.analyse(lda.model, sim.args, sim.kwargs, plan.facts)
    opts = (50, 1e-6, 1, 0, 5, False, None, 10.0, 0.7)
    fresh = L.run(lda.model, sim.args, sim.kwargs, plan, *opts)
    given = L.run(lda.model, sim.args, sim.kwargs, plan, *opts, structure=s)
    assert given.log_evidence.value == fresh.log_evidence.value
    torch.testing.assert_close(given.point["topics"], fresh.point["topics"], rtol=0, atol=0)
