r"""Latent Dirichlet allocation (an admixture) in the vi backend: mean-field VB on a sparse corpus.

Recognized structure (by probing the model, as ``conjugacy`` does for one-local models): a Dirichlet latent
:math:`\theta_d` in a document plate (``doc_topics``, value ``(*docs, K)``), a Categorical latent
:math:`z_{dn} \sim \mathrm{Cat}(\theta_d)` per token (its plates: the tokens' dims, then the documents'), and an
observed Categorical :math:`w_{dn} \sim \mathrm{Cat}(\beta_{z_{dn}})` whose probabilities *are* the rows of a
Dirichlet global :math:`\beta` ``(K, V)`` indexed by :math:`z` (``topics[z]``). Masked or scaled tokens count
with their weight.

Variational family :math:`q(\beta)\,\prod_d q(\theta_d)\prod_n q(z_{dn})` with :math:`q(\beta_k)=\mathrm{Dir}(
\lambda_k)`, :math:`q(\theta_d) = \mathrm{Dir}(\gamma_d)`, :math:`q(z_{dn}) = \mathrm{Cat}(\phi_{dn})`; the
updates of Blei, Ng & Jordan (2003) and Hoffman, Bach & Blei (2010), on the corpus as (document, word, count)
triples, so memory is linear in the number of distinct (document, word) pairs:

.. math::
    \phi_{dwk} \propto \exp(E[\log\theta_{dk}] + E[\log\beta_{kw}]), \quad
    \gamma_{dk} = \alpha_{dk} + \textstyle\sum_w c_{dw}\phi_{dwk}, \quad
    \lambda_{kw} = \eta_{kw} + \textstyle\sum_d c_{dw}\phi_{dwk}

(the E-step iterates :math:`\phi, \gamma` per document until the mean change of :math:`\gamma_d` is below
``E_TOL``; the M-step sets :math:`\lambda`). Stochastic mode (``batch_size``): :math:`\lambda` takes the step
``ppl.expfam.natural_step`` towards :math:`\eta + \frac{D}{|B|}\sum_{d \in B}` (statistics of the minibatch).

The ELBO, in closed form term by term, at :math:`(\phi, \gamma, \lambda)` after each sweep:
``E log p(w)`` :math:`= \sum_{kw} s_{kw} E[\log\beta_{kw}]` (:math:`s` the expected topic-word counts),
``E log p(z)`` :math:`= \sum_{dk} n_{dk} E[\log\theta_{dk}]`, ``entropy(z)`` :math:`= -\sum c\,\phi\log\phi`,
``-KL(doc_topics)``, ``-KL(topics)`` (Dirichlet KLs). Every step maximizes it over one factor, so in batch mode
it never decreases.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.distributions import Dirichlet, kl_divergence

from ppl.expfam import natural_step
from ppl.plan import SiteTreatment
from ppl.posterior import LogEvidence

from .. import training
from ..results import make_posterior
from . import stochastic
from .cavi import SweepRecord, best_of_restarts, sweep_until
from .conjugacy import NotConjugate
from .families import dirichlet_expected_log
from .probe import close, num_states, peel, probe_runs, site_weight

E_TOL = 1e-3        # E-step: stop a document when the mean absolute change of gamma_d is below this (sklearn's)
E_MAX_ITER = 100    # E-step: at most this many phi/gamma iterations per document and sweep (sklearn's)
INIT_SHAPE = 100.0  # q(beta) starts at Gamma(100, 1/100) draws per entry (Hoffman et al. 2010; scikit-learn)
BLOCK_SLOTS = 16384  # E-step: a block of documents may always pad to this many words (a minibatch: one block)


# ---------------------------------------------------------------------------------------------- the corpus


@dataclass(frozen=True)
class Corpus:
    """A corpus as sorted (document, word, count) triples: ``doc, word (nnz,)`` long, ``count (nnz,)`` float,
    sorted by document; ``ptr (D + 1,)`` where document d's triples are ``ptr[d]:ptr[d + 1]``; ``D`` documents,
    ``V`` words."""

    doc: torch.Tensor
    word: torch.Tensor
    count: torch.Tensor
    ptr: torch.Tensor
    D: int
    V: int

    @staticmethod
    def from_tokens(doc: torch.Tensor, word: torch.Tensor, weight: torch.Tensor, D: int, V: int) -> "Corpus":
        """Aggregate tokens (any shape, broadcast together; weight 0 drops a token) into sorted unique
        (document, word) pairs with summed weights. Memory: O(number of tokens)."""
        doc, word, weight = (t.reshape(-1) for t in torch.broadcast_tensors(doc, word, weight))
        keep = weight != 0
        doc, word, weight = doc[keep], word[keep], weight[keep]
        key, inverse = torch.unique(doc * V + word, return_inverse=True)   # sorted: by document, then word
        count = weight.new_zeros(key.shape[0]).index_add_(0, inverse, weight)
        d = torch.div(key, V, rounding_mode="floor")
        ptr = torch.zeros(D + 1, dtype=torch.long, device=d.device)
        ptr[1:] = torch.bincount(d, minlength=D).cumsum(0)
        return Corpus(d, key - d * V, count, ptr, D, V)

    def subset(self, docs: torch.Tensor) -> "Corpus":
        """The documents ``docs (B,)`` renumbered 0..B-1 (their triples gathered, no scan of the corpus)."""
        idx, local, ptr = self.gather(docs)
        return Corpus(local, self.word[idx], self.count[idx], ptr, int(docs.shape[0]), self.V)

    def gather(self, docs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(indices of the triples of ``docs (B,)``, their renumbered document 0..B-1, the new ``ptr (B + 1,)``)."""
        start = self.ptr[docs]
        length = self.ptr[docs + 1] - start
        ptr = torch.zeros(docs.shape[0] + 1, dtype=torch.long, device=docs.device)
        ptr[1:] = length.cumsum(0)
        idx = torch.arange(int(ptr[-1]), device=docs.device) + torch.repeat_interleave(start - ptr[:-1], length)
        local = torch.repeat_interleave(torch.arange(docs.shape[0], device=docs.device), length)
        return idx, local, ptr

    def doc_lengths(self) -> torch.Tensor:
        """Total count per document ``(D,)``."""
        return self.count.new_zeros(self.D).index_add_(0, self.doc, self.count)


