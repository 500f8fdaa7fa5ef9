"""A clear error for every bad input (issue 16): one table of (description, call, error type, words the
message must contain). Each call fails before any fitting (tiny data), so the whole table runs in seconds.

Words are matched case-sensitively as plain substrings. A row's message must name what is wrong: the site
or argument, and the expected and the actual value where there is one.
"""
from __future__ import annotations

import pytest
import torch

import ppl
from ppl import dist
from ppl.backends import UnknownBackendError, UnsupportedModelError
from ppl.inference.exact import hmm as hmm_kernel
from ppl.inference.exact import kalman
from ppl.models import svae_gmm, svae_lds, svae_slds, vae
from tests.ppl.models_for_tests import Decoder, gmm, hmm, lds, lds_nonlinear, neural_lds, normal_normal

Y = torch.linspace(-2.0, 2.0, 10)


def infer(model, *args, **kwargs):
    return lambda: ppl.infer(model, *args, progress=False, **kwargs)


def compile_(model, *args, **kwargs):
    return lambda: ppl.compile(model, *args, **kwargs)


# ----------------------------------------------------------------------------- small models of bad inputs
def mvn(y, cov):
    mu = ppl.sample("mu", dist.Normal(torch.zeros(2), 1.0).to_event(1))
    with ppl.plate("data", y.shape[0]):
        ppl.sample("y", dist.MultivariateNormal(mu, cov), obs=y)


def normal_scale(y, prior_scale=1.0, noise=1.0):
    mu = ppl.sample("mu", dist.Normal(0.0, prior_scale))
    with ppl.plate("data", y.shape[0]):
        ppl.sample("y", dist.Normal(mu, noise), obs=y)


@ppl.model
def normal_two(y):
    mu = ppl.sample("mu", dist.Normal(0.0, 2.0))
    s = ppl.sample("s", dist.LogNormal(0.0, 1.0))
    with ppl.plate("data", y.shape[0]):
        ppl.sample("y", dist.Normal(mu, s), obs=y)


def chain(noise_cov=None, initial_cov=None, dynamics=None):
    def lds(y):
        A = torch.eye(2) * 0.9 if dynamics is None else dynamics
        Q = torch.eye(2) if noise_cov is None else noise_cov
        x = ppl.gaussian_chain("x", 2, A, Q, initial_cov=initial_cov, length=y.shape[-2])
        ppl.sample("y", dist.Normal(x, 1.0).to_event(2), obs=y)
    return lds


def float64_decoder(y):
    """A float64 network on a float32 chain: torch cannot promote inside the matmul."""
    decoder = ppl.module("decoder", Decoder(2, y.shape[-1]).double())
    x = ppl.gaussian_chain("x", 2, 0.9 * torch.eye(2), 0.1 * torch.eye(2), length=y.shape[-2])
    ppl.sample("y", dist.Normal(decoder(x), 0.5).to_event(2), obs=y)


def wrong_shape_after_sample(y):
    mu = ppl.sample("mu", dist.Normal(0.0, 1.0))
    ppl.sample("y", dist.Normal(mu, 1.0).expand([3]), obs=y)  # data has 10 entries: plate lookup, then error


def broken_after_sample(y):
    mu = ppl.sample("mu", dist.Normal(0.0, 1.0))
    with ppl.plate("data", y.shape[0]):
        return mu.no_such_attribute


def masked(y, mask):
    mu = ppl.sample("mu", dist.Normal(0.0, 1.0))
    with ppl.plate("data", y.shape[0]):
        ppl.sample("y", dist.Normal(mu, 1.0), obs=y, mask=mask)


def masked_mvn(y, mask):
    with ppl.plate("data", y.shape[0]):
        ppl.sample("y", dist.MultivariateNormal(torch.zeros(3), torch.eye(3)), obs=y, mask=mask)


def list_data(y):
    ppl.sample("y", dist.Normal(0.0, 1.0), obs=y)


def poisson_data(y):
    rate = ppl.sample("rate", dist.LogNormal(0.0, 1.0))
    with ppl.plate("data", y.shape[0]):
        ppl.sample("y", dist.Poisson(rate), obs=y)


def categorical_data(y):
    with ppl.plate("data", y.shape[0]):
        ppl.sample("y", dist.Categorical(torch.ones(3) / 3), obs=y)


def poisson_latent(y):
    n = ppl.sample("n", dist.Poisson(3.0))
    ppl.sample("y", dist.Normal(n, 1.0), obs=y)


