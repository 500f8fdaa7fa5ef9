r"""One code path for conjugate updates (issue 12, item 4): the SVAE's conjugate globals are the vi backend's
families (``inference/vi/families.py``) with recognition potentials in place of conjugate likelihood potentials
(Johnson et al. 2016).

Oracle: the vi backend's coordinate-ascent sweep (``cavi.child_tables``, ``local_step``, ``global_step``, then
``family.blend``) on the conjugate GMM that observes the data directly, against one SVAE step on the GMM-SVAE
whose latent node x gets the tightest Gaussian potential a recognition network can emit around each data point
(variance ``recognition.MIN_VARIANCE`` = 1e-4). The SVAE's q(x_n) then sits on y_n up to that variance, so its
responsibilities and its statistics sum_n r_nk (E[x x^T], E[x], 1, 1) are the data's up to a relative 1e-4 / s^2
(s: the clusters' spread, here 100: 1e-8); the stated tolerances leave a factor 10-100 over that.

The same frame for a chain: the vi VB-LDS step of q(A, Q) (``gaussian_chain.local_step``: Kalman smoothing on the
expected dynamics and the expected emission potentials of q(C, R); then ``posterior`` of ``transition_stats``)
against one step of the LDS-SVAE whose recognition network emits exactly those emission potentials (possible for a
q(C, R) whose :math:`E[C^\top R^{-1}C]` is diagonal): equal to float64 round-off.
"""
import math
import pickle

import pyro
import pytest
import torch
from torch import nn

import ppl
from ppl import dist
from ppl.analysis import analyze
from ppl.expfam import mniw, niw
from ppl.graph import trace_graph
from ppl.inference.svae import backend as svae
from ppl.inference.svae import recognition
from ppl.inference.svae.conjugate import MNIWConjugate, transition_stats
from ppl.inference.svae.local import Local
from ppl.inference.vi import cavi, conjugacy
from ppl.inference.vi import gaussian_chain as chain_vi
from ppl.inference.vi.families import FAMILIES

F64 = torch.float64
K, D, SPREAD = 3, 2, 100.0


def _priors(y):
    """pi ~ Dir(2), (mu_k, Sigma_k) ~ NIW(0, 0.01, SPREAD^2 I, D + 3): the same in both models."""
    weights = ppl.sample("weights", dist.Dirichlet(y.new_full((K,), 2.0)))
    with ppl.plate("components", K):
        theta = ppl.sample("theta", ppl.NormalInverseWishart(y.new_zeros(D), 0.01,
                                                            SPREAD ** 2 * torch.eye(D, dtype=y.dtype), D + 3.0))
    return weights, ppl.NormalInverseWishart.unpack(theta)


@ppl.model
def observed_gmm(y):
    """The conjugate GMM of backend vi: y_n | z_n ~ N(mu_z, Sigma_z) observed."""
    weights, (loc, cov) = _priors(y)
    with ppl.plate("data", y.shape[0]):
        z = ppl.sample("z", dist.Categorical(weights))
        ppl.sample("y", dist.MultivariateNormal(loc[z], cov[z]), obs=y)


class IdentityDecoder(nn.Module):
    """x -> (x, learned scale): the likelihood the SVAE's recognition potential stands in for."""

    def __init__(self):
        super().__init__()
        self.log_scale = nn.Parameter(torch.zeros((), dtype=F64))

    def forward(self, x):
        return x, self.log_scale.exp().expand_as(x)


class PinningRecognition(nn.Module):
    """Potential of x_n centred on y_n with the smallest variance a network can give (MIN_VARIANCE)."""

    def forward(self, y):
        return torch.cat([y, torch.full_like(y, -60.0)], -1)


@ppl.model
def latent_gmm(y, decoder):
    """The GMM-SVAE: the same priors, x_n | z_n ~ N(mu_z, Sigma_z) latent, y_n from a network of x_n."""
    dec = ppl.module("decoder", decoder)
    weights, (loc, cov) = _priors(y)
    with ppl.plate("data", y.shape[0]):
        z = ppl.sample("z", dist.Categorical(weights))
        x = ppl.sample("x", dist.MultivariateNormal(loc[z], cov[z]))
        mean, scale = dec(x)
        ppl.sample("y", dist.Normal(mean, scale).to_event(1), obs=y)


