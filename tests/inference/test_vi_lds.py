"""VB-EM for a linear dynamical system with conjugate MNIW priors (backend "vi", inference/vi/gaussian_chain.py)
against oracles on the same input:

- the local step at any q(A, Q) q(C, R): q(x) is the Gaussian whose log-density is E_q log p(x, y | A, Q, C, R) up
  to a constant; its precision and linear term are read off that function's Hessian and gradient by autograd
  (the function evaluated by the ELBO's own closed-form terms at a point-mass q(x)), then solved densely;
- with the globals' q concentrated at true values, q(x) equals the exact posterior p(x | y, theta) (dense joint
  Gaussian, conditioned) and the fitted ELBO equals log p(y | theta) (dense Gaussian marginal likelihood) to
  O(1 / prior strength), never above it;
- the global step with observed states (a point-mass q(x)) equals the closed-form MNIW posterior of a
  matrix regression;
- the ELBO never decreases, its terms sum to it, routing/explain name the updates, bad models get clear errors.
"""
import contextlib
import warnings
import math

import pytest
import torch

import ppl
from ppl import dist
from ppl.inference.vi.cavi import ELBODecreased
from ppl.analysis import analyze
from ppl.backends import UnsupportedModelError
from ppl.expfam import mniw
from ppl.graph import trace_graph
from ppl.inference.vi import gaussian_chain as G
from ppl.models.lds import rotation

D64 = torch.float64
MNIW = ppl.MatrixNormalInverseWishart


@ppl.model
def conjugate_lds(y, D, dyn_prior, em_prior):
    """A = dynamics, C (with an offset column when em_prior's loc has D + 1 columns), MNIW priors on both."""
    dyn = ppl.sample("dynamics", MNIW(*dyn_prior))
    A, Q = MNIW.unpack(dyn)
    em = ppl.sample("emission", MNIW(*em_prior))
    C, R = MNIW.unpack(em, em_prior[0].shape[-1])
    plate = ppl.plate("sequences", y.shape[0]) if y.dim() == 3 else contextlib.nullcontext()
    with plate:
        x = ppl.gaussian_chain("x", D, A, Q, length=y.shape[-2])
        loc = x @ C[:, :D].T + (C[:, D] if C.shape[-1] == D + 1 else 0.0)
        ppl.sample("y", dist.MultivariateNormal(loc, R).to_event(1), obs=y)


def truth(P=3, offset=True):
    A = rotation(0.4, 0.9).double()
    Q = torch.tensor([[0.2, 0.05], [0.05, 0.15]], dtype=D64)
    C = torch.tensor([[1.0, 0.3], [-0.4, 0.8], [0.5, 0.5]], dtype=D64)[:P]
    if offset:
        C = torch.cat([C, torch.tensor([[0.5], [-1.0], [0.2]], dtype=D64)[:P]], 1)
    R = 0.1 * torch.eye(P, dtype=D64) + 0.02
    return A, Q, C, R


def simulate(T, P=3, offset=True, N=None, seed=0):
    A, Q, C, R = truth(P, offset)
    gen = torch.Generator().manual_seed(seed)
    n = 1 if N is None else N
    x = [torch.randn(n, 2, generator=gen, dtype=D64)]
    for _ in range(1, T):
        x.append(x[-1] @ A.T + torch.randn(n, 2, generator=gen, dtype=D64) @ torch.linalg.cholesky(Q).T)
    x = torch.stack(x, 1)
    y = x @ C[:, :2].T + (C[:, 2] if offset else 0.0)
    y = y + torch.randn(y.shape, generator=gen, dtype=D64) @ torch.linalg.cholesky(R).T
    return (y[0] if N is None else y), x


def weak(P=3, offset=True, D=2):
    m = D + 1 if offset else D
    return ((torch.zeros(D, D, dtype=D64), torch.eye(D, dtype=D64), 0.1 * torch.eye(D, dtype=D64), D + 2.0),
            (torch.zeros(P, m, dtype=D64), 0.1 * torch.eye(m, dtype=D64), 0.1 * torch.eye(P, dtype=D64), P + 2.0))


def concentrated(strength, P=3, offset=True):
    """MNIW priors with E[Q^-1] = Q^-1, E[Q^-1 A] = Q^-1 A at the truth and variance O(1 / strength)."""
    A, Q, C, R = truth(P, offset)
    eye = lambda n: torch.eye(n, dtype=D64)  # noqa: E731
    return ((A, strength * eye(2), strength * Q, strength), (C, strength * eye(C.shape[1]), strength * R, strength))