def markov(K, trans, length=3):
    return lambda y: ppl.markov_chain("z", K, trans, length=length)


def niw_prior(df):
    return lambda y: ppl.sample("theta", ppl.NormalInverseWishart(torch.zeros(2), 1.0, torch.eye(2), df))


def lds_sim():
    return svae_lds.simulate(seed=0, N=2, T=4, num_test=1)


CUDA_MISSING = not torch.cuda.is_available()


def _shift(x):
    b = ppl.sample("b", dist.Normal(0.0, 10.0))
    with ppl.plate("data", x.shape[0]):
        z = ppl.sample("z", dist.Normal(0.0, 1.0))
        ppl.sample("x", dist.Normal(z + b, 1.0), obs=x)


def _normal_posterior():
    def model(y):
        mu = ppl.sample("mu", dist.Normal(0.0, 1.0))
        with ppl.plate("data", y.shape[0]):
            ppl.sample("y", dist.Normal(mu, 1.0), obs=y)
    return ppl.infer(model, torch.randn(5), backend="svi", num_steps=3, num_samples=4, progress=False)

# (description, call, error type, words the message must contain)
ROWS = [
    # --- options of ppl.infer: refused before anything is traced or fitted
    ("num_steps not an integer", infer(hmm, Y, num_steps=2.5), ValueError, ["num_steps", "integer >= 1", "2.5"]),
    ("num_steps zero", infer(hmm, Y, num_steps=0), ValueError, ["num_steps", "got 0"]),
    ("num_steps a bool", infer(hmm, Y, num_steps=True), ValueError, ["num_steps", "True"]),
    ("num_samples zero (svi: used to fail after the fit)", infer(gmm, torch.randn(6, 2), backend="svi",
                                                                 num_samples=0), ValueError, ["num_samples", "got 0"]),
    ("num_samples negative (exact: used to be accepted)", infer(hmm, Y, num_samples=-1), ValueError,
     ["num_samples", "-1"]),
    ("num_samples a float", infer(hmm, Y, num_samples=10.0), ValueError, ["num_samples", "10.0"]),
    ("seed not an integer", infer(hmm, Y, seed=1.5), ValueError, ["seed", "1.5"]),
    ("device meta", infer(hmm, Y, device="meta"), ValueError, ["device='meta'", "no values", "'cpu'"]),
    ("device unknown", infer(hmm, Y, device="gpu0"), ValueError, ["device='gpu0'", "not a torch device"]),
    ("model_kwargs not a dict", infer(hmm, Y, model_kwargs=[3]), TypeError, ["model_kwargs", "dict", "list"]),
    ("unknown backend", infer(hmm, Y, backend="nope"), UnknownBackendError, ["'nope'", "exact", "svi"]),
    ("option the backend does not take", infer(hmm, Y, backend="exact", lr2=0.1), TypeError, ["'exact'", "lr2", "num_steps"]),
    ("restarts zero", infer(hmm, Y, backend="exact", restarts=0), ValueError, ["restarts", "integer >= 1", "0"]),
    ("optimizer unknown", infer(hmm, Y, backend="exact", optimizer="sgd"), ValueError, ["optimizer", "'sgd'", "lbfgs"]),
    ("backend that cannot run the model", infer(normal_normal, Y, backend="exact"), UnsupportedModelError,
     ["'exact'", "normal_normal", "only continuous latents"]),
    ("init names an unknown site", infer(hmm, Y, num_steps=1, init={"nope": torch.zeros(3)}), ValueError,
     ["init", "'nope'", "'loc'"]),
    ("recognition names an unknown site", infer(neural_lds, torch.randn(6, 3), num_steps=1,
                                                recognition={"q": torch.nn.Linear(3, 4)}),
     ValueError, ["recognition=", "'q'", "'x'"]),
    ("model not callable", infer(3, Y), TypeError, ["ppl.infer", "model", "callable", "int"]),
    ("lr negative (Adam's own error, after tracing)", infer(hmm, Y, backend="exact", lr=-1.0, optimizer="adam"), ValueError,
     ["lr", "> 0", "-1.0"]),
    ("lr a string (internal TypeError)", infer(hmm, Y, backend="exact", lr="0.1"), ValueError, ["lr", "> 0", "'0.1'"]),
    ("natgrad_step above 1 (silently accepted)", infer(neural_lds, torch.randn(6, 3), natgrad_step=2.0),
     ValueError, ["natgrad_step", "(0, 1]", "2.0"]),
    ("natgrad_step zero (q never moves)", infer(neural_lds, torch.randn(6, 3), natgrad_step=0.0), ValueError,
     ["natgrad_step", "(0, 1]", "0.0"]),
    ("num_iters zero (silently run as 1)", infer(neural_lds, torch.randn(6, 3), num_iters=0), ValueError,
     ["num_iters", "integer >= 1", "0"]),
    ("recognition network not a module (AttributeError)", infer(neural_lds, torch.randn(6, 3), recognition={"x": 3}),
     TypeError, ["recognition['x']", "torch.nn.Module", "int"]),
    ("recognition not a dict", infer(neural_lds, torch.randn(6, 3), recognition=torch.nn.Linear(3, 4)), TypeError,
     ["recognition=", "dict", "Linear"]),
    ("init not a dict (named the list's items as sites)", infer(hmm, Y, init=[1]), TypeError, ["init=", "dict", "list"]),
    ("init of the wrong shape (internal RuntimeError)", infer(hmm, Y, init={"loc": torch.zeros(5)}), ValueError,
     ["init['loc']", "(5,)", "site 'loc'", "(3,)"]),
    ("init not a tensor", infer(hmm, Y, init={"loc": [0.0, 1.0, 2.0]}), TypeError, ["init['loc']", "torch.Tensor", "list"]),
    ("init outside the support (blamed site 'z')", infer(hmm, Y, init={"trans": -torch.ones(3, 3)}), ValueError,
     ["init['trans']", "outside the support", "site 'trans'", "Dirichlet"]),
    # --- dtypes
    ("float64 data through a float32 network", infer(neural_lds, torch.randn(6, 3, dtype=torch.float64),
                                                     num_steps=1),
     ppl.ModelInputError, ["site 'y'", "torch.float64", "ppl.module 'decoder'", "torch.float32"]),
    ("float64 network on float32 values inside the model", compile_(float64_decoder, torch.randn(6, 3)),
     ppl.ModelInputError, ["mixed floating-point dtypes", "site 'x' is torch.float32",
                           "ppl.module 'decoder' is torch.float64"]),
    ("integer data for a continuous site", infer(hmm, torch.arange(10), num_steps=1), ppl.ModelInputError,
     ["site 'y'", "floating-point", "Normal", "torch.int64", ".float()"]),
    ("integer data for a multivariate site", infer(gmm, torch.ones(6, 2, dtype=torch.long), num_steps=1),
     ppl.ModelInputError, ["site 'x'", "MultivariateNormal", "torch.int64"]),
    # --- parameters: the site and the argument named
    ("asymmetric covariance", compile_(mvn, torch.randn(5, 2), torch.tensor([[1.0, 0.5], [0.0, 1.0]])),
     ppl.ModelInputError, ["site 'y'", "covariance_matrix", "MultivariateNormal"]),
    ("indefinite covariance", compile_(mvn, torch.randn(5, 2), torch.tensor([[1.0, 2.0], [2.0, 1.0]])),
     ppl.ModelInputError, ["site 'y'", "covariance_matrix", "PositiveDefinite"]),
    ("negative scale of the likelihood", compile_(normal_scale, Y, noise=-1.0), ppl.ModelInputError,
     ["site 'y'", "scale", "-1.0"]),
    ("negative scale of a prior", compile_(normal_scale, Y, prior_scale=-2.0), ppl.ModelInputError,
     ["site 'mu'", "scale", "-2.0"]),
    ("asymmetric noise_cov of a gaussian_chain", compile_(chain(noise_cov=torch.tensor([[1.0, 0.5], [0.0, 1.0]])),
                                                          torch.randn(5, 2)),
     ppl.ModelInputError, ["site 'x'", "noise_cov", "symmetric"]),
    ("indefinite noise_cov of a gaussian_chain", compile_(chain(noise_cov=torch.tensor([[1.0, 2.0], [2.0, 1.0]])),
                                                          torch.randn(5, 2)),
     ppl.ModelInputError, ["site 'x'", "noise_cov", "positive definite"]),
    ("negative initial_cov of a gaussian_chain", compile_(chain(initial_cov=-torch.eye(2)), torch.randn(5, 2)),
     ppl.ModelInputError, ["site 'x'", "initial_cov", "positive definite"]),
    ("dynamics of the wrong shape", compile_(chain(dynamics=torch.eye(3)), torch.randn(5, 2)),
     ppl.ModelInputError, ["site 'x'", "dynamics", "(2, 2)", "(3, 3)"]),
    ("transition rows not summing to one", compile_(markov(2, torch.ones(2, 2)), Y), ppl.ModelInputError,
     ["site 'z'", "transition", "sum to one"]),
    ("num_states zero", compile_(markov(0, torch.ones(1, 1)), Y), ppl.ModelInputError,
     ["site 'z'", "num_states", "integer >= 1", "got 0"]),
    ("normal-inverse-Wishart df too small", compile_(niw_prior(0.5), Y), ppl.ModelInputError,
     ["site 'theta'", "df", "0.5"]),
    # --- ppl.condition
    ("condition outside the support (negative transition matrix)",
     infer(ppl.condition(hmm, {"trans": -torch.ones(3, 3)}), Y, num_steps=1),
     ppl.ModelInputError, ["site 'trans'", "ppl.condition", "outside the support", "Dirichlet"]),
    ("condition outside the support (negative scale)", infer(ppl.condition(normal_two, {"s": torch.tensor(-1.0)}),
                                                             Y, num_samples=2, warmup_steps=2),
     ppl.ModelInputError, ["site 's'", "ppl.condition", "outside the support", "LogNormal"]),
    ("condition with a non-tensor", lambda: ppl.condition(hmm, {"trans": [[1.0]]}), ppl.ModelInputError,
     ["site 'trans'", "torch.Tensor", "list"]),
    ("condition with NaN", lambda: ppl.condition(hmm, {"loc": torch.tensor([float("nan")] * 3)}),
     ppl.ModelInputError, ["site 'loc'", "NaN"]),
    ("condition with an empty dict", lambda: ppl.condition(hmm, {}), TypeError, ["ppl.condition", "non-empty dict"]),
    ("condition naming no site (silently ignored)", infer(ppl.condition(hmm, {"nope": torch.zeros(3)}), Y),
     ppl.ModelInputError, ["ppl.condition", "['nope']", "'hmm|nope'", "'loc'"]),
    ("condition with a value of the wrong shape (Pyro's error, no site)",
     infer(ppl.condition(hmm, {"loc": torch.zeros(5)}), Y), ppl.ModelInputError,
     ["site 'loc'", "ppl.condition", "(5,)", "event shape (3,)"]),
    # --- data
    ("NaN in the data", infer(hmm, torch.tensor([0.0, float("nan"), 1.0]), num_steps=1), ppl.ModelInputError,
     ["site 'y'", "NaN", "mask"]),
    ("data of the wrong event shape", compile_(mvn, torch.randn(5, 3), torch.eye(2)), ppl.ModelInputError,
     ["site 'y'", "(5, 3)", "event shape (2,)"]),
    ("data that is not a tensor", compile_(list_data, [1.0, 2.0]), ppl.ModelInputError,
     ["site 'y'", "torch.Tensor", "list"]),
    ("negative counts for a Poisson likelihood", compile_(poisson_data, torch.tensor([0.0, 1.0, -5.0])),
     ppl.ModelInputError, ["site 'y'", "1 of 3 entries", "outside the support", "Poisson", "(2,)"]),
    ("category out of range", compile_(categorical_data, torch.tensor([0, 1, 5, 2])), ppl.ModelInputError,
     ["site 'y'", "1 of 4 entries", "Categorical"]),
    ("a GMM with one data point", infer(gmm, torch.randn(1, 2), num_steps=1), ppl.ModelInputError,
     ["site 'z'", "plate 'data'", "size 1", "at least 2"]),
    ("infinite discrete latent", infer(poisson_latent, torch.tensor(1.0)), UnsupportedModelError,
     ["site 'n'", "infinite support"]),
    # --- masks
    ("a float mask", compile_(masked, Y, torch.ones(10)), ppl.ModelInputError,
     ["site 'y'", "mask", "bool", "torch.float32"]),
    ("a mask reaching into a multivariate event", compile_(masked_mvn, torch.zeros(4, 3), torch.ones(4, 3) > 0),
     ppl.ModelInputError, ["site 'y'", "mask has shape (4, 3)", "batch shape (4,)"]),
    # --- where a tracing error happened: the user's previous site, never Pyro's internal ones
    ("shape error names the previous user site", compile_(wrong_shape_after_sample, Y), ppl.ModelInputError,
     ["after site 'mu'", "site 'y'", "(10,)", "(3,)"]),
    ("any error names the previous user site, not the plate", compile_(broken_after_sample, Y),
     ppl.ModelTraceError, ["after site 'mu'", "no_such_attribute"]),
    # --- the model library's SVAEs
    ("zero sequences in the LDS-SVAE", lambda: ppl.infer(svae_lds.model, lds_sim().args[0][:0],
                                                         model_kwargs=lds_sim().kwargs, progress=False),
     ppl.ModelInputError, ["y must hold at least one sequence", "(0, 4, 16)"]),
    ("zero pixels in the LDS-SVAE", lambda: ppl.compile(svae_lds.model, torch.zeros(2, 4, 0),
                                                        **lds_sim().kwargs),
     ppl.ModelInputError, ["at least one sequence and one pixel", "(2, 4, 0)"]),
    ("zero frames in the VAE", lambda: ppl.compile(vae.model, torch.zeros(0, 16),
                                                   decoder=vae.make_networks(2, 16).decoder),
     ppl.ModelInputError, ["at least one frame", "(0, 16)"]),
    ("zero points in the GMM-SVAE", lambda: ppl.compile(svae_gmm.model, torch.zeros(0, 2),
                                                        decoder=svae_gmm.make_networks().decoder),
     ppl.ModelInputError, ["at least one point", "(0, 2)"]),
    ("zero sequences in the SLDS-SVAE", lambda: ppl.compile(svae_slds.model, torch.zeros(0, 5, 10),
                                                            decoder=vae.make_networks(2, 10).decoder),
     ppl.ModelInputError, ["at least one sequence", "(0, 5, 10)"]),
    # --- other entry points
    ("simulate zero samples", lambda: ppl.simulate(hmm, Y, num_samples=0), ValueError, ["num_samples", "0"]),
    ("extend by zero steps", lambda: ppl.extend(Y, steps=0), ValueError, ["steps", "0"]),
    ("log_joint without a latent's value", lambda: ppl.log_joint(normal_normal, {}, Y), ppl.ModelInputError,
     ["log_joint", "'mu'"]),
    ("log_joint without a global next to a chain", lambda: ppl.log_joint(hmm, {"trans": torch.eye(3)}, Y),
     ppl.ModelInputError, ["log_joint", "['loc', 'z']", "continuous latent(s) ['loc']", "Give their values"]),
    ("log_joint summing out a chain with a nonlinear child", lambda: ppl.log_joint(lds_nonlinear, {}, torch.randn(5, 1)),
     ppl.ModelInputError, ["log_joint", "['x']", "gaussian_chain 'x'", "not linear-Gaussian"]),
    ("log_joint summing out a chain of a model with parameters", lambda: ppl.log_joint(lds, {"A": torch.eye(2)},
                                                                                        torch.randn(5, 3)),
     ppl.ModelInputError, ["log_joint", "['x']", "learnable parameters ['C']", "log_evidence"]),
    ("log_joint values not a dict", lambda: ppl.log_joint(hmm, [1.0], Y), TypeError, ["log_joint", "dict", "list"]),
    ("log_joint value naming no site (silently ignored)",
     lambda: ppl.log_joint(normal_normal, {"mu": torch.tensor(0.0), "nu": torch.tensor(1.0)}, Y),
     ppl.ModelInputError, ["log_joint", "['nu']", "'mu'"]),
    ("log_joint value of the wrong shape", lambda: ppl.log_joint(normal_normal, {"mu": torch.zeros(3)}, Y),
     ppl.ModelInputError, ["site 'mu'", "log_joint", "(3,)", "batch shape ()"]),
    ("log_joint value outside the support (blamed site 'z')",
     lambda: ppl.log_joint(hmm, {"trans": -torch.ones(3, 3), "loc": torch.zeros(3)}, Y),
     ppl.ModelInputError, ["site 'trans'", "log_joint", "outside the support", "Dirichlet"]),
    ("simulate with a float seed (silently accepted)", lambda: ppl.simulate(hmm, Y, seed=1.5), ValueError,
     ["ppl.simulate", "seed", "1.5"]),
    ("simulate a float number of samples (internal TypeError)", lambda: ppl.simulate(hmm, Y, num_samples=2.5),
     ValueError, ["ppl.simulate", "num_samples", "2.5"]),
    ("ppl.module of a non-module", lambda: ppl.module("net", lambda x: x), TypeError, ["'net'", "torch.nn.Module"]),
    ("ppl.model of a non-function", lambda: ppl.model(3), TypeError, ["ppl.model", "int"]),
    # --- the exact kernels name the argument
    ("HMM kernel with NaN potentials", lambda: hmm_kernel.log_normalizer(torch.zeros(3), torch.zeros(3, 3),
                                                                        torch.full((4, 3), float("nan"))),
     ValueError, ["log_lik", "NaN", "(4, 3)"]),
    ("Kalman kernel with an asymmetric obs_cov",
     lambda: kalman.log_likelihood(kalman.LDSPrior(torch.zeros(1), torch.eye(1), torch.eye(1), torch.eye(1)),
                                   torch.eye(2, 1), None, torch.tensor([[1.0, 0.5], [0.0, 1.0]]), torch.zeros(3, 2)),
     ValueError, ["obs_cov", "symmetric"]),
    # --- the Posterior and the data helpers
    ("post.sample with a float n", lambda: _normal_posterior().sample(2.5), ValueError,
     ["sample(n)", "integer >= 1", "2.5"]),
    ("ppl.extend of a list", lambda: ppl.extend([1.0, 2.0], steps=2), TypeError, ["extend", "torch.Tensor", "list"]),
    ("post.encode without an encoder", lambda: _normal_posterior().encode(torch.zeros(3)), RuntimeError,
     ["no amortized encoder", "'svae'", "'amortized'"]),
    # --- options of the amortized backend and checkpoints
    ("amortized batch_size zero", infer(_shift, torch.randn(30), backend="amortized", batch_size=0), ValueError,
     ["batch_size", "got 0"]),
    ("checkpoint_every zero", infer(hmm, Y, backend="exact", checkpoint="x.ckpt", checkpoint_every=0), ValueError,
     ["checkpoint_every", "got 0"]),
    ("resume from a missing file", infer(hmm, Y, backend="exact", resume="missing.ckpt"), FileNotFoundError,
     ["resume", "missing.ckpt"]),
]
if CUDA_MISSING:
    ROWS.append(("device cuda without a GPU", infer(hmm, Y, device="cuda"), ValueError,
                 ["device='cuda'", "no CUDA device", "'cpu'"]))


