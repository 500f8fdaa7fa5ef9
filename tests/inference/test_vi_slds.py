"""Switching LDS by structured mean field in backend "vi" (inference/vi/slds.py) against oracles on the same input:

- the q(x) step at any q(z), q(globals): the Gaussian whose log-density is E_q log p(x, y | z, globals) up to a
  constant (autograd Hessian / gradient of the ELBO's own closed-form terms at a point-mass q(x)), solved densely;
- the q(z) step: brute-force enumeration of every z-path (tests/reference/brute_force.py) given the same tables;
- tiny problems (T = 5, K = 2) with the globals concentrated at known values: the ELBO is at most the exact log
  evidence (enumeration over z-paths x dense Gaussian marginal likelihood per path,
  tests/reference/dense_gaussian.py) and, on a well-separated problem, q(z_t) is close to the exact p(z_t | y);
- the ELBO never decreases; routing / explain; the library switching LDS is routed to vi and segments it.
"""
import itertools
import math
import warnings

import pytest
import torch

import ppl
from ppl import dist
from ppl.analysis import analyze
from ppl.backends import UnsupportedModelError
from ppl.graph import trace_graph
from ppl.inference.vi import gaussian_chain as G
from ppl.inference.vi import slds as S
from ppl.inference.vi.cavi import ELBODecreased
from ppl.models.lds import rotation
from tests.reference import dense_gaussian
from tests.reference.brute_force import brute_force

D64 = torch.float64
MNIW = ppl.MatrixNormalInverseWishart


@ppl.model
def conjugate_slds(y, K, D, trans_prior, dyn_prior, em_prior):
    """Dirichlet transition rows, an MNIW (A_k, Q_k) per regime, MNIW (C, R) with an offset column."""
    trans = ppl.sample("trans", dist.Dirichlet(trans_prior).to_event(1))
    A, Q = MNIW.unpack(ppl.sample("dynamics", MNIW(*dyn_prior)))
    C, R = MNIW.unpack(ppl.sample("emission", MNIW(*em_prior)), D + 1)
    _, x = ppl.switching_chain("s", K, D, trans, A, Q, length=y.shape[0])
    ppl.sample("y", dist.MultivariateNormal(x @ C[:, :D].T + C[:, D], R).to_event(1), obs=y)


NOISE = {"separated": 0.25, "ambiguous": 1.0}


def truth(noise=NOISE["separated"]):
    """Rotations by +-0.9 rad; noise sds ~0.05 ("separated") or ~0.1 ("ambiguous": some steps' regimes uncertain)."""
    trans = torch.tensor([[0.8, 0.2], [0.3, 0.7]], dtype=D64)
    A = torch.stack([rotation(0.9, 0.95), rotation(-0.9, 0.95)]).double()
    Q = torch.stack([0.01 * torch.eye(2, dtype=D64), torch.tensor([[0.02, 0.005], [0.005, 0.01]], dtype=D64)])
    C = torch.tensor([[1.0, 0.2, 0.3], [-0.3, 1.0, -0.2]], dtype=D64)
    R = 0.01 * torch.eye(2, dtype=D64)
    return trans, A, noise * Q, C, noise * R


def concentrated(strength, noise=NOISE["separated"]):
    trans, A, Q, C, R = truth(noise)
    eye = torch.eye(2, dtype=D64)
    return (strength * trans,
            (A, strength * eye.expand(2, 2, 2), strength * Q, torch.full((2,), strength, dtype=D64)),
            (C, strength * torch.eye(3, dtype=D64), strength * R, strength))


def weak(K=2, D=2, P=2):
    eye = lambda n: torch.eye(n, dtype=D64)  # noqa: E731
    return (torch.ones(K, K, dtype=D64) + 4 * eye(K),
            (torch.zeros(K, D, D, dtype=D64), eye(D).expand(K, D, D), 0.1 * eye(D).expand(K, D, D),
             torch.full((K,), D + 2.0, dtype=D64)),
            (torch.zeros(P, D + 1, dtype=D64), 0.1 * eye(D + 1), 0.1 * eye(P), P + 2.0))