def structure(y, priors):
    args, kwargs = (y, 2, *priors), {}
    graph, trace = trace_graph(conjugate_lds, args, kwargs)
    facts = analyze(graph, conjugate_lds, args, kwargs, trace)
    return G.analyse_chain(conjugate_lds, args, kwargs, facts, graph)


def expected_log_joint(s, q_dyn, q_em, x):
    """E_q log p(x, y | globals) at the path ``x``: the ELBO's expectation terms at a point-mass q(x)."""
    point = G.hard_start(s, x)
    return G.expected_log_prior(s, q_dyn, point) + G.expected_regression_log_lik(q_em.expected,
                                                                                 G.emission_stats(s, point))


def dense_prior(A, Q, T):
    """Mean (T D,) and covariance (T D, T D) of x_{0:T-1} with x_0 ~ N(0, I), x_t = A x_{t-1} + N(0, Q)."""
    D = A.shape[0]
    F = torch.zeros(T * D, T * D, dtype=D64)   # x = F w, w_0 ~ N(0, I), w_t ~ N(0, Q)
    for t in range(T):
        for u in range(t + 1):
            F[t * D:(t + 1) * D, u * D:(u + 1) * D] = torch.linalg.matrix_power(A, t - u)
    W = torch.block_diag(torch.eye(D, dtype=D64), *([Q] * (T - 1)))
    return torch.zeros(T * D, dtype=D64), F @ W @ F.T


def dense_joint(y, A, Q, C, R):
    """(posterior mean (T, D), posterior cov (T D, T D), log p(y)) of the LDS at fixed parameters, densely."""
    T, P = y.shape
    D = A.shape[0]
    mx, Sx = dense_prior(A, Q, T)
    H = torch.block_diag(*([C[:, :D]] * T))
    d = (C[:, D] if C.shape[1] == D + 1 else torch.zeros(P, dtype=D64)).repeat(T)
    Syy = H @ Sx @ H.T + torch.block_diag(*([R] * T))
    my = H @ mx + d
    gain = Sx @ H.T @ torch.linalg.inv(Syy)
    mean = mx + gain @ (y.reshape(-1) - my)
    cov = Sx - gain @ H @ Sx
    logp = torch.distributions.MultivariateNormal(my, Syy).log_prob(y.reshape(-1))
    return mean.reshape(T, D), cov, float(logp)


def blocks(cov, T, D, offset=0):
    return torch.stack([cov[(t + offset) * D:(t + offset + 1) * D, t * D:(t + 1) * D] for t in range(T - offset)])


# --------------------------------------------------------------------------------------------------------------
# the local step


@pytest.mark.parametrize("offset", [True, False])
def test_local_step_is_the_gaussian_of_the_expected_log_joint(offset):
    """At an arbitrary q(A, Q) q(C, R) (a weak prior updated with a random path), q(x) has the precision and
    linear term of x -> E_q log p(x, y | globals) (autograd Hessian / gradient of the ELBO's own terms), its
    entropy is the Gaussian's, and the ELBO terms at the local optimum sum to log int exp(E_q log p(x, y)) dx - KLs."""
    T, D = 6, 2
    y, _ = simulate(T, offset=offset, seed=1)
    s = structure(y, weak(offset=offset))
    gen = torch.Generator().manual_seed(3)
    q_dyn, q_em = G.global_step(s, G.hard_start(s, torch.randn(T, D, generator=gen, dtype=D64)))
    local = G.local_step(s, q_dyn, q_em)

    f = lambda v: expected_log_joint(s, q_dyn, q_em, v.reshape(T, D))  # noqa: E731
    zero = torch.zeros(T * D, dtype=D64)
    prec = -torch.autograd.functional.hessian(f, zero)
    lin = torch.autograd.functional.jacobian(f, zero)
    cov = torch.linalg.inv(prec)
    mean = cov @ lin
    torch.testing.assert_close(local.mean, mean.reshape(T, D), rtol=1e-8, atol=1e-9)
    torch.testing.assert_close(local.cov, blocks(cov, T, D), rtol=1e-8, atol=1e-9)
    torch.testing.assert_close(local.cross, blocks(cov, T, D, 1), rtol=1e-8, atol=1e-9)
    entropy = 0.5 * torch.logdet(2 * math.pi * math.e * cov)
    assert float(local.entropy) == pytest.approx(float(entropy), rel=1e-9, abs=1e-9)

    log_integral = float(f(mean)) + 0.5 * float(torch.logdet(2 * math.pi * cov))
    terms = G.elbo_terms(s, q_dyn, q_em, local)
    kls = float(terms["-KL(dynamics)"] + terms["-KL(emission)"])
    assert sum(float(v) for v in terms.values()) == pytest.approx(log_integral + kls, rel=1e-10, abs=1e-8)


