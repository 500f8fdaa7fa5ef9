"""The chain kernels as custom torch ops (ppl.inference.exact.ops). HMM: values and derivatives against
brute-force enumeration and autograd through the log-space recursion, vmap against a loop, make_fx records
one node per kernel call, and a model with a collapsed chain runs under vmap(grad) over NUTS chains. Kalman:
log Z and its gradient against the dense-Gaussian oracle (autograd through it) and the eager kernel, vmap
against a loop, one node per call."""
from __future__ import annotations

import pytest
import torch
from torch.fx.experimental.proxy_tensor import make_fx

import ppl
from ppl.inference import chains, compiled
from ppl.inference.exact import hmm, kalman, ops
from ppl.inference.exact.hmm_inputs import canonicalize
from ppl.inference.exact.hmm_logspace import forward_log
from ppl.inference.exact.kalman_info import LDSPrior, info_log_normalizer64_eager
from ppl.models import hmm as hmm_model
from ppl.primitives import ModelInputError
from tests.reference import dense_gaussian
from tests.reference.brute_force import brute_force

F64 = torch.float64
OPS = {"ppl.hmm_log_z.default", "ppl.hmm_log_z_jac.default", "ppl.hmm_hvp.default", "ppl.kalman_log_z64.default",
       "ppl.kalman_log_z64_vjp.default", "ppl.kalman_total64.default"}


def chain(seed: int, N: int, T: int, K: int, time_varying: bool = False, shared: bool = True, scale: float = 2.0):
    """Random unnormalized float64 potentials: log_init (N, K), log_trans ((N,) [T-1,] K, K), log_lik (N, T, K)."""
    g = torch.Generator().manual_seed(seed)
    steps = (T - 1,) if time_varying else ()
    trans_batch = () if shared else (N,)
    return (torch.randn(N, K, generator=g, dtype=F64) * scale,
            torch.randn(trans_batch + steps + (K, K), generator=g, dtype=F64) * scale,
            torch.randn(N, T, K, generator=g, dtype=F64) * scale)


def log_space_reference(log_init, log_trans, log_lik, lengths=None, time_varying=None):
    """log Z (N,) by autograd-differentiable log-space recursion (``forward_log``): a second implementation."""
    return forward_log(canonicalize(log_init, log_trans, log_lik, lengths, time_varying)).log_normalizer


def op_nodes(module) -> list[str]:
    return [str(n.target) for n in module.graph.nodes if str(n.target) in OPS]


@pytest.mark.parametrize("method", ["sequential", "parallel"])
@pytest.mark.parametrize("time_varying,shared", [(False, True), (False, False), (True, True), (True, False)])
def test_value_and_gradients_match_brute_force(method, time_varying, shared):
    """log Z and d log Z / d(log_init, log_trans, log_lik) = (p(z_0), pairwise counts, marginals) per sequence,
    float64, 1e-10 against enumeration of all K^T paths (T = 5, K = 3); the gradient of a weighted sum of the
    sequences' log Z (weights 1, 2) checks the contraction of a shared transition over the batch."""
    li, lt, ll = (x.requires_grad_() for x in chain(0, 2, 5, 3, time_varying, shared))
    log_z = hmm.log_normalizer(li, lt, ll, time_varying=time_varying, method=method)
    weights = torch.tensor([1.0, 2.0], dtype=F64)
    g_init, g_trans, g_lik = torch.autograd.grad((weights * log_z).sum(), (li, lt, ll))
    want_trans = torch.zeros_like(lt)
    for n in range(2):
        trans_n = lt if shared else lt[n]
        bf = brute_force(li[n].detach(), trans_n.detach(), ll[n].detach(), time_varying)
        assert abs(float(log_z[n].detach()) - float(bf.log_normalizer)) < 1e-10, "log Z, 1e-10"
        assert torch.allclose(g_lik[n], weights[n] * bf.marginals, atol=1e-10), "d/dlog_lik = marginals"
        assert torch.allclose(g_init[n], weights[n] * bf.marginals[0], atol=1e-10), "d/dlog_init = p(z_0)"
        if shared:
            want_trans += weights[n] * bf.pairwise
        else:
            want_trans[n] = weights[n] * bf.pairwise
    assert torch.allclose(g_trans, want_trans, atol=1e-10), "d/dlog_trans = expected transition counts"