# ------------------------------------------------------------------------------------------ the structure


@dataclass(frozen=True)
class LDAStructure:
    """An admixture found in a model: site names, ``alpha (D, K)`` and ``eta (K, V)`` prior concentrations,
    the corpus, ``theta_shape`` the document-proportion site's value shape ``(*docs, K)``, and ``dtype``."""

    theta: str
    z: str
    w: str
    topics: str
    alpha: torch.Tensor
    eta: torch.Tensor
    corpus: Corpus
    theta_shape: tuple
    dtype: torch.dtype

    @property
    def K(self) -> int:
        return self.eta.shape[0]


def admixture_sites(facts) -> tuple[str, str, str, str] | None:
    """(theta, z, w, topics) when the facts have the admixture's layout (one finite discrete latent, one
    continuous latent sharing its plate, one other continuous latent, one observed site, nothing else); None
    otherwise (the one-local analysis then applies)."""
    if facts.markov_chains or facts.gaussian_chains or facts.neural or facts.unenumerable:
        return None
    if len(facts.enumerable) != 1 or len(facts.continuous_local) != 1 or len(facts.observed) != 1:
        return None
    theta = facts.continuous_local[0]
    others = [g for g in facts.continuous if g != theta]
    if len(others) != 1:
        return None
    return theta, facts.enumerable[0], facts.observed[0], others[0]


def _compact(p: torch.Tensor, dims: range) -> torch.Tensor:
    """``p`` with every dim in ``dims`` that is a broadcast (stride 0) view cut to size 1 (no copy)."""
    index = tuple(slice(0, 1) if i in dims and p.stride(i) == 0 else slice(None) for i in range(p.dim()))
    return p[index]


def _dirichlet(name: str, site_a: dict, site_b: dict) -> torch.Tensor:
    """The Dirichlet prior's concentration of ``name`` expanded to its value's shape, checked known."""
    base, _, _ = peel(site_a["fn"])
    other, _, _ = peel(site_b["fn"])
    if type(base).__name__ != "Dirichlet":
        raise NotConjugate(f"site '{name}': an admixture needs a Dirichlet prior here, got {type(base).__name__}")
    if not close(base.concentration, other.concentration):
        raise NotConjugate(f"site '{name}': its Dirichlet concentration depends on a latent variable")
    return base.concentration.expand(site_a["value"].shape)