def _data(n=15):
    g = torch.Generator().manual_seed(0)
    centres = SPREAD * torch.tensor([[0.0, 0.0], [6.0, 0.0], [0.0, 6.0]], dtype=F64)
    truth = torch.arange(K).repeat_interleave(n)
    return centres[truth] + SPREAD * torch.randn(K * n, D, generator=g, dtype=F64), truth


def _vi_structure(y):
    graph, trace = trace_graph(observed_gmm, (y,), {})
    facts = analyze(graph, observed_gmm, (y,), {}, trace)
    return conjugacy.analyse(observed_gmm, (y,), {}, facts, graph)


@pytest.mark.parametrize("rho", [1.0, 0.3])
def test_one_svae_step_with_pinning_potentials_is_one_vi_sweep_of_the_observed_gmm(rho):
    y, truth = _data()
    structure = _vi_structure(y)
    # a common start away from the fixed point: the vi update from labels with every third point moved on
    labels = torch.where(torch.arange(y.shape[0]) % 3 == 0, (truth + 1) % K, truth)
    priors = {g: G.prior for g, G in structure.globals.items()}
    q0 = cavi.global_step(structure, cavi.hard_local(structure, labels), priors)
    # backend vi: local step (responsibilities from E_q log pi + E_q log N(y | mu, Sigma)), closed-form update,
    # natural-gradient step of size rho
    tables = cavi.child_tables(structure, q0)
    state = cavi.local_step(structure, q0, tables)
    target = cavi.global_step(structure, state, q0)
    want = {g: FAMILIES[G.family].blend(q0[g], target[g], rho) for g, G in structure.globals.items()}
    # backend svae: one step of the objective with the recognition potentials, then the conjugate updates
    decoder = IdentityDecoder()
    plan = ppl.compile(latent_gmm, y, decoder=decoder, backend="svae")
    assert plan.treatment("weights") == plan.treatment("theta") == "natural gradient"
    with pyro.get_param_store().scope():
        step, _ = svae.build_step(latent_gmm, (y,), {"decoder": decoder}, plan,
                                  recognition={"x": PinningRecognition()}, natgrad_step=rho, warmup=0)
        for site, q in q0.items():
            assert step.conjugates[site].family is FAMILIES[structure.globals[site].family]
            step.conjugates[site].q = q
        with torch.no_grad():
            handler = step.run(torch.Generator().manual_seed(0))
        step.natural_gradient_step(handler)
    # measured: responsibilities within 7e-9, every field of q within a relative 1.7e-8 (the 1e-4 / SPREAD^2 of the
    # module docstring); tolerances 1e-6
    torch.testing.assert_close(handler.locals["x"].probs, state.r.T, rtol=0, atol=1e-6)
    for site, fields in want.items():
        got = step.conjugates[site].q
        assert len(got) == len(fields)
        for a, b in zip(got, fields):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    # the check is not vacuous: the local step relabels 13 of the 45 points (soft responsibilities, down to 0.52)
    # and the full step moves every NIW field by 7-14 % of its size
    assert int((state.r.argmax(0) != labels).sum()) >= 10
    for a, b in zip(target["theta"], q0["theta"]):
        assert float((a - b).abs().max() / b.abs().max()) > 0.05


def test_the_svae_mniw_update_is_the_vi_lds_global_step():
    """The SVAE's q(A, Q) update from a chain's q(x) with lag-one moments is the vi VB-LDS global step on the same
    q(x) (``gaussian_chain.posterior`` of ``transition_stats``), and its KL is the sweep's ``mniw_kl``."""
    g = torch.Generator().manual_seed(1)
    N, T = 3, 6
    mean = torch.randn(N, T, D, generator=g, dtype=F64)
    R = torch.randn(N, T * D, T * D, generator=g, dtype=F64)
    blocks = (R @ R.mT / (T * D) + 0.1 * torch.eye(T * D, dtype=F64)).reshape(N, T, D, T, D)
    cov = torch.stack([blocks[:, t, :, t] for t in range(T)], 1)
    cross = torch.stack([blocks[:, t + 1, :, t] for t in range(T - 1)], 1)
    eye = torch.eye(D, dtype=F64)
    prior = ppl.MatrixNormalInverseWishart(0.9 * eye, 2 * eye, 0.5 * eye, D + 3.0).natural()
    c = MNIWConjugate("dyn", "x", prior, eye, 0.1 * eye, 10, F64)
    assert c.family is FAMILIES["MatrixNormalInverseWishart"]
    c.update(transition_stats(Local(mean, torch.zeros(()), mean, None, (cov, cross))), 1.0)
    sweep = chain_vi.posterior(chain_vi.q_state(prior), chain_vi.transition_stats(
        chain_vi.ChainLocal(mean, cov, cross, torch.zeros((), dtype=F64))))
    for a, b in zip(c.natparam, sweep.natural):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(c.kl(), chain_vi.mniw_kl(sweep, chain_vi.q_state(prior)), rtol=1e-10, atol=1e-10)
    # the family's mode is the argmax of q's density: log q is lower at nearby values (mniw.log_prob)
    mode = FAMILIES["MatrixNormalInverseWishart"].mode(c.q)
    A, Q = ppl.MatrixNormalInverseWishart.unpack(mode)
    best = mniw.log_prob(c.natparam, mniw.MNIWSample(A, Q))
    for dA, dQ in ((0.01 * eye, 0 * eye), (0 * eye, 0.01 * eye), (0 * eye, -0.01 * eye)):
        assert float(mniw.log_prob(c.natparam, mniw.MNIWSample(A + dA, Q + dQ))) < float(best)