@pytest.mark.parametrize("method", ["sequential", "parallel"])
def test_lengths_and_structural_zeros_match_log_space(method):
    """Ragged lengths and -inf transitions (a left-right chain): value and gradients equal autograd through the
    log-space recursion (float64, 1e-10), no NaN in the gradient of a structural zero."""
    li, lt, ll = chain(1, 3, 300, 3)
    lt = lt.masked_fill(torch.tensor([[False, False, False], [True, False, False], [True, True, False]]), -torch.inf)
    lengths = torch.tensor([300, 17, 120])
    ours = [x.clone().requires_grad_() for x in (li, lt, ll)]
    ref = [x.clone().requires_grad_() for x in (li, lt, ll)]
    a = hmm.log_normalizer(*ours, lengths=lengths, method=method)
    b = log_space_reference(*ref, lengths=lengths)
    assert torch.allclose(a, b, atol=1e-10, rtol=0), "log Z vs log space, 1e-10"
    for x, y in zip(torch.autograd.grad(a.sum(), ours), torch.autograd.grad(b.sum(), ref)):
        assert torch.isfinite(x).all() and torch.allclose(x, y, atol=1e-10), "gradients vs log space, 1e-10"


def test_underflow_fallback_matches_log_space():
    """Potentials conflicting by ~2000 nats per step underflow the scaled recursion in float64: the op's
    log-space fallback gives the log-space reference's value and gradient (1e-8 relative)."""
    li, lt, ll = chain(2, 2, 40, 3, scale=1000.0)
    ours = [x.clone().requires_grad_() for x in (li, lt, ll)]
    ref = [x.clone().requires_grad_() for x in (li, lt, ll)]
    a = hmm.log_normalizer(*ours, method="sequential")
    b = log_space_reference(*ref)
    assert torch.allclose(a, b, rtol=1e-8, atol=0)
    for x, y in zip(torch.autograd.grad(a.sum(), ours), torch.autograd.grad(b.sum(), ref)):
        assert torch.allclose(x, y, atol=1e-8)


@pytest.mark.parametrize("method", ["sequential", "parallel"])
def test_gradcheck_and_gradgradcheck_through_the_ops(method):
    """First derivatives (hmm_log_z_jac) and second derivatives (hmm_hvp) against finite differences."""
    args = [x.requires_grad_() for x in chain(3, 2, 4, 3, shared=False)]

    def fn(*xs):
        return hmm.log_normalizer(*xs, lengths=torch.tensor([4, 3]), method=method)

    assert torch.autograd.gradcheck(fn, args, eps=1e-6, atol=1e-7)
    assert torch.autograd.gradgradcheck(fn, args, eps=1e-6, atol=1e-6)


def test_differentiable_posterior_hessian_matches_log_space():
    """The posterior marginals are differentiable (the Jacobian outputs' backward is hmm_hvp): d sum(w *
    marginals) / d log_lik equals the second derivative of the log-space reference (1e-9)."""
    li, lt, ll = chain(4, 1, 6, 3)
    w = torch.randn(1, 6, 3, generator=torch.Generator().manual_seed(5), dtype=F64)
    x = ll.clone().requires_grad_()
    marg = hmm.posterior(li, lt, x, method="sequential").marginals
    (ours,) = torch.autograd.grad((w * marg).sum(), x)
    y = ll.clone().requires_grad_()
    (g,) = torch.autograd.grad(log_space_reference(li, lt, y).sum(), y, create_graph=True)
    (want,) = torch.autograd.grad((w * g).sum(), y)
    assert torch.allclose(ours, want, atol=1e-9)