def analyse(model, args, kwargs, facts) -> LDAStructure:
    """Probe ``model`` for the admixture (module docstring) and return its ``LDAStructure`` with the corpus as
    sparse counts; ``NotConjugate`` names the site that does not fit."""
    names = admixture_sites(facts)
    if names is None:
        raise NotConjugate("the model does not have the admixture layout (document proportions, a per-token "
                           "topic, observed words, topic-word rows)")
    theta, z, w, topics = names
    try:
        a, b = probe_runs(model, args, kwargs, z, expand=False)
    except (RuntimeError, IndexError, TypeError) as exc:
        raise NotConjugate(f"the model fails when run with '{z}' set to all its states at once (it must use it "
                           f"elementwise, e.g. topics[z]): {type(exc).__name__}: {exc}") from exc
    if a.params:
        raise NotConjugate(f"'{a.params[0]}' is a learnable parameter: backend 'vi' fits no parameters")
    alpha = _dirichlet(theta, a.sites[theta], b.sites[theta])
    eta = _dirichlet(topics, a.sites[topics], b.sites[topics])
    zfn_a, zfn_b = a.sites[z]["fn"], b.sites[z]["fn"]
    if type(zfn_a).__name__ != "Categorical":
        raise NotConjugate(f"site '{z}': an admixture's topic must be a Categorical, got {type(zfn_a).__name__}")
    if a.sites[z]["mask"] is not None or not (isinstance(a.sites[z]["scale"], float) and a.sites[z]["scale"] == 1):
        raise NotConjugate(f"site '{z}': a masked or scaled topic latent is not supported by backend 'vi'")
    zshape = tuple(zfn_a.batch_shape)
    tv_a, tv_b = a.sites[theta]["value"], b.sites[theta]["value"]
    docs = tuple(tv_a.shape[:-1])
    K = tv_a.shape[-1]
    if num_states(zfn_a) != K or tuple(zshape[len(zshape) - len(docs):]) != docs:
        raise NotConjugate(f"site '{z}': its plates {zshape} must end with the document plate(s) {docs} of "
                           f"'{theta}' and it must have {K} states like '{theta}', got {num_states(zfn_a)}")
    if not (_is(zfn_a.probs, tv_a) and _is(zfn_b.probs, tv_b)):
        raise NotConjugate(f"site '{z}': its probabilities must be the document's proportions '{theta}' "
                           "(Categorical(theta))")
    site = a.sites[w]
    base, extra, inner_mask = peel(site["fn"])
    if type(base).__name__ != "Categorical" or extra:
        raise NotConjugate(f"site '{w}': an admixture's words must be Categorical, got {type(base).__name__}")
    topics_a, topics_b = a.sites[topics]["value"], b.sites[topics]["value"]
    if topics_a.dim() != 2 or topics_a.shape[0] != K:
        raise NotConjugate(f"site '{topics}': the topic-word rows must be ({K}, V), got {tuple(topics_a.shape)}")
    V = topics_a.shape[1]
    for run, tv in ((a, topics_a), (b, topics_b)):
        pb, _, _ = peel(run.sites[w]["fn"])
        if not _is_indexed(pb.probs, tv, len(zshape)):
            raise NotConjugate(f"site '{w}': its probabilities must be the rows of '{topics}' picked by '{z}' "
                               f"(Categorical(topics[z]))")
    dtype = torch.promote_types(alpha.dtype, eta.dtype)
    words = site["value"].long()
    weight = site_weight(site, inner_mask, dtype, words.device)
    if weight.dim() > len(zshape) and weight.shape[0] == K:   # a mask laid out with the probed state dim
        weight = weight[0]
    try:
        words, weight = torch.broadcast_tensors(words.expand(zshape) if words.shape != zshape else words,
                                                weight.expand(zshape) if weight.shape != zshape else weight)
    except RuntimeError as exc:
        raise NotConjugate(f"site '{w}': its values {tuple(words.shape)} do not lie on the plates {zshape} of "
                           f"'{z}'") from exc
    bad = (weight != 0) & ((words < 0) | (words >= V))
    if bool(bad.any()):
        raise ValueError(f"site '{w}': word ids must be in [0, V={V}) where observed, got "
                         f"{int(words[bad][0])}")
    D = int(torch.Size(docs).numel())
    doc = torch.arange(D, device=words.device).reshape(docs)
    corpus = Corpus.from_tokens(doc, words, weight, D, V)
    return LDAStructure(theta, z, w, topics, alpha.reshape(D, K).to(dtype), eta.to(dtype), corpus,
                        tuple(tv_a.shape), dtype)