@pytest.mark.filterwarnings("ignore::ppl.inference.results.DegenerateFit")   # 2 steps on 12 points
def test_a_fitted_svae_with_conjugate_globals_pickles():
    """The conjugate globals hold their vi family (functions, some lambdas): a Posterior holding them pickles (the
    family by name) and encodes new data as before."""
    y, _ = _data(4)
    decoder = IdentityDecoder()
    post = ppl.infer(latent_gmm, y, model_kwargs={"decoder": decoder}, backend="svae", num_steps=2, num_samples=3,
                     recognition={"x": PinningRecognition()}, warmup=0, progress=False)
    again = pickle.loads(pickle.dumps(post))
    conjugate = again.encoder.state.conjugates["theta"]
    assert conjugate.family is FAMILIES["NormalInverseWishart"]
    for a, b in zip(conjugate.q, post.encoder.state.conjugates["theta"].q):
        assert torch.equal(a, b)
    torch.testing.assert_close(again.encode(y, decoder=decoder)["x"].probs, post.encode(y, decoder=decoder)["x"].probs,
                               rtol=0, atol=0)


# ------------------------------------------------------------------------------------------------------------
# the same frame for a chain: q(A, Q) of an LDS-SVAE whose recognition potentials are the VB-LDS's emission ones

EMISSION = dict(k=4.0, psi=2.0, nu=D + 4.0)   # q(C, R) = MNIW(I, k I, psi I, nu): E[C^T R^-1 C] = (nu/psi + D/k) I


def _dynamics_prior(y):
    eye = torch.eye(D, dtype=y.dtype)
    dyn = ppl.sample("dynamics", ppl.MatrixNormalInverseWishart(0.9 * eye, eye, 0.5 * eye, D + 3.0))
    return ppl.MatrixNormalInverseWishart.unpack(dyn)


@ppl.model
def observed_lds(y):
    """The conjugate LDS of backend vi: y_t | x_t ~ N(C x_t, R) observed, (C, R) ~ MNIW (EMISSION)."""
    A, Q = _dynamics_prior(y)
    eye = torch.eye(D, dtype=y.dtype)
    em = ppl.sample("emission", ppl.MatrixNormalInverseWishart(eye, EMISSION["k"] * eye, EMISSION["psi"] * eye,
                                                                EMISSION["nu"]))
    C, R = ppl.MatrixNormalInverseWishart.unpack(em, D)
    with ppl.plate("sequences", y.shape[0]):
        x = ppl.gaussian_chain("x", D, A, Q, length=y.shape[1])
        ppl.sample("y", dist.MultivariateNormal(x @ C.mT, R).to_event(1), obs=y)


@ppl.model
def latent_lds(y, decoder):
    """The LDS-SVAE with the same chain: y_t from a network of x_t."""
    dec = ppl.module("decoder", decoder)
    A, Q = _dynamics_prior(y)
    N, T, _ = y.shape
    x = ppl.gaussian_chain("x", D, A, Q, y.new_zeros(N, D), torch.eye(D, dtype=y.dtype), length=T)   # x_0 ~ N(0, I)
    mean, scale = dec(x)
    ppl.sample("y", dist.Normal(mean, scale).to_event(1), obs=y)