def simulate(T, seed, noise=NOISE["separated"]):
    trans, A, Q, C, R = truth(noise)
    gen = torch.Generator().manual_seed(seed)
    z = [int(torch.randint(2, (), generator=gen))]
    x = [torch.randn(2, generator=gen, dtype=D64)]
    for _ in range(1, T):
        z.append(int(torch.multinomial(trans[z[-1]], 1, generator=gen)))
        x.append(A[z[-1]] @ x[-1] + torch.linalg.cholesky(Q[z[-1]]) @ torch.randn(2, generator=gen, dtype=D64))
    x = torch.stack(x)
    y = x @ C[:, :2].T + C[:, 2] + torch.randn(T, 2, generator=gen, dtype=D64) @ torch.linalg.cholesky(R).T
    return y, torch.tensor(z)


def structure(y, priors):
    args = (y, 2, 2, *priors)
    graph, trace = trace_graph(conjugate_slds, args, {})
    facts = analyze(graph, conjugate_slds, args, {}, trace)
    return S.analyse_slds(conjugate_slds, args, {}, facts, graph)


def exact(y, noise):
    """(log p(y | truth), p(z_t | y, truth) (T, K)) by enumerating z-paths, each a dense Gaussian marginal."""
    trans, A, Q, C, R = truth(noise)
    T, P = y.shape
    D = 2
    paths = torch.tensor(list(itertools.product(range(2), repeat=T)))
    scores = []
    for z in paths:
        steps = z[1:]
        log_pz = math.log(0.5) + sum(math.log(float(trans[a, b])) for a, b in zip(z[:-1], z[1:]))
        log_py = dense_gaussian.log_marginal(torch.zeros(D, dtype=D64), torch.eye(D, dtype=D64), A[steps], Q[steps],
                                             torch.zeros(T - 1, D, dtype=D64), C[:, :D].expand(T, P, D),
                                             C[:, D].expand(T, P), R.expand(T, P, P), y, torch.ones(T, dtype=bool))
        scores.append(log_pz + float(log_py))
    scores = torch.tensor(scores, dtype=D64)
    probs = (scores - scores.logsumexp(0)).exp()
    marginals = torch.einsum("p,ptk->tk", probs, torch.nn.functional.one_hot(paths, 2).to(D64))
    return float(scores.logsumexp(0)), marginals


def some_state(s, seed=0):
    """A non-trivial q(globals) and q(z): the start from a random hard path, then one z-step."""
    gen = torch.Generator().manual_seed(seed)
    hard = G.hard_start(s, torch.randn(s.y.shape[0], 2, generator=gen, dtype=D64))
    q_dyn, q_trans, q_em, _ = S.start(s, hard, seed)
    regimes = S.z_step(s, q_dyn, q_trans, hard)
    return q_dyn, q_trans, q_em, regimes


def test_x_step_is_the_gaussian_of_the_expected_log_joint():
    T, D = 5, 2
    y, _ = simulate(T, 1)
    s = structure(y, weak())
    q_dyn, q_trans, q_em, regimes = some_state(s)
    local = S.x_step(s, q_dyn, q_em, regimes.r)

    def f(v):
        point = G.hard_start(s, v.reshape(T, D))
        return S._expected_log_x(s, q_dyn.expected, point, regimes.r) + \
            G.expected_regression_log_lik(q_em.expected, G.emission_stats(s, point))

    zero = torch.zeros(T * D, dtype=D64)
    cov = torch.linalg.inv(-torch.autograd.functional.hessian(f, zero))
    mean = cov @ torch.autograd.functional.jacobian(f, zero)
    torch.testing.assert_close(local.mean, mean.reshape(T, D), rtol=1e-8, atol=1e-9)
    blocks = lambda c, o: torch.stack([c[(t + o) * D:(t + o + 1) * D, t * D:(t + 1) * D] for t in range(T - o)])  # noqa
    torch.testing.assert_close(local.cov, blocks(cov, 0), rtol=1e-8, atol=1e-9)
    torch.testing.assert_close(local.cross, blocks(cov, 1), rtol=1e-8, atol=1e-9)
    assert float(local.entropy) == pytest.approx(0.5 * float(torch.logdet(2 * math.pi * math.e * cov)), rel=1e-9)


