"""Exact HMM kernels (ppl.inference.exact.hmm) against brute-force enumeration and peers."""
from __future__ import annotations

import pytest
import torch

from ppl.inference.exact import hmm, ops
from ppl.inference.exact.hmm_doubling import doubling_fits, doubling_jacobian
from ppl.inference.exact.hmm_forward import forward_scaled, renorm_period, smooth_scaled
from ppl.inference.exact.hmm_inputs import canonicalize
from tests.reference.brute_force import brute_force
from tests.reference.log_space import forward_backward
from tests.reference.random_inputs import LEFT_RIGHT_LOC, LEFT_RIGHT_TRANS, left_right_hmm_data

F64 = torch.float64


def random_chain(seed, batch, T, K, time_varying, trans_batched=True, scale=2.0, dtype=F64):
    """Unnormalized random log potentials: (log_init, log_trans, log_lik)."""
    g = torch.Generator().manual_seed(seed)
    trans_batch = batch if trans_batched else ()
    steps = (T - 1,) if time_varying else ()
    log_init = torch.randn(batch + (K,), generator=g, dtype=dtype) * scale
    log_trans = torch.randn(trans_batch + steps + (K, K), generator=g, dtype=dtype) * scale
    log_lik = torch.randn(batch + (T, K), generator=g, dtype=dtype) * scale
    return log_init, log_trans, log_lik


def oracle(log_init, log_trans, log_lik, lengths, time_varying, n):
    """Brute force for batch row n (1-d batch), truncated to its length."""
    T = log_lik.shape[-2]
    L = T if lengths is None else int(lengths[n])
    lt = log_trans[n] if log_trans.dim() == (4 if time_varying else 3) else log_trans
    lt = lt[:L - 1] if time_varying else lt
    return brute_force(log_init[n], lt, log_lik[n, :L], time_varying)


def assert_posterior_matches(post, n, bf, time_varying):
    """Row n of ``post`` (log Z, marginals, pairwise) equals the brute force ``bf`` to atol 1e-10 (float64
    enumeration vs the kernels: rounding only), and is zero at the steps beyond the sequence's length."""
    L = bf.marginals.shape[0]
    assert torch.allclose(post.log_normalizer[n], bf.log_normalizer, atol=1e-10), "log Z, atol 1e-10"
    assert torch.allclose(post.marginals[n, :L], bf.marginals, atol=1e-10), "marginals, atol 1e-10"
    assert torch.all(post.marginals[n, L:] == 0), "marginals are zero beyond length"
    pair = post.pairwise[n, :L - 1] if time_varying else post.pairwise[n]
    assert torch.allclose(pair, bf.pairwise, atol=1e-10), "pairwise, atol 1e-10"
    if time_varying:
        assert torch.all(post.pairwise[n, L - 1:] == 0), "pairwise counts are zero beyond length"


CASES = [(tv, lengths, shared)
         for tv in (False, True) for lengths in (None, [5, 3, 1]) for shared in (False, True)]


@pytest.mark.parametrize("time_varying,lengths,shared", CASES)
def test_all_outputs_match_brute_force(time_varying, lengths, shared):
    T, K = 5, 3
    args = random_chain(1, (3,), T, K, time_varying, trans_batched=not shared)
    lengths = None if lengths is None else torch.tensor(lengths)
    log_z = hmm.log_normalizer(*args, lengths=lengths)
    post = hmm.posterior(*args, lengths=lengths)
    vit = hmm.viterbi(*args, lengths=lengths)
    par = hmm.parallel_log_normalizer(*args, lengths=lengths)
    for n in range(3):
        bf = oracle(*args, lengths, time_varying, n)
        L = bf.marginals.shape[0]
        assert_posterior_matches(post, n, bf, time_varying)
        assert torch.allclose(log_z[n], bf.log_normalizer, atol=1e-10), "log Z, atol 1e-10"
        assert torch.allclose(par[n], bf.log_normalizer, atol=1e-10), "parallel log Z, atol 1e-10"
        assert torch.equal(vit.states[n, :L], bf.map_path), "Viterbi path"
        assert torch.all(vit.states[n, L:] == -1), "Viterbi padding is -1"
        assert torch.allclose(vit.log_prob[n], bf.map_log_prob, atol=1e-10), "Viterbi log prob"


def test_multiple_batch_dims_broadcast_and_single_step():
    log_init, log_trans, log_lik = random_chain(2, (2, 3), 4, 3, False)
    log_z = hmm.log_normalizer(log_init[:, :1], log_trans[0, 0], log_lik)
    assert log_z.shape == (2, 3)
    bf = brute_force(log_init[1, 0], log_trans[0, 0], log_lik[1, 2])
    assert torch.allclose(log_z[1, 2], bf.log_normalizer, atol=1e-10), "broadcast batch, atol 1e-10"
    one = hmm.posterior(log_init, log_trans, log_lik[..., :1, :])
    expected = torch.softmax(log_init + log_lik[..., 0, :], -1)
    assert torch.allclose(one.marginals[..., 0, :], expected, atol=1e-12), "T=1 marginals"
    assert torch.all(one.pairwise == 0), "T=1 has no transitions"
    empty_tv = torch.zeros(2, 3, 0, 3, 3, dtype=F64)  # time-varying, T-1 = 0 steps
    tv = hmm.posterior(log_init, empty_tv, log_lik[..., :1, :])
    assert tv.pairwise.shape == (2, 3, 0, 3, 3)
    assert torch.allclose(tv.log_normalizer, one.log_normalizer, atol=1e-12), "T=1 time-varying"