def _is(p: torch.Tensor, value: torch.Tensor) -> bool:
    """``p`` broadcast from ``value`` over leading dims (compared on the broadcast view's distinct entries)."""
    lead = p.dim() - value.dim()
    return lead >= 0 and tuple(p.shape[lead:]) == tuple(value.shape) and close(_compact(p, range(lead)), value)


def _is_indexed(p: torch.Tensor, value: torch.Tensor, nz: int) -> bool:
    """``p (K, *zshape, V)`` is ``value (K, V)`` indexed by the probed state dim, broadcast over the data."""
    if p.dim() != nz + 2 or p.shape[0] != value.shape[0] or p.shape[-1] != value.shape[-1]:
        return False
    small = _compact(p, range(1, nz + 1))
    target = value.reshape((value.shape[0],) + (1,) * nz + (value.shape[1],))
    return close(small, target)


# ----------------------------------------------------------------------------------------------- the fit


def expected_log_theta(gamma: torch.Tensor) -> torch.Tensor:
    r""":math:`E_q[\log\theta_d] = \psi(\gamma_d) - \psi(\sum_k \gamma_{dk})`: ``(D, K)``."""
    return dirichlet_expected_log((gamma,))


@dataclass
class EStep:
    r"""One E-step's result on a set of documents: ``gamma (B, K)``, ``sstats (K, V)`` the expected topic-word
    counts :math:`\sum_d c_{dw}\phi_{dwk}`, ``ndk (B, K)`` the expected topic counts per document, ``loglik``
    :math:`\sum c \log \sum_k \exp(E\log\theta + E\log\beta)` (so that the entropy of q(z) is
    ``loglik - <ndk, Elog theta> - <sstats, Elog beta>``), ``iterations`` the largest count any document ran."""

    gamma: torch.Tensor
    sstats: torch.Tensor
    ndk: torch.Tensor
    loglik: torch.Tensor
    iterations: int


def e_step(corpus: Corpus, alpha: torch.Tensor, elog_beta: torch.Tensor, gamma: torch.Tensor) -> EStep:
    r"""Iterate :math:`\phi_{dw} \propto \exp(E\log\theta_d + E\log\beta_{\cdot w})`, :math:`\gamma_d = \alpha_d +
    \sum_w c_{dw}\phi_{dw}` from ``gamma (B, K)`` for every document of ``corpus`` (a document stops when its mean
    change is below ``E_TOL``, each one independently of the others), then the statistics at
    :math:`\phi(\gamma)`. ``alpha (B, K)``, ``elog_beta (K, V)``.

    The documents run in blocks of similar length (``length_blocks``), each laid out padded (``PaddedDocs``) so
    that both sums over a document's words are batched matrix products; a padded block holds at most twice its
    triples or ``BLOCK_SLOTS`` words, so memory is O(nnz K).

    Exponentials of :math:`E\log\beta` are taken after subtracting each word's largest (and those of
    :math:`E\log\theta` after the loop each document's largest; both added back in ``loglik``), so float32 does
    not underflow where it matters (inside the loop the largest :math:`\exp E\log\theta_{dk}` is of order 1/K)."""
    shift_w = elog_beta.max(0).values                                   # (V,)
    eb = (elog_beta - shift_w).exp()                                    # (K, V)
    gamma = gamma.clone()
    ndk = torch.zeros_like(gamma)
    wk = gamma.new_zeros(elog_beta.shape[::-1])                         # (V, K): sum_d c_dw / norm_dw * et_dk
    loglik = torch.zeros((), dtype=torch.float64, device=gamma.device)
    iterations = 0
    for docs in length_blocks(corpus):
        block = PaddedDocs.of(corpus, docs)
        ebt = eb[:, block.word].permute(1, 0, 2).contiguous()          # (B, K, n): exp(E log beta) of its words
        g, its = _fixed_point(ebt, block.count, alpha[docs], gamma[docs])
        gamma[docs] = g
        iterations = max(iterations, its)
        elog = expected_log_theta(g)
        shift_d = elog.max(-1, keepdim=True).values
        et = (elog - shift_d).exp()                                     # (B, K)
        norm = _norm(et, ebt)                                           # (B, n)
        weight = block.count / norm
        ndk[docs] = et * torch.bmm(ebt, weight.unsqueeze(-1)).squeeze(-1)
        wk.index_add_(0, block.word.reshape(-1), (weight.unsqueeze(-1) * et.unsqueeze(1)).reshape(-1, et.shape[-1]))
        loglik = loglik + (block.count.double() * (norm.log() + shift_d + shift_w[block.word]).double()).sum()
    return EStep(gamma, wk.T * eb, ndk, loglik, iterations)