def test_concentrated_globals_give_the_exact_smoother_and_the_log_likelihood():
    """q(A, Q), q(C, R) concentrated at the truth (prior strength 1e8): q(x) is the exact posterior given the true
    parameters (dense Gaussian conditioning) and the ELBO after the fit is log p(y | truth), from below."""
    T = 7
    y, _ = simulate(T, seed=2)
    A, Q, C, R = truth()
    mean, cov, logp = dense_joint(y, A, Q, C, R)
    s = structure(y, concentrated(1e8))
    local = G.local_step(s, s.prior_dynamics, s.prior_emission)
    torch.testing.assert_close(local.mean, mean, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(local.cov, blocks(cov, T, 2), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(local.cross, blocks(cov, T, 2, 1), rtol=1e-6, atol=1e-6)

    s = structure(y, concentrated(1e6))
    with warnings.catch_warnings():
        warnings.simplefilter("error", ELBODecreased)
        fit = G.coordinate_ascent(s, G.projection_starts(s, 1, 0)[0], 50, 1e-12)
    assert fit.elbo <= logp + 1e-3          # ELBO <= log p(y) = log p(y | truth) + O(1 / strength)
    assert fit.elbo == pytest.approx(logp, abs=1e-2)


def test_batch_of_sequences_equals_each_sequence_alone():
    """N sequences in a plate: the local step on the batch equals the local step on each sequence alone (same q),
    and the global step adds the sequences' statistics."""
    y, _ = simulate(5, N=3, seed=4)
    s = structure(y, weak())
    gen = torch.Generator().manual_seed(0)
    q_dyn, q_em = G.global_step(s, G.hard_start(s, torch.randn(3, 5, 2, generator=gen, dtype=D64)))
    local = G.local_step(s, q_dyn, q_em)
    entropy = 0.0
    for n in range(3):
        one = G.local_step(structure(y[n], weak()), q_dyn, q_em)
        torch.testing.assert_close(local.mean[n], one.mean)
        torch.testing.assert_close(local.cross[n], one.cross)
        entropy += float(one.entropy)
    assert float(local.entropy) == pytest.approx(entropy, rel=1e-10)
    stats = G.emission_stats(s, local)
    alone = [G.emission_stats(structure(y[n], weak()), G.ChainLocal(local.mean[n], local.cov[n], local.cross[n],
                                                                    local.entropy)) for n in range(3)]
    for field, value in zip(stats, zip(*alone)):
        torch.testing.assert_close(field, sum(value))


# --------------------------------------------------------------------------------------------------------------
# the global step


def mniw_posterior(prior, inputs, outputs):
    """Closed-form MNIW posterior of the regression outputs = W inputs + noise (standard parameters)."""
    M0, K0, Psi0, nu0 = prior
    K = K0 + inputs.T @ inputs
    M = (M0 @ K0 + outputs.T @ inputs) @ torch.linalg.inv(K)
    Psi = Psi0 + outputs.T @ outputs + M0 @ K0 @ M0.T - M @ K @ M.T
    return M, K, Psi, nu0 + inputs.shape[0]


def test_global_step_with_observed_states_is_the_closed_form_posterior():
    T = 9
    y, x = simulate(T, seed=5)
    priors = weak()
    s = structure(y, priors)
    q_dyn, q_em = G.global_step(s, G.hard_start(s, x[0]))
    u = torch.cat([x[0], torch.ones(T, 1, dtype=D64)], 1)
    for q, prior, inputs, outputs in ((q_dyn, priors[0], x[0, :-1], x[0, 1:]), (q_em, priors[1], u, y)):
        got = mniw.standard_from_natural(q.natural)
        for a, b in zip(got, mniw_posterior(prior, inputs, outputs)):
            torch.testing.assert_close(a, torch.as_tensor(b, dtype=D64), rtol=1e-9, atol=1e-9)


# --------------------------------------------------------------------------------------------------------------
# the backend


def test_routing_explain_and_a_monotone_fit():
    y, _ = simulate(60, seed=6)
    args = (y, 2, *weak())
    plan = ppl.compile(conjugate_lds, *args)
    assert plan.backend == "vi", plan.explain()
    text = plan.explain()
    assert "q(dynamics) = MNIW over (A, Q): closed form from expected state statistics of x" in text
    assert "q(emission) = MNIW over (C, R): closed form from expected regression statistics of y" in text
    assert "Kalman smoothing" in text
    with warnings.catch_warnings():
        warnings.simplefilter("error", ELBODecreased)
        with pytest.warns(ppl.inference.training.NotConverged):
            post = ppl.infer(conjugate_lds, *args, progress=False, num_steps=40, restarts=2)
    elbo = [-v for v in post.history]
    assert all(b >= a - 1e-9 * abs(a) for a, b in zip(elbo, elbo[1:]))
    assert elbo[-1] > elbo[0] + 1.0
    total = sum(v[-1] for v in post.elbo_terms.values())
    assert total == pytest.approx(elbo[-1], rel=1e-12)
    assert post.log_evidence.value == pytest.approx(elbo[-1])
    assert post.smoothed_means["x"].shape == (60, 2)
    assert post.draws["dynamics"].shape == (1, 1000, 2, 4)
    # the eigenvalues of E[A] (invariant to the latent basis) near the truth's
    est = torch.linalg.eigvals(post.point["dynamics"][:, :2])
    true = torch.linalg.eigvals(truth()[0])
    assert torch.allclose(est.abs().sort().values, true.abs().sort().values, atol=0.1)
    assert torch.allclose(est.imag.abs().sort().values, true.imag.abs().sort().values, atol=0.1)


def test_non_conjugate_lds_models_get_a_reason_naming_the_site():
    y, _ = simulate(10, seed=7)

    @ppl.model
    def normal_dynamics(y):
        A = ppl.sample("dynamics", dist.Normal(torch.zeros(2, 2, dtype=D64), 0.5).to_event(2))
        x = ppl.gaussian_chain("x", 2, A, 0.1 * torch.eye(2, dtype=D64), length=y.shape[0])
        em = ppl.sample("emission", MNIW(*weak()[1]))
        C, R = MNIW.unpack(em, 3)
        ppl.sample("y", dist.MultivariateNormal(x @ C[:, :2].T + C[:, 2], R).to_event(1), obs=y)

    @ppl.model
    def diagonal_likelihood(y):
        A, Q = MNIW.unpack(ppl.sample("dynamics", MNIW(*weak()[0])))
        x = ppl.gaussian_chain("x", 2, A, Q, length=y.shape[0])
        C, R = MNIW.unpack(ppl.sample("emission", MNIW(*weak()[1])), 3)
        ppl.sample("y", dist.Normal(x @ C[:, :2].T + C[:, 2], R.diagonal().sqrt()).to_event(2), obs=y)

    for model, site in ((normal_dynamics, "dynamics"), (diagonal_likelihood, "y")):
        assert ppl.compile(model, y).backend != "vi"
        with pytest.raises(UnsupportedModelError, match=f"site '{site}'"):
            ppl.compile(model, y, backend="vi")


def test_library_conjugate_lds_routes_to_vi_and_recovers_the_system():
    """``ppl.models.lds.lds_conjugate`` on ``lds.simulate`` data (no inputs): routed to vi; after 60 sweeps from
    one start the system in the canonical basis is within the library's LDS tolerances."""
    from ppl.models import lds  # noqa: PLC0415 - the library model, imported where it is used
    sim = lds.simulate(0, U=None, T=100)
    assert ppl.compile(lds.lds_conjugate, *sim.args, **sim.kwargs).backend == "vi"
    with warnings.catch_warnings():
        warnings.simplefilter("error", ELBODecreased)
        warnings.simplefilter("ignore", ppl.inference.training.NotConverged)
        post = ppl.infer(lds.lds_conjugate, *sim.args, model_kwargs=sim.kwargs, progress=False, num_steps=60,
                         restarts=1)
    errors = lds.conjugate_recovery_errors(post, sim)
    assert set(errors) == {"dynamics", "emission_free", "obs_offset", "eigenvalues"}
    for name, value in errors.items():
        assert value < lds.TOLERANCES[name], (name, value)


def test_checkpoint_options_are_refused_for_a_chain_model(tmp_path):
    y, _ = simulate(8, seed=8)
    with pytest.raises(ValueError, match="checkpoint=/resume= are not implemented for a gaussian_chain model"):
        ppl.infer(conjugate_lds, y, 2, *weak(), backend="vi", progress=False, checkpoint=str(tmp_path / "c.pt"))