@pytest.mark.parametrize("description,call,error,words", ROWS, ids=[r[0] for r in ROWS])
def test_bad_input_gives_a_clear_error(description, call, error, words):
    with pytest.raises(error) as info:
        call()
    message = str(info.value)
    missing = [w for w in words if w not in message]
    assert not missing, f"{description}: the message lacks {missing}: {message}"
    assert "_pyro_inspect" not in message


def test_the_table_is_large_enough():
    assert len(ROWS) >= 50


# ----------------------------------------------------------------------------- promoted, not refused
def test_mixed_float32_float64_chain_parameters_are_promoted():
    """float32 priors with float64 data (HMM), and a float64 prior draw with a float32 constant in a
    gaussian_chain, failed inside the kernels ('log_init must have dtype float64', 'expected m1 and m2 to have
    the same dtype'); they are promoted as torch promotes, and give the float64 answer."""
    trans, loc = torch.tensor([[0.8, 0.2], [0.3, 0.7]]), torch.tensor([-1.0, 1.0])
    y64 = torch.linspace(-2.0, 2.0, 12, dtype=torch.float64)
    mixed = ppl.infer(ppl.condition(hmm, {"trans": trans, "loc": loc}), y64, model_kwargs={"K": 2}, progress=False)
    same = ppl.infer(ppl.condition(hmm, {"trans": trans.double(), "loc": loc.double()}), y64,
                     model_kwargs={"K": 2}, progress=False)
    assert abs(mixed.log_evidence.value - same.log_evidence.value) < 1e-5

    def lds(y, A):
        x = ppl.gaussian_chain("x", 2, A, 0.1 * torch.eye(2), length=y.shape[-2])  # eye: float32
        ppl.sample("y", dist.Normal(x, 1.0).to_event(2), obs=y)

    y = torch.randn(6, 2, dtype=torch.float64)
    A = 0.9 * torch.eye(2, dtype=torch.float64)
    got = ppl.infer(lds, y, model_kwargs={"A": A}, progress=False).log_evidence.value
    eye = torch.eye(2, dtype=torch.float64)
    want = kalman.log_likelihood(kalman.LDSPrior(torch.zeros(2, dtype=torch.float64), eye, A, 0.1 * eye),
                                 eye, None, eye, y)
    assert abs(got - float(want)) < 1e-5