def _norm(et: torch.Tensor, ebt: torch.Tensor) -> torch.Tensor:
    r""":math:`\sum_k e^{E\log\theta_{dk}} e^{E\log\beta_{kw}}` for every padded word: ``(B, n)`` from ``et (B, K)``
    and ``ebt (B, K, n)`` (at least the smallest positive float: a padded word has count 0)."""
    return torch.bmm(et.unsqueeze(1), ebt).squeeze(1).clamp_min(torch.finfo(et.dtype).tiny)


def _fixed_point(ebt: torch.Tensor, count: torch.Tensor, alpha: torch.Tensor, gamma: torch.Tensor
                 ) -> tuple[torch.Tensor, int]:
    r"""The E-step's iteration :math:`\gamma_d \leftarrow \alpha_d + e^{E\log\theta_d} \odot \sum_w
    \frac{c_{dw}}{norm_{dw}} e^{E\log\beta_{\cdot w}}` on one padded block (``ebt (B, K, n)``, ``count (B, n)``,
    ``alpha, gamma (B, K)``) until every document's mean change is below ``E_TOL`` or ``E_MAX_ITER``: ``(gamma,
    the iterations run)``. The working set (documents still iterating plus some that stopped, whose gamma is no
    longer written) is gathered anew when fewer than half of it still iterate."""
    gamma = gamma.clone()
    ws = torch.arange(gamma.shape[0], device=gamma.device)
    # (B, 1, K) and (B, 1, n) layouts: both sums are batched products of a row with ebt or its transpose, no views
    e, et_, c, a, g = ebt, ebt.transpose(1, 2), count.unsqueeze(1), alpha.unsqueeze(1), gamma.unsqueeze(1)
    still = torch.ones((gamma.shape[0], 1, 1), dtype=torch.bool, device=gamma.device)
    tiny = torch.finfo(gamma.dtype).tiny
    stopped = False        # some document of the working set stopped: its gamma must no longer be written
    it = 0
    for it in range(1, E_MAX_ITER + 1):
        et = expected_log_theta(g).exp()      # (B_w, 1, K); its largest entry is >= exp(-psi(1) - log K)-ish: no shift
        new = a + et * torch.bmm(c / torch.bmm(et, e).clamp_min(tiny), et_)
        change = (new - g).abs().mean(-1, keepdim=True)
        g = torch.where(still, new, g) if stopped else new
        still = still & (change >= E_TOL)
        n_still = int(still.sum())
        if n_still == 0:
            break
        stopped = n_still < ws.shape[0]
        if 2 * n_still < ws.shape[0]:
            gamma[ws] = g.squeeze(1)
            keep = still.reshape(-1)
            ws, g, e, c, a = ws[keep], g[keep], e[keep], c[keep], a[keep]
            et_ = e.transpose(1, 2)
            still = torch.ones((ws.shape[0], 1, 1), dtype=torch.bool, device=gamma.device)
            stopped = False
    gamma[ws] = g.squeeze(1)
    return gamma, it