class EmissionRecognition(nn.Module):
    r"""The VB-LDS's expected emission potential of q(C, R) = EMISSION as a network's (mean, log variance):
    :math:`J = E[C^\top R^{-1}C] = (\nu/\psi + D/k) I`, :math:`h_t = E[R^{-1}C]^\top y_t = (\nu/\psi) y_t`, so mean
    :math:`J^{-1}h_t` and variance :math:`1/J` less the MIN_VARIANCE the potential adds."""

    def forward(self, y):
        nu_psi = EMISSION["nu"] / EMISSION["psi"]
        J = nu_psi + D / EMISSION["k"]
        return torch.cat([y * nu_psi / J, torch.full_like(y, math.log(1 / J - recognition.MIN_VARIANCE))], -1)


@pytest.mark.parametrize("rho", [1.0, 0.3])
def test_one_lds_svae_step_with_the_emission_potentials_is_one_vb_lds_step_of_q_dynamics(rho):
    g = torch.Generator().manual_seed(2)
    N, T = 3, 8
    y = torch.randn(N, T, D, generator=g, dtype=F64).cumsum(1) * 0.5
    graph, trace = trace_graph(observed_lds, (y,), {})
    s = chain_vi.analyse_chain(observed_lds, (y,), {}, analyze(graph, observed_lds, (y,), {}, trace), graph)
    # a common start: q(A, Q) from a random path; backend vi's local step (Kalman smoothing on the expected
    # dynamics and emission) and closed-form q(A, Q), then the natural-gradient step of size rho
    q_dyn = chain_vi.global_step(s, chain_vi.hard_start(s, torch.randn(N, T, D, generator=g, dtype=F64)))[0]
    local = chain_vi.local_step(s, q_dyn, s.prior_emission)
    target = chain_vi.posterior(s.prior_dynamics, chain_vi.transition_stats(local))
    want = FAMILIES["MatrixNormalInverseWishart"].blend(tuple(q_dyn.natural), tuple(target.natural), rho)
    decoder = IdentityDecoder()
    plan = ppl.compile(latent_lds, y, decoder=decoder, backend="svae")
    assert plan.treatment("dynamics") == "natural gradient"
    with pyro.get_param_store().scope():
        step, _ = svae.build_step(latent_lds, (y,), {"decoder": decoder}, plan,
                                  recognition={"x": EmissionRecognition()}, natgrad_step=rho, warmup=0)
        step.conjugates["dynamics"].q = tuple(q_dyn.natural)
        with torch.no_grad():
            handler = step.run(torch.Generator().manual_seed(0))
        step.natural_gradient_step(handler)
    # the same Gaussian chain solved twice: float64 round-off (measured 4e-16 in E[x], 5e-15 in q's fields, where
    # the step moves them by 6-10)
    torch.testing.assert_close(handler.locals["x"].mean, local.mean, rtol=1e-9, atol=1e-9)
    for a, b in zip(step.conjugates["dynamics"].q, want):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)
    assert float((target.natural.sum_yxT - q_dyn.natural.sum_yxT).abs().max()) > 0.1   # the step moves q


def test_a_checkpoint_of_natural_parameters_loads_into_the_family_params():
    """Checkpoints written before the q's were the vi families' held ``natparams`` (ppl.expfam natural parameters:
    a Dirichlet's alpha - 1, an NIW's NIWNatural): resuming one puts q where it was."""
    y, _ = _data(4)
    decoder = IdentityDecoder()
    plan = ppl.compile(latent_gmm, y, decoder=decoder, backend="svae")
    with pyro.get_param_store().scope():
        step, _ = svae.build_step(latent_gmm, (y,), {"decoder": decoder}, plan,
                                  recognition={"x": PinningRecognition()}, warmup=0)
        saved = {site: tuple(x.clone() for x in c.q) for site, c in step.conjugates.items()}
        old = {"natparams": {"weights": saved["weights"][0] - 1, "theta": niw.NIWNatural(*saved["theta"])},
               "terms": step.state()["terms"], "calls": 0}
        with torch.no_grad():
            step.natural_gradient_step(step.run(torch.Generator().manual_seed(0)))
        assert not torch.equal(step.conjugates["weights"].q[0], saved["weights"][0])
        step.load_state(old)
    for site, fields in saved.items():
        for a, b in zip(step.conjugates[site].q, fields):
            torch.testing.assert_close(a, b, rtol=1e-15, atol=1e-12)
