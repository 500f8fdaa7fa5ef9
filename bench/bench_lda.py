"""LDA in backend "vi" (stochastic natural-gradient VI, Hoffman et al. 2010) side by side with scikit-learn's
``LatentDirichletAllocation(learning_method="online")`` on the same synthetic corpus.

Corpus: K = 10 true topics over a 1000-word vocabulary (each a Dirichlet(0.05) draw), 2000 training documents of
50-150 words (padding masked) and 500 held-out documents of 100 words, proportions Dirichlet(0.1) (``--quick``:
500 training documents). Both fits: K = 10, scikit-learn's default priors alpha = eta = 1/K, minibatches of 128
documents, 10 passes, step sizes (10 + t)^-0.7 (scikit-learn's defaults), one start, float32 for ours.

Rows: the fit alone (ours: ``lda.stochastic_fit`` on the recognized sparse corpus; scikit-learn: ``fit`` on the
count matrix), and the whole ``ppl.infer`` call (tracing the model, probing it, the fit, posterior draws) against
the same scikit-learn fit. The notes give held-out perplexity (``models.lda.fold_in_perplexity``: one estimator
for both, first half folded in, second half scored) of one fit each at seeds 0, 1, 2 (``--quick``: seed 0), and
the final ELBO (ours) / bound (scikit-learn's ``score``; the same quantity, checked equal at the same topics in
tests/inference/test_vi_lda.py). ``targets`` judges the issue's numbers: perplexity <= scikit-learn's at <= its
wall time; it also gives each row's process CPU time of the last timed call (``time.process_time``: on a machine
shared with other jobs the fair comparison of single-threaded runs, whose wall times the load inflates).
"""
from __future__ import annotations

import statistics
import time
from typing import Any, Callable

import torch

import ppl
from bench.harness import Case
from ppl.analysis import analyze
from ppl.graph import trace_graph
from ppl.inference.vi import lda as vi_lda
from ppl.models import lda

MEASURED: dict[str, float] = {}   # filled by cases() and the timed calls, read by targets()
K, V, ALPHA, PASSES, BATCH = 10, 1000, 0.1, 10, 128