def length_blocks(corpus: Corpus) -> list[torch.Tensor]:
    """The documents ``(B_i,)`` in blocks of similar length: sorted by their number of triples (longest first), each
    block takes the next documents for as long as padding them to its longest keeps it within ``BLOCK_SLOTS``
    padded words or at most doubles its triples (an empty document counts as one). Fewer blocks run fewer
    iterations of small operations; the bound keeps memory O(nnz)."""
    lengths = (corpus.ptr[1:] - corpus.ptr[:-1]).clamp_min(1)
    order = torch.argsort(lengths, descending=True, stable=True)
    sorted_lengths = lengths[order]
    cum = torch.cat([sorted_lengths.new_zeros(1), sorted_lengths.cumsum(0)])     # cum[e]: triples of the first e
    blocks, start, D = [], 0, corpus.D
    while start < D:
        ends = torch.arange(start + 1, D + 1, device=cum.device)
        padded = (ends - start) * sorted_lengths[start]
        # true for a prefix of the ends (lengths are sorted: the triples grow ever slower than the padded size)
        fits = (padded <= BLOCK_SLOTS) | (padded <= 2 * (cum[ends] - cum[start]))
        end = start + int(fits.sum())
        blocks.append(order[start:end])
        start = end
    return blocks


@dataclass(frozen=True)
class PaddedDocs:
    """Documents' triples padded to the longest: ``word (B, n)`` (0 on padding) and ``count (B, n)`` (0 on
    padding), n the largest number of triples of a document."""

    word: torch.Tensor
    count: torch.Tensor

    @staticmethod
    def of(corpus: Corpus, docs: torch.Tensor) -> "PaddedDocs":
        """The documents ``docs (B,)`` of ``corpus``, in that order."""
        idx, local, ptr = corpus.gather(docs)
        n = int((ptr[1:] - ptr[:-1]).max()) if docs.shape[0] else 0
        pos = torch.arange(idx.shape[0], device=idx.device) - ptr[local]
        word = torch.zeros((docs.shape[0], n), dtype=torch.long, device=idx.device)
        count = corpus.count.new_zeros((docs.shape[0], n))
        word[local, pos] = corpus.word[idx]
        count[local, pos] = corpus.count[idx]
        return PaddedDocs(word, count)


def initial_gamma(corpus: Corpus, alpha: torch.Tensor) -> torch.Tensor:
    r"""The E-step's start :math:`\gamma_d = \alpha_d + N_d / K` (q(z) uniform over topics): deterministic."""
    return alpha + (corpus.doc_lengths() / alpha.shape[-1])[:, None].to(alpha.dtype)