@pytest.mark.parametrize("method", ["sequential", "parallel"])
@pytest.mark.parametrize("trans_mapped", [False, True])
def test_vmap_of_grad_equals_a_loop(method, trans_mapped):
    """vmap(grad_and_value) over B = 4 parameter sets (shared transition mapped or not, ragged lengths) is one
    op call on B x N sequences and equals B separate autograd passes (float64, 1e-10)."""
    li, lt, ll = chain(6, 2, 300, 3)
    lengths = torch.tensor([300, 211])
    B = 4
    shifts = torch.randn(B, 3, generator=torch.Generator().manual_seed(7), dtype=F64)

    def U(shift):
        trans = (lt + shift[:, None]).log_softmax(-1) if trans_mapped else lt.log_softmax(-1)
        return hmm.log_normalizer(li, trans, ll + shift, lengths=lengths, method=method).sum()

    grads, values = torch.func.vmap(torch.func.grad_and_value(U))(shifts)
    for b in range(B):
        s = shifts[b].clone().requires_grad_()
        value = U(s)
        (grad,) = torch.autograd.grad(value, s)
        assert abs(float(values[b] - value)) < 1e-10 and torch.allclose(grads[b], grad, atol=1e-10)


def test_make_fx_records_one_node_per_kernel_call():
    """make_fx of vmap(grad_and_value(U)) with a T = 2000 chain records the kernel as one node (the step loop is
    not traced into): a graph of < 100 nodes, which gives the eager values on new inputs; a NaN potential still
    raises inside the recorded graph (the check runs in the op's implementation)."""
    li, lt, ll = chain(8, 1, 2000, 3)

    def U(theta):
        return hmm.log_normalizer(li, (lt * theta[0]).log_softmax(-1), ll * theta[1], method="sequential").sum()

    fn = torch.func.vmap(torch.func.grad_and_value(U))
    theta = torch.tensor([[1.0, 1.0], [0.5, 2.0]], dtype=F64)
    module = make_fx(fn)(theta)
    assert op_nodes(module) == ["ppl.hmm_log_z_jac.default"], "one kernel node"
    assert len(module.graph.nodes) < 100
    other = torch.tensor([[0.7, 1.3], [1.1, 0.9]], dtype=F64)
    for a, b in zip(module(other), fn(other)):
        assert torch.allclose(a, b, atol=1e-10)
    with pytest.raises(ValueError, match="log_lik"):
        module(torch.tensor([[1.0, float("nan")], [1.0, 1.0]], dtype=F64))


def test_collapsed_hmm_potential_runs_under_vmap_over_chains():
    """The library HMM (Dirichlet transition rows, chain collapsed) as a NUTS potential: vmap(grad_and_value)
    over 3 chains (markov_chain's checks read the chains' values through vmap) equals one autograd pass per
    chain (float64, 1e-10), and make_fx records it with the kernel as one node."""
    sim = hmm_model.simulate(seed=0, N=2, T=60)
    y = sim.args[0].double()
    plan = ppl.compile(hmm_model.model, y, **sim.kwargs)
    fmodel = chains.fit_model(hmm_model.model, plan.facts)
    K = 3
    g = torch.Generator().manual_seed(0)
    rows = torch.randn(3, K * K + 2 * K, generator=g, dtype=F64)

    def U(row):
        values = {"trans": row[:K * K].reshape(K, K).softmax(-1), "loc": row[K * K:K * K + K],
                  "scale": row[K * K + K:].exp()}
        return -compiled.log_joint(fmodel, (y,), sim.kwargs, values, compiled.SitePlan.of(plan))

    fn = torch.func.vmap(torch.func.grad_and_value(U))
    grads, values = fn(rows)
    for c in range(3):
        r = rows[c].clone().requires_grad_()
        value = U(r)
        (grad,) = torch.autograd.grad(value, r)
        assert abs(float(values[c] - value)) < 1e-10 * abs(float(value)) + 1e-10
        assert torch.allclose(grads[c], grad, atol=1e-10, rtol=1e-10)
    module = make_fx(fn, _error_on_data_dependent_ops=False)(rows)
    assert op_nodes(module) == ["ppl.hmm_log_z_jac.default"]