def test_structural_zeros_left_right_chain():
    T, K = 5, 3
    _, _, log_lik = random_chain(3, (), T, K, False)
    log_trans = torch.randn(K, K, dtype=F64, generator=torch.Generator().manual_seed(4))
    log_trans = log_trans.masked_fill(torch.ones(K, K, dtype=torch.bool).tril(-1), -torch.inf)
    log_init = torch.tensor([0.0, -torch.inf, -torch.inf], dtype=F64)
    bf = brute_force(log_init, log_trans, log_lik)
    lik = log_lik.clone().requires_grad_()
    log_z = hmm.log_normalizer(log_init, log_trans, lik)
    (grad,) = torch.autograd.grad(log_z, lik)
    assert torch.allclose(log_z, bf.log_normalizer, atol=1e-10), "log Z with -inf entries"
    assert torch.allclose(grad, bf.marginals, atol=1e-10), "gradient = marginals, atol 1e-10"
    assert torch.equal(hmm.viterbi(log_init, log_trans, log_lik).states, bf.map_path)
    par = hmm.parallel_log_normalizer(log_init, log_trans, log_lik)
    assert torch.allclose(par, bf.log_normalizer, atol=1e-10), "parallel log Z with -inf entries"


@pytest.mark.parametrize("time_varying,shared",
                         [(False, False), (False, True), (True, False), (True, True)])
def test_gradients_are_posterior_statistics(time_varying, shared):
    args = random_chain(5, (4,), 6, 3, time_varying, trans_batched=not shared)
    lengths = torch.tensor([6, 2, 4, 1])
    inputs = [a.clone().requires_grad_() for a in args]
    weights = torch.tensor([1.0, -2.0, 0.5, 3.0], dtype=F64)
    log_z = hmm.log_normalizer(*inputs, lengths=lengths)
    g_init, g_trans, g_lik = torch.autograd.grad((log_z * weights).sum(), inputs)
    post = hmm.posterior(*args, lengths=lengths)
    w = weights[:, None, None]
    assert torch.allclose(g_lik, post.marginals * w, atol=1e-10), "d logZ / d log_lik = marginals"
    assert torch.allclose(g_init, post.marginals[:, 0] * weights[:, None], atol=1e-10)
    pair = post.pairwise * (w[..., None] if time_varying else w)
    expected = pair.sum(0) if shared else pair
    assert torch.allclose(g_trans, expected, atol=1e-10), "d logZ / d log_trans = expected counts"


def test_expanded_log_trans_is_treated_as_shared():
    """A stride-0 expanded log_trans (as ppl's tables pass it) gives the same values and grads."""
    log_init, log_trans, log_lik = random_chain(17, (3,), 5, 3, False, trans_batched=False)
    shared = log_trans.clone().requires_grad_()
    copied = log_trans.clone().requires_grad_()
    out_shared = hmm.log_normalizer(log_init, shared.expand(3, 3, 3), log_lik)
    out_copied = hmm.log_normalizer(log_init, copied.expand(3, 3, 3).clone(), log_lik)
    assert torch.allclose(out_shared, out_copied, atol=1e-12), "values, atol 1e-12"
    (g_shared,) = torch.autograd.grad(out_shared.sum(), shared)
    (g_copied,) = torch.autograd.grad(out_copied.sum(), copied)
    assert torch.allclose(g_shared, g_copied, atol=1e-12), "gradients, atol 1e-12"