def corpus(D: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(training words (D, 150), their mask, held-out words (500, 100), true topics (K, V))."""
    gen = torch.Generator().manual_seed(seed)
    topics = torch._standard_gamma(torch.full((K, V), 0.05), generator=gen)
    topics = topics / topics.sum(-1, keepdim=True)
    words, _, _ = lda.draw_documents(topics, ALPHA, D, 150, gen)
    lengths = torch.randint(50, 151, (D,), generator=gen)
    mask = torch.arange(150)[None, :] < lengths[:, None]
    held_out, _, _ = lda.draw_documents(topics, ALPHA, 500, 100, gen)
    return words, mask, held_out, topics


def counts(words: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The document-word count matrix (D, V) scikit-learn takes."""
    return torch.zeros(words.shape[0], V).scatter_add_(1, words, mask.float())


def model_kwargs(mask):
    return dict(K=K, V=V, alpha=ALPHA, eta=1.0 / K, mask=mask, dtype=torch.float32)


def options(seed: int = 0) -> dict:
    return dict(backend="vi", batch_size=BATCH, num_steps=PASSES, restarts=1, seed=seed, num_samples=10,
                progress=False)


def sklearn_lda(seed: int = 0):
    from sklearn.decomposition import LatentDirichletAllocation
    return LatentDirichletAllocation(n_components=K, doc_topic_prior=ALPHA, topic_word_prior=1.0 / K,
                                     learning_method="online", batch_size=BATCH, max_iter=PASSES,
                                     learning_offset=10.0, learning_decay=0.7, random_state=seed)


def structure(words, mask) -> vi_lda.LDAStructure:
    kw = model_kwargs(mask)
    graph, trace = trace_graph(lda.model, (words,), kw)
    return vi_lda.analyse(lda.model, (words,), kw, analyze(graph, lda.model, (words,), kw, trace))


def fit_ours(s: vi_lda.LDAStructure, seed: int = 0) -> vi_lda.LDAFit:
    """What ``ppl.infer(..., **options(seed))`` runs after the compile."""
    fit, _ = vi_lda.fit(s, PASSES, 1e-6, 1, seed, BATCH, 10.0, 0.7, False)
    return fit


def measure(words, mask, held_out, seeds) -> str:
    """Held-out perplexity and final ELBO / bound of one fit each per seed; fills MEASURED."""
    s = structure(words, mask)
    X = counts(words, mask).numpy()
    ours, theirs, elbo, bound = [], [], [], []
    for seed in seeds:
        f = fit_ours(s, seed)
        ours.append(lda.fold_in_perplexity(f.lam / f.lam.sum(-1, keepdim=True), held_out, ALPHA))
        elbo.append(f.elbo)
        peer = sklearn_lda(seed).fit(X)
        topics = torch.as_tensor(peer.components_ / peer.components_.sum(1, keepdims=True), dtype=torch.float32)
        theirs.append(lda.fold_in_perplexity(topics, held_out, ALPHA))
        bound.append(float(peer.score(X)))
    MEASURED.update(ppx_ours=statistics.mean(ours), ppx_sklearn=statistics.mean(theirs))
    fmt = lambda xs: "/".join(f"{x:.1f}" for x in xs)  # noqa: E731
    return (f"held-out perplexity seeds {','.join(map(str, seeds))}: ours {fmt(ours)}, sklearn {fmt(theirs)}; "
            f"ELBO ours {fmt(elbo)}, sklearn bound {fmt(bound)}")


def cpu_timed(key: str, fn: Callable[[], Any]) -> Callable[[], Any]:
    """``fn`` recording the process CPU time of its last call in ``MEASURED[key]``."""
    def timed():
        start = time.process_time()
        out = fn()
        MEASURED[key] = time.process_time() - start
        return out
    return timed


def cases(quick: bool) -> list[Case]:
    D = 500 if quick else 2000
    words, mask, held_out, _ = corpus(D)
    X = counts(words, mask).numpy()
    note = measure(words, mask, held_out, (0,) if quick else (0, 1, 2))
    s = structure(words, mask)
    peer = {"sklearn online LDA": cpu_timed("cpu_sklearn", lambda: sklearn_lda().fit(X))}
    return [Case(f"LDA fit, {D} docs, V={V}, K={K}, {PASSES} passes of {BATCH} (fit only)",
                 cpu_timed("cpu_fit", lambda: fit_ours(s)), peer, note),
            Case(f"LDA whole ppl.infer (trace + probe + fit), {D} docs, V={V}, K={K}",
                 cpu_timed("cpu_infer", lambda: ppl.infer(lda.model, words, model_kwargs=model_kwargs(mask),
                                                          **options())), peer, "")]


def targets(rows: list[dict]) -> list[str]:
    """The issue's LDA numbers: held-out perplexity <= scikit-learn's at <= its wall time."""
    out = []
    ppx_ok = MEASURED.get("ppx_ours", float("inf")) <= MEASURED.get("ppx_sklearn", 0.0)
    out.append(f"LDA held-out perplexity <= scikit-learn online's (mean over seeds): "
               f"{'met' if ppx_ok else 'NOT met'} (ours {MEASURED.get('ppx_ours', float('nan')):.2f}, "
               f"sklearn {MEASURED.get('ppx_sklearn', float('nan')):.2f})")
    for r in rows:
        if r["task"].startswith("LDA") and r["peer_time"] is not None:
            what = "fit alone" if "fit only" in r["task"] else "whole ppl.infer"
            out.append(f"LDA wall time <= scikit-learn online's ({what}): {'met' if r['ratio'] >= 1 else 'NOT met'} "
                       f"(ours {r['ours']:.2f} s, sklearn {r['peer_time']:.2f} s)")
    if {"cpu_fit", "cpu_infer", "cpu_sklearn"} <= set(MEASURED):
        out.append(f"LDA process CPU time of the last timed call: fit alone {MEASURED['cpu_fit']:.2f} s, whole "
                   f"ppl.infer {MEASURED['cpu_infer']:.2f} s, sklearn online LDA {MEASURED['cpu_sklearn']:.2f} s")
    return out