def test_z_step_equals_brute_force_enumeration():
    T = 6
    y, _ = simulate(T, 2)
    s = structure(y, weak())
    q_dyn, q_trans, q_em, regimes = some_state(s, 1)
    local = S.x_step(s, q_dyn, q_em, regimes.r)
    got = S.z_step(s, q_dyn, q_trans, local)
    L = S.transition_table(q_dyn.expected, local)
    log_lik = torch.cat([torch.zeros(1, 2, dtype=D64), L])
    ref = brute_force(s.log_init, S.log_trans(s, q_trans), log_lik)
    torch.testing.assert_close(got.r, ref.marginals, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(got.pairwise, ref.pairwise, rtol=1e-9, atol=1e-12)
    entropy = -(ref.path_probs * ref.path_probs.clamp_min(1e-300).log()).sum()
    assert float(got.entropy) == pytest.approx(float(entropy), rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("noise", ["separated", "ambiguous"])
@pytest.mark.parametrize("seed", [3, 4])
def test_tiny_problem_against_enumeration_over_paths(seed, noise):
    """T = 5, K = 2, globals concentrated at the truth (strength 1e6): the fitted ELBO is at most the exact log
    evidence (+ O(1 / strength)); on the well-separated problem (rotations by +-0.9 rad, noise sds ~0.05) it is
    within 1e-2 of it and q(z_t) is within 1e-3 of the exact p(z_t | y) (measured: 1e-6). On the ambiguous one
    (noise sds ~0.1) structured mean field is over-confident on a few steps (measured: q(z_t) off by up to 0.15):
    only the bound and a gap below 1 nat are asserted."""
    y, _ = simulate(5, seed, NOISE[noise])
    log_evidence, marginals = exact(y, NOISE[noise])
    s = structure(y, concentrated(1e6, NOISE[noise]))
    with warnings.catch_warnings():
        warnings.simplefilter("error", ELBODecreased)
        fit = S.coordinate_ascent(s, S.start(s, G.projection_starts(s, 1, 0)[0], 0), 60, 1e-12)
    assert fit.elbo <= log_evidence + 1e-3
    if noise == "separated":
        assert fit.elbo >= log_evidence - 1e-2
        assert (fit.regimes.r - marginals).abs().max() < 1e-3, (fit.regimes.r, marginals)
    else:
        assert fit.elbo >= log_evidence - 1.0


def test_routing_explain_monotone_fit_and_segmentation():
    y, z = simulate(80, 6)
    args = (y, 2, 2, *weak())
    plan = ppl.compile(conjugate_slds, *args)
    assert plan.backend == "vi", plan.explain()
    text = plan.explain()
    for line in ("q(dynamics) = MNIW over (A_k, Q_k) per regime", "q(trans) = Dirichlet: closed form from expected "
                 "transition counts of s_z", "q(emission) = MNIW over (C, R)", "structured mean field q(z) q(x)"):
        assert line in text
    with warnings.catch_warnings():
        warnings.simplefilter("error", ELBODecreased)
        warnings.simplefilter("ignore", ppl.inference.training.NotConverged)
        post = ppl.infer(conjugate_slds, *args, progress=False, num_steps=25, restarts=1)
    elbo = [-v for v in post.history]
    assert all(b >= a - 1e-9 * abs(a) for a, b in zip(elbo, elbo[1:]))
    assert sum(v[-1] for v in post.elbo_terms.values()) == pytest.approx(elbo[-1], rel=1e-12)
    path = post.viterbi("s_z")
    accuracy = max(float((path == z).double().mean()), float((path == 1 - z).double().mean()))
    assert accuracy >= 0.95          # measured 0.975 (0.9875 after 100 sweeps; short dwells of 3-5 steps)
    assert post.discrete["s_z"].shape == (80, 2)
    assert post.draws["trans"].shape == (1, 1000, 2, 2) and post.draws["dynamics"].shape == (1, 1000, 2, 2, 4)


def test_non_conjugate_switching_lds_is_refused_naming_the_site():
    y, _ = simulate(6, 6)

    @ppl.model
    def normal_dynamics(y):
        trans = ppl.sample("trans", dist.Dirichlet(torch.ones(2, 2, dtype=D64)).to_event(1))
        A = ppl.sample("dynamics", dist.Normal(torch.zeros(2, 2, 2, dtype=D64), 0.5).to_event(3))
        _, x = ppl.switching_chain("s", 2, 2, trans, A, 0.1 * torch.eye(2, dtype=D64), length=y.shape[0])
        C, R = MNIW.unpack(ppl.sample("emission", MNIW(*weak()[2])), 3)
        ppl.sample("y", dist.MultivariateNormal(x @ C[:, :2].T + C[:, 2], R).to_event(1), obs=y)

    assert ppl.compile(normal_dynamics, y).backend != "vi"
    with pytest.raises(UnsupportedModelError, match="s_x"):
        ppl.compile(normal_dynamics, y, backend="vi")


def test_library_conjugate_slds_routes_to_vi_and_segments():
    """``ppl.models.slds.slds_conjugate`` on ``slds.simulate`` data (T = 100): routed to vi; 40 sweeps from one
    start segment >= 95% of the steps and recover the A_k within the library's tolerance (canonical basis)."""
    from ppl.models import slds  # noqa: PLC0415 - the library model, imported where it is used
    sim = slds.simulate(0, T=100)
    plan = ppl.compile(slds.slds_conjugate, *sim.args, **sim.kwargs)
    assert plan.backend == "vi", plan.explain()
    with warnings.catch_warnings():
        warnings.simplefilter("error", ELBODecreased)
        warnings.simplefilter("ignore", ppl.inference.training.NotConverged)
        post = ppl.infer(slds.slds_conjugate, *sim.args, model_kwargs=sim.kwargs, progress=False, num_steps=40,
                         restarts=1)
    errors = slds.recovery_errors(post, sim)
    assert errors["segmentation"] <= 0.05, errors
    assert errors["dynamics"] < slds.TOLERANCES["dynamics"], errors


def library_structure(T, seed=0):
    from ppl.models import slds  # noqa: PLC0415 - the library model, imported where it is used
    sim = slds.simulate(seed, T=T)
    graph, trace = trace_graph(slds.slds_conjugate, sim.args, sim.kwargs)
    facts = analyze(graph, slds.slds_conjugate, sim.args, sim.kwargs, trace)
    return S.analyse_slds(slds.slds_conjugate, sim.args, sim.kwargs, facts, graph)


def test_a_sweep_does_not_revalidate_the_priors(monkeypatch):
    """The MNIW priors are validated once, when the model is analysed; the sweeps' conjugate updates (prior plus
    expected statistics) run without the positive-definiteness / symmetry checks."""
    s = library_structure(30)
    state = S.start(s, G.projection_starts(s, 1, 0)[0], 0)
    calls = []
    monkeypatch.setattr(ppl.expfam.mniw, "check_positive_definite", lambda *a: calls.append(a[0]))
    monkeypatch.setattr(ppl.expfam.mniw, "check_symmetric", lambda *a: calls.append(a[0]))
    with torch.no_grad():
        result = S.sweep(s, state[:3], state[3])
    assert calls == [] and math.isfinite(result.elbo)


def test_squarem_acceleration_is_monotone_and_beats_three_times_the_plain_sweeps():
    """``slds.simulate`` (T = 100): 100 sweeps with SQUAREM steps (``extrapolate``) reach a higher ELBO than 300
    plain sweeps (measured 64.128 vs 64.124; 100 plain sweeps: 63.898), with no recorded decrease."""
    s = library_structure(100)
    first = S.start(s, G.projection_starts(s, 1, 0)[0], 0)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("error", ELBODecreased)
        fast = S.coordinate_ascent(s, first, 100, 0.0)
        plain = S.coordinate_ascent(s, first, 300, 0.0, accelerate=False)
    assert all(b >= a for a, b in zip(fast.history, fast.history[1:]))
    assert len(fast.history) <= 100 and len(plain.history) == 300
    assert fast.elbo > plain.elbo


def test_restarts_are_screened_and_the_best_start_continued():
    """``fit`` with 3 starts: each runs SCREEN_SWEEPS sweeps, the best by ELBO continues (its screening sweeps
    head the history), the total stays within num_steps for it, and the ELBO never decreases."""
    s = library_structure(60)
    hard = G.projection_starts(s, 1, 0)[0]
    with torch.no_grad():
        screened = [S.coordinate_ascent(s, S.start(s, hard, i), S.SCREEN_SWEEPS, 1e-6) for i in range(3)]
        best = max(screened, key=lambda f: f.elbo)
        with warnings.catch_warnings():
            warnings.simplefilter("error", ELBODecreased)
            warnings.simplefilter("ignore", ppl.inference.training.NotConverged)
            result, interrupted = S.fit(s, 80, 1e-6, 3, 0)
    assert not interrupted
    assert result.history[:S.SCREEN_SWEEPS] == best.history
    assert S.SCREEN_SWEEPS < len(result.history) <= 80
    assert all(b >= a - 1e-9 * abs(a) for a, b in zip(result.history, result.history[1:]))
    assert all(len(v) == len(result.history) for v in result.terms.values())