def initial_lambda(eta: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """q(beta)'s start: Gamma(``INIT_SHAPE``, 1/``INIT_SHAPE``) draws ``(K, V)`` (mean 1; breaks the topic
    symmetry), from ``gen``."""
    draw = torch._standard_gamma(torch.full(tuple(eta.shape), INIT_SHAPE, dtype=torch.float64), generator=gen)
    return (draw / INIT_SHAPE).to(device=eta.device, dtype=eta.dtype)


def elbo_terms(structure: LDAStructure, est: EStep, elog_beta_old: torch.Tensor, lam: torch.Tensor
               ) -> dict[str, float]:
    r"""The ELBO term by term at :math:`(\phi(\gamma, \lambda_{old}), \gamma, \lambda)` (module docstring); sums
    accumulated in float64."""
    elog_theta = expected_log_theta(est.gamma).double()
    elog_beta = dirichlet_expected_log((lam,)).double()
    sstats, ndk = est.sstats.double(), est.ndk.double()
    log_z = (ndk * elog_theta).sum()
    log_w = (sstats * elog_beta).sum()
    entropy = est.loglik - log_z - (sstats * elog_beta_old.double()).sum()
    kl_theta = kl_divergence(Dirichlet(est.gamma.double()), Dirichlet(structure.alpha.double())).sum()
    kl_beta = kl_divergence(Dirichlet(lam.double()), Dirichlet(structure.eta.double())).sum()
    return {f"E log p({structure.w})": float(log_w), f"E log p({structure.z})": float(log_z),
            f"entropy({structure.z})": float(entropy), f"-KL({structure.theta})": -float(kl_theta),
            f"-KL({structure.topics})": -float(kl_beta)}


@dataclass(kw_only=True)
class LDAFit(SweepRecord):
    """A fit: ``lam (K, V)``, ``gamma (D, K)``, ``history`` the ELBO per sweep (batch) or per pass (stochastic:
    the ELBO of the full corpus computed at the end only, the passes' minibatch estimates before it),
    ``terms`` name -> value per sweep, ``converged``, ``interrupted``."""

    lam: torch.Tensor
    gamma: torch.Tensor


def sweep(structure: LDAStructure, corpus: Corpus, alpha: torch.Tensor, lam: torch.Tensor, gamma: torch.Tensor,
          scale: float, rho: float) -> tuple[torch.Tensor, EStep, torch.Tensor]:
    r"""One update on the documents of ``corpus``: E-step from ``gamma`` under ``lam``, then
    :math:`\lambda \leftarrow` ``natural_step(lam, eta + scale * sstats, rho)``. Full corpus, ``scale=1``,
    ``rho=1``: one coordinate-ascent sweep; a minibatch of B of D documents, ``scale = D/B``: one stochastic
    natural-gradient step. Returns (new lambda, the E-step, E log beta under the old lambda)."""
    elog_beta = dirichlet_expected_log((lam,))
    est = e_step(corpus, alpha, elog_beta, gamma)
    target = structure.eta + scale * est.sstats
    return natural_step(lam, target, rho), est, elog_beta


def coordinate_ascent(structure: LDAStructure, lam: torch.Tensor, num_steps: int, tol: float, on_step=None
                      ) -> LDAFit:
    """Batch VB (Blei et al. 2003): sweeps until the relative ELBO change is below ``tol`` or ``num_steps``
    sweeps ran; gamma is warm-started from the previous sweep so that the ELBO never decreases (warns
    ``cavi.ELBODecreased`` otherwise)."""
    corpus = structure.corpus

    def step(current, _):
        lam, gamma = current
        new_lam, est, elog_old = sweep(structure, corpus, structure.alpha, lam, gamma, 1.0, 1.0)
        return (new_lam, est.gamma), elbo_terms(structure, est, elog_old, new_lam), None

    (lam, gamma), *fields = sweep_until(step, (lam, initial_gamma(corpus, structure.alpha)), num_steps, tol,
                                        structure.dtype, on_step)
    return LDAFit(*fields, lam=lam, gamma=gamma)


def stochastic_fit(structure: LDAStructure, lam: torch.Tensor, num_steps: int, tol: float, batch_size: int,
                   tau0: float, kappa: float, gen: torch.Generator, on_step=None) -> LDAFit:
    r"""Online VB (Hoffman et al. 2010, 2013): ``num_steps`` passes over the documents in random minibatches of
    ``batch_size``; step t blends :math:`\lambda` towards :math:`\eta + \frac{D}{|B|} s_B` with
    :math:`\rho_t = (\tau_0 + t)^{-\kappa}`. Each pass records the sum of its minibatches' scaled ELBO estimates
    (noisy, for progress); it stops early when that estimate moves by less than ``tol`` (relative). Every
    E-step starts from ``initial_gamma`` (a document's gamma from an earlier pass, under topics that have moved
    since, can hold it in a worse fixed point: measured 5 nats a document lower on the benchmark corpus). At the
    end one full E-step gives every document's gamma and the exact ELBO (the last entry of ``history``)."""
    corpus, D = structure.corpus, structure.corpus.D
    history, terms_history, converged, interrupted = [], {}, False, False
    t = 0
    try:
        for _ in range(num_steps):
            estimate = 0.0
            for docs in stochastic.batches(D, batch_size, gen):
                t += 1
                sub = corpus.subset(docs.to(corpus.ptr.device))
                alpha = structure.alpha[docs]
                scale = D / docs.shape[0]
                new_lam, est, elog_old = sweep(structure, sub, alpha, lam, initial_gamma(sub, alpha), scale,
                                               stochastic.step_size(t, tau0, kappa))
                local = (est.loglik - kl_divergence(Dirichlet(est.gamma.double()), Dirichlet(alpha.double())).sum())
                estimate += float(local) * 1.0
                lam = new_lam
            estimate -= float(kl_divergence(Dirichlet(lam.double()), Dirichlet(structure.eta.double())).sum())
            history.append(estimate)
            if on_step is not None:
                on_step(estimate)
            if len(history) > 1 and abs(history[-1] - history[-2]) <= tol * abs(history[-1]):
                converged = True
                break
    except KeyboardInterrupt:
        if t == 0:
            raise
        interrupted = True
    est = e_step(corpus, structure.alpha, dirichlet_expected_log((lam,)), initial_gamma(corpus, structure.alpha))
    terms = elbo_terms(structure, est, dirichlet_expected_log((lam,)), lam)
    for k, v in terms.items():
        terms_history[k] = [v]
    history.append(sum(terms.values()))
    return LDAFit(history, terms_history, converged, interrupted, lam=lam, gamma=est.gamma)


# ------------------------------------------------------------------------------------- backend plumbing


def describe(names: tuple[str, str, str, str]) -> dict[str, str]:
    """site -> the closed-form update ``plan.explain()`` prints."""
    theta, z, w, topics = names
    return {theta: f"q({theta}) = Dirichlet per document: closed form from the expected topic counts of '{z}' "
                   "(E-step, iterated with q(z))",
            topics: f"q({topics}) = Dirichlet per topic: closed form from the expected topic-word counts of '{w}' "
                    "(sparse document-word counts; a natural-gradient step with batch_size=)"}


def treatment_rows(graph, names: tuple[str, str, str, str]) -> list:
    """The plan's rows for an admixture."""
    theta, z, w, topics = names
    updates = describe(names)
    rows = []
    for s in graph.sites():
        if s.observed:
            rows.append(SiteTreatment(s.name, "observed", f"{s.family}, shape {s.value_shape} (as sparse "
                                      "document-word counts)"))
        elif s.name == z:
            rows.append(SiteTreatment(s.name, "enumerate", f"q({z}) = Categorical per distinct (document, word): "
                                      f"phi proportional to exp(E log {theta} + E log {topics})"))
        else:
            rows.append(SiteTreatment(s.name, "natural gradient", updates.get(s.name, "")))
    return rows


def fit(structure: LDAStructure, num_steps: int, tol: float, restarts: int, seed: int, batch_size, tau0, kappa,
        progress: bool) -> tuple[LDAFit, bool]:
    """``restarts`` fits from random q(topics) starts (seeded by ``seed``), batch or stochastic: ``(the best fit,
    interrupted by Ctrl-C)`` (``cavi.best_of_restarts``; the convergence warning only in batch mode)."""
    gen = torch.Generator().manual_seed(seed)

    def fit_one(i: int, desc: str, on_step) -> LDAFit:
        lam = initial_lambda(structure.eta, gen)
        if batch_size is None:
            return coordinate_ascent(structure, lam, num_steps, tol, on_step)
        return stochastic_fit(structure, lam, num_steps, tol, batch_size, tau0, kappa, gen, on_step)

    return best_of_restarts(fit_one, restarts, num_steps, tol, progress, "vi (lda)", batch_size is None)


def posterior(model, args, kwargs, plan, structure: LDAStructure, best: LDAFit, num_samples: int,
              interrupted: bool):
    """The typed Posterior: draws of topics and document proportions from q, their means as the point."""
    gamma = best.gamma.reshape(structure.theta_shape)
    draws = {structure.topics: Dirichlet(best.lam).sample((num_samples,)).unsqueeze(0),
             structure.theta: Dirichlet(gamma).sample((num_samples,)).unsqueeze(0)}
    point = {structure.topics: best.lam / best.lam.sum(-1, keepdim=True),
             structure.theta: gamma / gamma.sum(-1, keepdim=True)}
    history = training.History(-v for v in best.history)
    history.interrupted = interrupted
    return make_posterior(plan, model, args, kwargs, draws=draws, point=point, history=history,
                          log_evidence=LogEvidence(best.elbo, "ELBO (lower bound)"), elbo_terms=best.terms)


def run(model, args, kwargs, plan, num_steps: int, tol: float, restarts: int, seed: int, num_samples: int,
        progress: bool, batch_size, tau0, kappa, structure: LDAStructure | None = None):
    """The vi backend's run for an admixture (``backend.run`` dispatches here); returns the best fit's Posterior.
    ``structure``: what ``analyse`` found on these very ``(model, args, kwargs)`` at compile time (None: probe
    the model again)."""
    structure = analyse(model, args, kwargs, plan.facts) if structure is None else structure
    stochastic.check_schedule(batch_size, tau0, kappa, structure.corpus.D, "documents")
    best, interrupted = fit(structure, num_steps, tol, restarts, seed, batch_size, tau0, kappa, progress)
    return posterior(model, args, kwargs, plan, structure, best, num_samples, interrupted)