def test_invalid_transition_under_vmap_raises_naming_the_site():
    """markov_chain's validation still runs under vmap: a row that does not sum to one in any of the mapped
    parameter sets raises ModelInputError naming the site."""
    def model(trans):
        return ppl.markov_chain("z", 2, trans, length=3)

    good = torch.tensor([[0.9, 0.1], [0.2, 0.8]], dtype=F64)
    batch = torch.stack([good, good * torch.tensor([[1.0], [1.5]], dtype=F64)])
    with pytest.raises(ModelInputError, match="site 'z'.*sum to one"):
        torch.func.vmap(model, randomness="different")(batch)


def test_ops_check_inputs_and_fake_shapes():
    """The fake implementations give the real outputs' shapes (make_fx in fake mode), and the op names the
    potential with the caller's shape when it holds NaN."""
    li, lt, ll = chain(9, 2, 7, 3, time_varying=True, shared=False)
    ch = canonicalize(li, lt, ll, time_varying=True)
    real = ops.hmm_log_z_jac(*ch[:4], True, False, [2])
    module = make_fx(lambda a, b, c: ops.hmm_log_z_jac(a, b, c, None, True, False, [2]), tracing_mode="fake")(*ch[:3])
    fake_shapes = [tuple(n.meta["val"].shape) for n in module.graph.nodes if n.op == "call_function"
                   and "getitem" in str(n.target)]
    assert fake_shapes == [tuple(x.shape) for x in real]
    with pytest.raises(ValueError, match=r"log_lik.*\(2, 7, 3\)"):
        hmm.log_normalizer(li, lt, ll.masked_fill(ll > 2, float("nan")), time_varying=True)


def lds_inputs(seed: int, N: int = 2, T: int = 6, D: int = 2):
    """float64 (m0 (D,), P0, A, Q (D, D) shared, b (N, T-1, D), J (T, D, D) shared, h (N, T, D))."""
    g = torch.Generator().manual_seed(seed)

    def spd(*batch, scale=1.0):
        a = torch.randn(*batch, D, D, generator=g, dtype=F64)
        return scale * (a @ a.mT / D + torch.eye(D, dtype=F64))

    A = 0.8 * torch.eye(D, dtype=F64) + 0.1 * torch.randn(D, D, generator=g, dtype=F64)
    return (torch.randn(D, generator=g, dtype=F64), spd(), A, spd(scale=0.2),
            0.3 * torch.randn(N, T - 1, D, generator=g, dtype=F64), spd(T, scale=0.5),
            torch.randn(N, T, D, generator=g, dtype=F64))


def dense_log_z(m0, P0, A, Q, b, J, h):
    """log Z (N,) by the dense-Gaussian oracle, one sequence at a time (autograd-differentiable)."""
    T = h.shape[-2]
    steps = lambda M: M.expand(T - 1, *M.shape)  # noqa: E731
    return torch.stack([dense_gaussian.potentials_posterior_cov_form(m0, P0, steps(A), steps(Q), b[n], J, h[n])[0]
                        for n in range(h.shape[0])])