@pytest.mark.parametrize("time_varying", [False, True])
def test_gradcheck_and_gradgradcheck(time_varying):
    args = [a.requires_grad_() for a in random_chain(6, (2,), 4, 3, time_varying)]
    lengths = torch.tensor([4, 3])

    def fn(*xs):
        return hmm.log_normalizer(*xs, lengths=lengths)

    assert torch.autograd.gradcheck(fn, args, eps=1e-6, atol=1e-7)
    assert torch.autograd.gradgradcheck(fn, args, eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("time_varying,shared", [(False, True), (True, False)])
def test_posterior_is_differentiable_when_inputs_require_grad(time_varying, shared):
    args = random_chain(7, (2,), 4, 3, time_varying, trans_batched=not shared)
    lengths = torch.tensor([4, 2])
    plain = hmm.posterior(*args, lengths=lengths)
    trans = args[1].clone().requires_grad_()
    tracked = hmm.posterior(args[0], trans, args[2], lengths=lengths)
    assert tracked.marginals.requires_grad and tracked.pairwise.requires_grad
    assert torch.allclose(tracked.log_normalizer, plain.log_normalizer, atol=1e-12), "atol 1e-12"
    assert torch.allclose(tracked.marginals, plain.marginals, atol=1e-12), "same values, atol 1e-12"
    assert torch.allclose(tracked.pairwise, plain.pairwise, atol=1e-12)

    def stats(x):
        post = hmm.posterior(args[0], args[1], x, lengths=lengths)
        return post.marginals, post.pairwise

    lik = args[2].clone().requires_grad_()
    assert torch.autograd.gradcheck(stats, (lik,), eps=1e-6, atol=1e-7)


def total_variation(samples, bf):
    """TV distance: empirical path frequencies of samples (S, T) vs the exact path distribution."""
    K, T = int(bf.paths.max()) + 1, bf.paths.shape[1]
    codes = (samples * K ** torch.arange(T - 1, -1, -1)).sum(-1)
    freq = torch.bincount(codes, minlength=K ** T).to(F64) / samples.shape[0]
    return 0.5 * (freq - bf.path_probs).abs().sum()


@pytest.mark.parametrize("time_varying", [False, True])
def test_ffbs_path_frequencies_match_exact_distribution(time_varying):
    args = random_chain(8, (2,), 4, 2, time_varying, scale=1.0)
    lengths = torch.tensor([4, 3])
    gen = torch.Generator().manual_seed(0)
    draws = hmm.sample(*args, sample_shape=(20000,), lengths=lengths, generator=gen)
    assert draws.shape == (20000, 2, 4) and draws.dtype == torch.long
    assert torch.all(draws[:, 1, 3] == -1), "samples padded with -1 beyond length"
    for n in range(2):
        bf = oracle(*args, lengths, time_varying, n)
        L = bf.paths.shape[1]
        tv = total_variation(draws[:, n, :L], bf)
        assert tv < 0.03, f"TV distance {tv:.4f} >= 0.03 (20000 draws over {2 ** L} paths)"


def test_sample_shape_and_generator_reproducibility():
    args = random_chain(9, (3,), 5, 4, False)
    a = hmm.sample(*args, sample_shape=(2, 5), generator=torch.Generator().manual_seed(1))
    b = hmm.sample(*args, sample_shape=(2, 5), generator=torch.Generator().manual_seed(1))
    assert a.shape == (2, 5, 3, 5) and torch.equal(a, b)


@pytest.mark.parametrize("time_varying", [False, True])
def test_parallel_scan_equals_sequential_with_gradients(time_varying):
    args = random_chain(10, (3,), 257, 4, time_varying)
    lengths = torch.tensor([257, 100, 1])
    xs = [a.clone().requires_grad_() for a in args]
    ys = [a.clone().requires_grad_() for a in args]
    seq = hmm.log_normalizer(*xs, lengths=lengths, method="sequential")
    par = hmm.parallel_log_normalizer(*ys, lengths=lengths)
    assert torch.allclose(seq, par, rtol=1e-12, atol=1e-9), "parallel == sequential, atol 1e-9"
    for gs, gp in zip(torch.autograd.grad(seq.sum(), xs), torch.autograd.grad(par.sum(), ys)):
        assert torch.allclose(gs, gp, atol=1e-9), "gradients agree, atol 1e-9"


def test_auto_method_rule():
    assert hmm.use_parallel_scan(1, 100_000, 8), "one long sequence, K = 8: scan"
    assert hmm.use_parallel_scan(16, 1000, 2) and hmm.use_parallel_scan(2, 1000, 16)
    assert not hmm.use_parallel_scan(64, 1000, 8), "batch 64 x K 8: sequential"
    assert hmm.use_parallel_scan(8, 1000, 8, shared=True), "N K = 64 with the GEMM level"
    assert not hmm.use_parallel_scan(8, 1000, 8), "N K = 64 without it"
    assert not hmm.use_parallel_scan(4, 1000, 16, shared=True), "K = 16: no GEMM level"
    assert not hmm.use_parallel_scan(1, 255, 8), "short sequences: sequential"
    assert not hmm.use_parallel_scan(1, 10_000, 32), "K = 32: sequential"
    assert not hmm.use_parallel_scan(2, 10_000_000, 16), "memory cap N T K^2 <= 2^26"


@pytest.mark.parametrize("time_varying,shared", [(False, True), (True, False)])
def test_auto_chosen_scan_gradients_and_posterior_equal_sequential(time_varying, shared):
    # N K = 9 <= 32 and T = 300 >= 256: "auto" takes the tree product. The sequential path's
    # gradients / posterior are checked against brute force above; float64, so agreement to
    # 1e-9 absolute (measured ~1e-12) shows the auto path computes the same statistics.
    N, T, K = 3, 300, 3
    args = random_chain(30, (N,), T, K, time_varying, trans_batched=not shared)
    assert hmm.use_parallel_scan(N, T, K)
    lengths = torch.tensor([300, 131, 1])
    weights = torch.tensor([1.0, -2.0, 0.5], dtype=F64)
    grads = {}
    for method in ("auto", "sequential"):
        xs = [a.clone().requires_grad_() for a in args]
        log_z = hmm.log_normalizer(*xs, lengths=lengths, method=method)
        grads[method] = (log_z.detach(), *torch.autograd.grad((log_z * weights).sum(), xs))
    for auto, seq in zip(grads["auto"], grads["sequential"]):
        assert torch.allclose(auto, seq, rtol=1e-12, atol=1e-9), "auto == sequential, atol 1e-9"
    post = hmm.posterior(*args, lengths=lengths, method="sequential")
    _, g_init, g_trans, g_lik = grads["auto"]
    w = weights[:, None, None]
    assert torch.allclose(g_lik, post.marginals * w, atol=1e-9), "d logZ / d log_lik = marginals"
    pair = post.pairwise * (w[..., None] if time_varying else w)
    assert torch.allclose(g_trans, pair.sum(0) if shared else pair, atol=1e-9), "pairwise"
    auto = hmm.posterior(*args, lengths=lengths)
    assert not auto.marginals.requires_grad
    for a, b in zip(auto, post):
        assert torch.allclose(a, b, atol=1e-9), "posterior auto == sequential, atol 1e-9"


@pytest.mark.parametrize("time_varying,lengths,shared", CASES)
def test_forced_parallel_posterior_matches_brute_force(time_varying, lengths, shared):
    args = random_chain(31, (3,), 5, 3, time_varying, trans_batched=not shared)
    lengths = None if lengths is None else torch.tensor(lengths)
    post = hmm.posterior(*args, lengths=lengths, method="parallel")
    log_z = hmm.log_normalizer(*args, lengths=lengths, method="parallel")
    for n in range(3):
        bf = oracle(*args, lengths, time_varying, n)
        # float64 enumeration of 3^5 paths vs the tree product: rounding only, atol 1e-10.
        assert_posterior_matches(post, n, bf, time_varying)
        assert torch.allclose(log_z[n], bf.log_normalizer, atol=1e-10), "log Z, atol 1e-10"


def test_forced_parallel_posterior_is_differentiable():
    args = random_chain(32, (2,), 4, 3, False)
    lengths = torch.tensor([4, 2])

    def stats(x):
        post = hmm.posterior(args[0], args[1], x, lengths=lengths, method="parallel")
        return post.marginals, post.pairwise

    lik = args[2].clone().requires_grad_()
    assert torch.autograd.gradcheck(stats, (lik,), eps=1e-6, atol=1e-7)
    seq = hmm.posterior(args[0], args[1], lik, lengths=lengths, method="sequential")
    par = hmm.posterior(args[0], args[1], lik, lengths=lengths, method="parallel")
    assert torch.allclose(par.marginals, seq.marginals, atol=1e-12), "same values, atol 1e-12"


@pytest.mark.parametrize("T", [300, 301])
@pytest.mark.parametrize("dtype", [F64, torch.float32])
def test_scan_pair_fast_path_matches_sequential_with_gradients(T, dtype):
    # Shared homogeneous log_trans, no lengths, K <= 8: the scan's first level runs as one
    # (N T/2, K) @ (K, K^2) matmul (even and odd T: with and without a leftover step).
    # Tolerances: float64 rounding only (measured ~1e-13); float32 log Z relative 1e-5
    # (sums of T terms, ~T * 6e-8); float32 gradients relative 1e-4 of the largest entry
    # (expected transition counts reach ~100 here; measured ~5e-5 relative for the fast
    # path, ~3e-5 for the log-space scan level it replaces, ~1e-6 for the recursion).
    N, K = 2, 5
    args = [a.to(dtype) for a in random_chain(34, (N,), T, K, False, trans_batched=False)]
    xs = [a.clone().requires_grad_() for a in args]
    ys = [a.clone().requires_grad_() for a in args]
    par = hmm.log_normalizer(*xs, method="parallel")
    seq = hmm.log_normalizer(*ys, method="sequential")
    rel, grad_rel = (1e-12, 1e-9) if dtype == F64 else (1e-5, 1e-4)
    assert torch.allclose(par, seq, rtol=rel, atol=0), f"log Z, rtol {rel}"
    for gp, gs in zip(torch.autograd.grad(par.sum(), xs), torch.autograd.grad(seq.sum(), ys)):
        err = ((gp - gs).abs().max() / gs.abs().max().clamp(min=1.0)).item()
        assert err < grad_rel, f"gradients: relative error {err:.1e} >= {grad_rel}"
    from ppl.inference.exact.hmm_scan import _shared_pair_products
    ch = canonicalize(*args)
    assert _shared_pair_products(ch.log_trans[0, 0], ch.log_lik[:, 1:]) is not None, \
        "the fast path must have been taken"


def test_scan_pair_fast_path_falls_back_on_structural_zeros():
    # A left-right chain (-inf below the diagonal) gives exact zeros in the pair products:
    # the fast path declines and the log-space level runs; checked against brute force.
    K, T = 3, 6
    log_trans = torch.randn(K, K, dtype=F64, generator=torch.Generator().manual_seed(35))
    log_trans = log_trans.masked_fill(torch.ones(K, K).tril(-1).bool(), -torch.inf)
    log_init = torch.tensor([0.0, -torch.inf, -torch.inf], dtype=F64)
    log_lik = torch.randn(T, K, dtype=F64, generator=torch.Generator().manual_seed(36))
    from ppl.inference.exact.hmm_scan import _shared_pair_products
    assert _shared_pair_products(log_trans, log_lik[None, 1:]) is None
    bf = brute_force(log_init, log_trans, log_lik)
    par = hmm.log_normalizer(log_init, log_trans, log_lik, method="parallel")
    assert torch.allclose(par, bf.log_normalizer, atol=1e-10), "fallback log Z, atol 1e-10"


def test_time_varying_rule_and_override():
    T, K = 5, 3
    # log_trans (4, K, K) with 4 == T - 1: read as time-varying unless forced
    log_init, log_trans, log_lik = random_chain(11, (4,), T, K, False)
    inferred = hmm.posterior(log_init, log_trans, log_lik)
    forced = hmm.posterior(log_init, log_trans, log_lik, time_varying=False)
    assert inferred.pairwise.shape == (4, T - 1, K, K) and forced.pairwise.shape == (4, K, K)
    for n in range(4):
        tv = brute_force(log_init[n], log_trans, log_lik[n], time_varying=True)
        hom = brute_force(log_init[n], log_trans[n], log_lik[n], time_varying=False)
        assert torch.allclose(inferred.log_normalizer[n], tv.log_normalizer, atol=1e-10), "inferred"
        assert torch.allclose(forced.log_normalizer[n], hom.log_normalizer, atol=1e-10), "forced"
    with pytest.raises(ValueError, match="log_trans"):
        hmm.log_normalizer(log_init, log_trans[:3], log_lik, time_varying=True)


def extreme_chain(dtype, time_varying=False):
    """Potentials whose scaled forward underflows in float32 (conflicts of ~200 nats per step)."""
    T = 6
    log_trans = torch.tensor([[0.0, -200.0], [-200.0, 0.0]], dtype=dtype)
    if time_varying:
        log_trans = log_trans + torch.linspace(0.0, 1.0, T - 1, dtype=dtype)[:, None, None]
    favour = torch.arange(T) % 2
    log_lik = torch.where(torch.nn.functional.one_hot(favour, 2).bool(), 0.0, -300.0).to(dtype)
    return torch.zeros(2, dtype=dtype), log_trans, log_lik


@pytest.mark.parametrize("time_varying", [False, True])
def test_underflow_falls_back_to_log_space_in_float32(time_varying):
    args32 = extreme_chain(torch.float32, time_varying)
    assert forward_scaled(canonicalize(*args32)).underflow, "the case must underflow"
    bf = brute_force(*extreme_chain(F64, time_varying), time_varying=time_varying)
    inputs = [a.clone().requires_grad_() for a in args32]
    log_z = hmm.log_normalizer(*inputs)
    g_init, g_trans, g_lik = torch.autograd.grad(log_z, inputs)
    tol = 1e-5 * abs(bf.log_normalizer)
    assert torch.isfinite(log_z) and abs(log_z.double() - bf.log_normalizer) < tol, "rtol 1e-5"
    assert torch.allclose(g_lik.double(), bf.marginals, atol=1e-5), "fallback marginals, atol 1e-5"
    assert torch.allclose(g_init.double(), bf.marginals[0], atol=1e-5)
    assert torch.allclose(g_trans.double(), bf.pairwise, atol=1e-5), "fallback pairwise, atol 1e-5"
    post = hmm.posterior(*args32)
    assert torch.allclose(post.pairwise.double(), bf.pairwise, atol=1e-5), "posterior pairwise"
    par = hmm.parallel_log_normalizer(*args32)
    assert abs(par.double() - bf.log_normalizer) < tol, "parallel, rtol 1e-5"
    assert torch.equal(hmm.viterbi(*args32).states, bf.map_path)
    draws = hmm.sample(*args32, sample_shape=(2000,), generator=torch.Generator().manual_seed(2))
    tv = total_variation(draws, bf)
    assert tv < 0.05, f"FFBS after underflow: TV {tv:.4f} >= 0.05 (2000 draws)"


def test_backward_underflow_falls_back_to_log_space():
    log_init = torch.tensor([54.0, 75.0])  # found by a random search over float32 potentials
    log_trans = torch.tensor([[71.0, 20.0], [-106.0, 37.0]])
    log_lik = torch.tensor([[-19.0, 52.0], [-5.0, -21.0], [17.0, -13.0]])
    ch = canonicalize(log_init, log_trans, log_lik)
    fw = forward_scaled(ch)
    assert not fw.underflow, "the forward pass must not underflow"
    assert smooth_scaled(fw, ch, None, True, False) is None, "the backward pass must underflow"
    bf = brute_force(log_init.double(), log_trans.double(), log_lik.double())
    post = hmm.posterior(log_init, log_trans, log_lik)
    assert torch.allclose(post.marginals.double(), bf.marginals, atol=1e-5), "marginals, atol 1e-5"
    assert torch.allclose(post.pairwise.double(), bf.pairwise, atol=1e-5), "pairwise, atol 1e-5"


@pytest.mark.parametrize("time_varying", [False, True])
def test_float32_lazy_renormalization_with_lengths_matches_brute_force(time_varying):
    # float32 renormalizes every 4 steps: T = 11 has renormalization steps 4 and 8 in between,
    # and the lengths end on a renormalization step (9 - 1 = 8), off one (11, 6) and at t = 0.
    T, K = 11, 3
    args64 = random_chain(21, (4,), T, K, time_varying)
    args32 = [a.float().requires_grad_() for a in args64]
    lengths = torch.tensor([11, 9, 6, 1])
    assert renorm_period(torch.float32) == 4
    with torch.no_grad():
        assert not forward_scaled(canonicalize(*args32, lengths, time_varying), 4).underflow
    log_z = hmm.log_normalizer(*args32, lengths=lengths)
    _, _, g_lik = torch.autograd.grad(log_z.sum(), args32)
    post = hmm.posterior(*[a.detach() for a in args32], lengths=lengths)
    for n in range(4):
        bf = oracle(*args64, lengths, time_varying, n)
        L = bf.marginals.shape[0]
        # float32 with |log Z| ~ 20: measured errors ~1e-6; 1e-5 (relative / absolute) leaves room.
        assert abs(log_z[n].item() - bf.log_normalizer.item()) < 1e-5 * max(1.0, abs(bf.log_normalizer.item()))
        assert torch.allclose(g_lik[n, :L].double(), bf.marginals, atol=1e-5), "gradient = marginals"
        assert torch.allclose(post.marginals[n, :L].double(), bf.marginals, atol=1e-5), "marginals"
        assert torch.all(post.marginals[n, L:] == 0)


def test_moderate_conflicts_retry_with_per_step_renormalization():
    # ~60 nats of conflict every other step: four steps without renormalization underflow
    # float32 (e^-120 < 1.2e-38), one step does not; forward_scaled then retries with period 1.
    T = 8
    log_trans = torch.tensor([[0.0, -60.0], [-60.0, 0.0]], dtype=F64)
    favour = torch.arange(T) % 2
    log_lik = torch.where(torch.nn.functional.one_hot(favour, 2).bool(), 0.0, -60.0).to(F64)
    args64 = (torch.zeros(2, dtype=F64), log_trans, log_lik)
    args32 = [a.float() for a in args64]
    ch = canonicalize(*args32, None, None)
    assert forward_scaled(ch, renorm_period(torch.float32)).underflow, "the lazy pass must underflow"
    assert not forward_scaled(ch).underflow, "the per-step retry must not"
    bf = brute_force(*args64)
    inputs = [a.clone().requires_grad_() for a in args32]
    log_z = hmm.log_normalizer(*inputs)
    g_init, g_trans, g_lik = torch.autograd.grad(log_z, inputs)
    # |log Z| ~ 240 in float32: relative 1e-5; posterior statistics: absolute 1e-5.
    assert abs(log_z.item() - bf.log_normalizer.item()) < 1e-5 * abs(bf.log_normalizer.item())
    assert torch.allclose(g_lik.double(), bf.marginals, atol=1e-5), "marginals, atol 1e-5"
    assert torch.allclose(g_trans.double(), bf.pairwise, atol=1e-5), "pairwise, atol 1e-5"


def gaussian_chain(seed, B, T, K, dtype):
    """A normalized HMM with 1-d Gaussian emissions and its log potentials (float64 draws)."""
    g = torch.Generator().manual_seed(seed)
    log_init = torch.log_softmax(torch.randn(K, generator=g, dtype=F64), -1)
    sticky = torch.randn(K, K, generator=g, dtype=F64) + 3 * torch.eye(K, dtype=F64)
    log_trans = torch.log_softmax(sticky, -1)
    loc = torch.randn(K, generator=g, dtype=F64) * 3
    y = torch.randn(B, T, generator=g, dtype=F64) * 3
    log_lik = torch.distributions.Normal(loc, 1.0).log_prob(y[..., None])
    return [x.to(dtype) for x in (log_init, log_trans, log_lik)], (loc, y)


def test_float32_long_sequence_matches_float64():
    args64, _ = gaussian_chain(12, 1, 100_000, 8, F64)
    args32 = [a.float() for a in args64]
    ref = hmm.log_normalizer(*args64, method="sequential")
    for method in ("sequential", "parallel", "auto"):
        out = hmm.log_normalizer(*args32, method=method)
        assert out.dtype == torch.float32 and torch.isfinite(out).all()
        rel = ((out.double() - ref).abs() / ref.abs()).item()
        assert rel < 1e-5, f"{method}: float32 relative error {rel:.2e} >= 1e-5"


def test_bad_method_raises_value_error():
    args = random_chain(33, (2,), 4, 3, False)
    for fn in (hmm.log_normalizer, hmm.posterior):
        with pytest.raises(ValueError, match="method"):
            fn(*args, method="scan")


@pytest.mark.parametrize("fn", [hmm.log_normalizer, hmm.posterior, hmm.viterbi, hmm.sample,
                                hmm.parallel_log_normalizer])
@pytest.mark.parametrize("change,name", [
    (dict(log_lik=torch.zeros(3)), "log_lik"),
    (dict(log_lik=[[0.0, 1.0]]), "log_lik"),
    (dict(log_init=torch.zeros(4, dtype=F64)), "log_init"),
    (dict(log_init=torch.zeros(3)), "log_init"),
    (dict(log_trans=torch.zeros(3, 4, dtype=F64)), "log_trans"),
    (dict(log_trans=torch.full((3, 3), torch.nan, dtype=F64)), "log_trans"),
    (dict(log_init=torch.zeros(5, 3, dtype=F64)), "log_init"),
    (dict(lengths=torch.tensor([0, 4])), "lengths"),
    (dict(lengths=torch.tensor([4, 5])), "lengths"),
    (dict(lengths=torch.tensor([4.0, 2.0])), "lengths"),
    (dict(lengths=torch.tensor([4, 2, 1])), "lengths"),
    (dict(log_lik=torch.zeros(2, 4, 3, dtype=F64).index_fill_(1, torch.tensor([1]), torch.nan)),
     "log_lik"),
])
def test_bad_input_raises_value_error_naming_argument(fn, change, name):
    args = dict(log_init=torch.zeros(3, dtype=F64), log_trans=torch.zeros(3, 3, dtype=F64),
                log_lik=torch.zeros(2, 4, 3, dtype=F64), lengths=None)
    args.update(change)
    with pytest.raises(ValueError, match=name):
        fn(**args)


def test_nan_beyond_length_is_ignored():
    log_init, log_trans, log_lik = random_chain(13, (2,), 4, 3, False)
    padded = log_lik.clone()
    padded[1, 2:] = torch.nan
    lengths = torch.tensor([4, 2])
    assert torch.allclose(hmm.log_normalizer(log_init, log_trans, padded, lengths),
                          hmm.log_normalizer(log_init, log_trans, log_lik, lengths), atol=0)


def test_matches_pyro_discrete_hmm_convention_checked_by_brute_force():
    dist = pytest.importorskip("pyro.distributions")
    g = torch.Generator().manual_seed(14)
    K, T, B = 3, 5, 4
    init_logits = torch.randn(K, generator=g, dtype=F64)
    trans_logits = torch.randn(K, K, generator=g, dtype=F64)
    loc, y = torch.randn(K, generator=g, dtype=F64), torch.randn(B, T, generator=g, dtype=F64)
    pyro_lp = dist.DiscreteHMM(init_logits, trans_logits, dist.Normal(loc, 1.0)).log_prob(y)
    log_trans = trans_logits.log_softmax(-1)
    log_lik = torch.distributions.Normal(loc, 1.0).log_prob(y[..., None])
    log_init = torch.logsumexp(init_logits.log_softmax(-1)[:, None] + log_trans, 0)
    ours = hmm.log_normalizer(log_init, log_trans, log_lik)
    for n in range(B):  # Pyro's model: a hidden z_{-1} ~ softmax(initial_logits), no emission
        lik = torch.cat([torch.zeros(1, K, dtype=F64), log_lik[n]])
        bf = brute_force(init_logits.log_softmax(-1), log_trans, lik)
        assert torch.allclose(pyro_lp[n], bf.log_normalizer, atol=1e-10), "Pyro convention"
    assert torch.allclose(ours, pyro_lp, atol=1e-10), "ours == Pyro DiscreteHMM, atol 1e-10"


def test_matches_hmmlearn_gaussian_hmm():
    hmm_lib = pytest.importorskip("hmmlearn.hmm")
    g = torch.Generator().manual_seed(15)
    K, D, T = 4, 2, 30
    lengths = torch.tensor([30, 17, 25])
    start = torch.softmax(torch.randn(K, generator=g, dtype=F64), -1)
    sticky = torch.randn(K, K, generator=g, dtype=F64) + 2 * torch.eye(K, dtype=F64)
    trans = torch.softmax(sticky, -1)
    means = torch.randn(K, D, generator=g, dtype=F64) * 2
    var = torch.rand(K, D, generator=g, dtype=F64) + 0.5
    x = torch.randn(3, T, D, generator=g, dtype=F64) * 2
    model = hmm_lib.GaussianHMM(n_components=K, covariance_type="diag", init_params="", params="")
    model.startprob_, model.transmat_ = start.numpy(), trans.numpy()
    model.means_, model.covars_ = means.numpy(), var.numpy()
    flat = torch.cat([x[n, :L] for n, L in enumerate(lengths.tolist())]).numpy()
    log_lik = torch.distributions.Normal(means, var.sqrt()).log_prob(x[..., None, :]).sum(-1)
    args = (start.log(), trans.log(), log_lik)
    post = hmm.posterior(*args, lengths=lengths)
    vit = hmm.viterbi(*args, lengths=lengths)
    valid = torch.arange(T)[None, :] < lengths[:, None]
    score = model.score(flat, lengths.tolist())
    assert abs(post.log_normalizer.sum().item() - score) < 1e-8, "score, atol 1e-8"
    proba = torch.from_numpy(model.predict_proba(flat, lengths.tolist()))
    assert torch.allclose(post.marginals[valid], proba, atol=1e-8), "predict_proba, atol 1e-8"
    logprob, states = model.decode(flat, lengths.tolist())
    assert abs(vit.log_prob.sum().item() - logprob) < 1e-8, "decode log prob, atol 1e-8"
    assert torch.equal(vit.states[valid], torch.from_numpy(states).long()), "decode states"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    args = random_chain(16, (3,), 50, 4, True)
    lengths = torch.tensor([50, 20, 7])
    cuda = [a.cuda().requires_grad_() for a in args]
    cpu = [a.clone().requires_grad_() for a in args]
    out_gpu = hmm.log_normalizer(*cuda, lengths=lengths.cuda())
    out_cpu = hmm.log_normalizer(*cpu, lengths=lengths)
    assert torch.allclose(out_gpu.cpu(), out_cpu, atol=1e-10), "log Z on CUDA, atol 1e-10"
    grads_gpu = torch.autograd.grad(out_gpu.sum(), cuda)
    for gg, gc in zip(grads_gpu, torch.autograd.grad(out_cpu.sum(), cpu)):
        assert torch.allclose(gg.cpu(), gc, atol=1e-10), "gradients on CUDA, atol 1e-10"
    par = hmm.parallel_log_normalizer(*[a.cuda() for a in args], lengths=lengths.cuda())
    assert torch.allclose(par.cpu(), out_cpu, atol=1e-9), "parallel scan on CUDA, atol 1e-9"
    assert torch.equal(hmm.viterbi(*cuda, lengths=lengths.cuda()).states.cpu(),
                       hmm.viterbi(*args, lengths=lengths).states)
    draws = hmm.sample(*cuda, sample_shape=(5,), lengths=lengths.cuda(),
                       generator=torch.Generator(device="cuda").manual_seed(0))
    assert draws.device.type == "cuda" and draws.shape == (5, 3, 50)


def left_right_chain(T: int, dtype):
    """(log_init, log_trans, log_lik) of the left-right chain of ``left_right_hmm_data`` (structural zeros)."""
    y = left_right_hmm_data(T)
    log_lik = torch.distributions.Normal(LEFT_RIGHT_LOC, 1.0).log_prob(y[:, None])
    log_init = torch.tensor([0.0, -torch.inf, -torch.inf], dtype=F64)
    return log_init.to(dtype), LEFT_RIGHT_TRANS.log().to(dtype), log_lik.to(dtype)


@pytest.mark.parametrize("method", ["auto", "sequential", "parallel"])
@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_structural_zeros_long_chain_has_no_nan(method, dtype):
    """Before the fix the tree product (chosen by "auto" from T = 256) and the autograd posteriors took the
    gradient of ``torch.logsumexp`` over all--inf terms, exp(-inf + inf) = NaN: NaN marginals, pairwise
    counts and gradients while log Z and Viterbi were right. Checked against a float64 log-space oracle."""
    T = 400
    log_init, log_trans, log_lik = left_right_chain(T, dtype)
    ref_z, ref_marg = forward_backward(log_init, log_trans, log_lik)
    tol = 1e-9 if dtype == F64 else 1e-5
    post = hmm.posterior(log_init, log_trans, log_lik, method=method)
    assert torch.isfinite(post.marginals).all() and torch.isfinite(post.pairwise).all()
    assert torch.allclose(post.marginals.double(), ref_marg, atol=tol), "marginals vs log-space oracle"
    assert abs(float(post.log_normalizer) - float(ref_z)) < (1e-8 if dtype == F64 else 1e-5) * abs(float(ref_z))
    lik = log_lik.clone().requires_grad_()
    trans = log_trans.clone().requires_grad_()
    (g_lik, g_trans) = torch.autograd.grad(hmm.log_normalizer(log_init, trans, lik, method=method), (lik, trans))
    assert torch.allclose(g_lik.double(), ref_marg, atol=tol), "d log Z / d log_lik = marginals"
    assert torch.isfinite(g_trans).all() and float(g_trans[1, 0]) == 0.0, "no count on a structural zero"
    tracked = hmm.posterior(log_init, log_trans, log_lik.clone().requires_grad_(), method=method)
    assert torch.allclose(tracked.marginals.detach().double(), ref_marg, atol=tol), "differentiable posterior"


@pytest.mark.parametrize("time_varying,shared", [(False, False), (False, True), (True, False), (True, True)])
def test_doubling_jacobian_matches_brute_force(time_varying, shared):
    """The doubling scans' log Z and Jacobian (``hmm_doubling``) against enumeration of 3^6 paths, float64: rounding
    only (atol 1e-10); the homogeneous pairwise counts are summed over steps, per sequence."""
    args = random_chain(41, (3,), 6, 3, time_varying, trans_batched=not shared)
    ch = canonicalize(*args, time_varying=time_varying)
    out = doubling_jacobian(ch)
    assert out is not None, "a moderate chain passes the underflow guard"
    log_z, d_init, d_trans, d_lik = out
    for n in range(3):
        bf = oracle(*args, None, time_varying, n)
        assert torch.allclose(log_z[n], bf.log_normalizer, atol=1e-10)
        assert torch.allclose(d_lik[n], bf.marginals, atol=1e-10) and torch.allclose(d_init[n], bf.marginals[0],
                                                                                     atol=1e-10)
        assert torch.allclose(d_trans[n] if time_varying else d_trans[n, 0], bf.pairwise, atol=1e-10)


def test_doubling_jacobian_matches_the_tree_on_a_long_float32_chain():
    """T = 309, K = 3 (the sunspot HMM's size): the doubling result in float32 is at least as close to the float64
    recursion as the tree product's autograd Jacobian (measured: marginals 4e-7 vs 8e-6 off; log Z ~ 1500 to
    1.7e-5 both); bounds 1e-4 on marginals and pairwise per step, 1e-6 relative on log Z."""
    args = random_chain(42, (1,), 309, 3, False, scale=5.0)
    reference = ops.jacobian_by_recursion(canonicalize(*args))
    ch32 = canonicalize(*[a.float() for a in args])
    out = doubling_jacobian(ch32)
    assert out is not None
    log_z, d_init, d_trans, d_lik = [x.double() for x in out]
    assert abs(float(log_z - reference[0])) <= 1e-6 * abs(float(reference[0]))
    assert torch.allclose(d_lik, reference[3], atol=1e-4) and torch.allclose(d_init, reference[1], atol=1e-4)
    assert torch.allclose(d_trans / 308, reference[2] / 308, atol=1e-4)


def test_doubling_declines_structural_zeros_underflow_and_lengths_and_the_op_still_answers():
    """None (the op then runs the tree product) for a -inf potential, for potentials conflicting beyond float64's
    range (an entry below the smallest normal number), and with lengths; the op's answer equals brute force."""
    left_right = (torch.tensor([0.0, -torch.inf]), torch.tensor([[-0.1, -2.4], [-torch.inf, 0.0]]),
                  torch.randn(5, 2, generator=torch.Generator().manual_seed(3), dtype=F64))
    conflict = (torch.zeros(2, dtype=F64), torch.zeros(2, 2, dtype=F64),
                torch.tensor([[0.0, -800.0], [-800.0, 0.0]] * 3, dtype=F64))
    for args in (left_right, conflict):
        args = tuple(a.double() for a in args)
        assert doubling_jacobian(canonicalize(*args)) is None
        bf = brute_force(*args)
        post = hmm.posterior(*args, method="parallel")
        assert torch.allclose(post.log_normalizer, bf.log_normalizer, atol=1e-10)
        assert torch.allclose(post.marginals, bf.marginals, atol=1e-10)
    args = random_chain(43, (2,), 5, 2, False)
    assert doubling_jacobian(canonicalize(*args, lengths=torch.tensor([5, 3]))) is None


def test_doubling_work_bound():
    assert doubling_fits(1, 309, 3) and doubling_fits(1, 732, 3)
    assert not doubling_fits(1, 1, 3) and not doubling_fits(1, 1000, 8) and not doubling_fits(1, 100_000, 8)