@pytest.mark.parametrize("total", [False, True])
def test_kalman_log_z_and_gradient_match_the_dense_oracle(total):
    """log Z (per sequence, or summed: the collapsed chain's factor) and its gradient w.r.t. every input (shared
    matrices summed over sequences) equal the dense-Gaussian oracle's, float64, 1e-9; for the symmetric matrix
    inputs (P0, Q, J) the symmetric parts of the gradients (the kernel reads one triangle, the oracle both: the
    derivatives along symmetric perturbations are what both define)."""
    ours = [x.clone().requires_grad_() for x in lds_inputs(0)]
    ref = [x.clone().requires_grad_() for x in lds_inputs(0)]
    weights = torch.tensor([1.0, -0.5], dtype=F64)
    want = dense_log_z(*ref)
    if total:
        got = ops.kalman_total_log_normalizer64(LDSPrior(*ours[:5]), ours[5], ours[6])
        want, weights = want.sum(), torch.ones((), dtype=F64)
    else:
        got = kalman.info_log_normalizer64(LDSPrior(*ours[:5]), ours[5], ours[6])
    assert torch.allclose(got, want, atol=1e-9, rtol=0), "log Z vs dense oracle, 1e-9"
    grads = zip(torch.autograd.grad((weights * got).sum(), ours), torch.autograd.grad((weights * want).sum(), ref))
    for i, (a, b) in enumerate(grads):
        if i in (1, 3, 5):  # P0, Q, J
            a, b = a + a.mT, b + b.mT
        assert torch.allclose(a, b, atol=1e-9), f"gradient {i} vs dense oracle, 1e-9"


@pytest.mark.parametrize("total", [False, True])
def test_kalman_op_under_vmap_equals_a_loop_and_records_one_node(total):
    """vmap(grad_and_value) over 3 parameter sets equals the eager kernel (``info_log_normalizer64_eager``, plain
    autograd) one set at a time (float64, 1e-10); make_fx records the kernel as one node (forward and gradient
    in one for the summed form, forward and VJP for the per-sequence one)."""
    m0, P0, A, Q, b, J, h = lds_inputs(1, T=40)
    thetas = torch.tensor([[1.0, 1.0, 1.0], [0.5, 0.9, 1.3], [-1.0, 1.1, 0.2]], dtype=F64)
    kernel = ops.kalman_total_log_normalizer64 if total else kalman.info_log_normalizer64

    def potential(fn):
        return lambda theta: fn(LDSPrior(m0 * theta[0], P0, A * theta[1], Q, b), J, h * theta[2]).sum()

    batched = torch.func.vmap(torch.func.grad_and_value(potential(kernel)))
    grads, values = batched(thetas)
    for i in range(3):
        t = thetas[i].clone().requires_grad_()
        value = potential(info_log_normalizer64_eager)(t)
        (grad,) = torch.autograd.grad(value, t)
        assert abs(float(values[i] - value.detach())) < 1e-10 and torch.allclose(grads[i], grad, atol=1e-10)
    module = make_fx(batched)(thetas)
    want = ["ppl.kalman_total64.default"] if total else ["ppl.kalman_log_z64.default", "ppl.kalman_log_z64_vjp.default"]
    assert op_nodes(module) == want and len(module.graph.nodes) < 150


def test_kalman_second_derivative_raises():
    """The ops are first order: differentiating their gradient raises instead of returning a wrong Hessian."""
    m0, P0, A, Q, b, J, h = lds_inputs(2)
    x = h.clone().requires_grad_()
    for fn in (ops.kalman_total_log_normalizer64, kalman.info_log_normalizer64):
        (g,) = torch.autograd.grad(fn(LDSPrior(m0, P0, A, Q, b), J, x).sum(), x, create_graph=True)
        with pytest.raises(RuntimeError):
            torch.autograd.grad(g.sum(), x)


def test_kalman_op_checks_its_inputs():
    """A prior covariance that is not positive definite is refused inside the op, naming it."""
    m0, P0, A, Q, b, J, h = lds_inputs(3)
    with pytest.raises(ValueError, match="initial_cov"):
        ops.kalman_total_log_normalizer64(LDSPrior(m0, -P0, A, Q, b), J, h.requires_grad_())
