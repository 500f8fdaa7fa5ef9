"""Small GMM-, HMM-, LDS- and neural-shaped models shared by the compiler tests."""
import torch

import ppl
from ppl import dist


@ppl.model
def gmm(x, K=3):
    w = ppl.sample("weights", dist.Dirichlet(torch.ones(K)))
    with ppl.plate("components", K):
        loc = ppl.sample("loc", dist.MultivariateNormal(torch.zeros(2), 10 * torch.eye(2)))
    with ppl.plate("data", x.shape[0]):
        z = ppl.sample("z", dist.Categorical(w))
        ppl.sample("x", dist.MultivariateNormal(loc[z], torch.eye(2)), obs=x)


@ppl.model
def hmm(y, K=3):
    trans = ppl.sample("trans", dist.Dirichlet(torch.ones(K, K)).to_event(1))
    loc = ppl.sample("loc", dist.Normal(torch.zeros(K), 10.0).to_event(1))
    z = ppl.markov_chain("z", K, trans, length=y.shape[-1])
    ppl.sample("y", dist.Normal(loc[z], 1.0), obs=y)


@ppl.model
def hmm_nonpointwise(y, K=3):
    """Uses the chain's value through a sum: not tabulable state by state."""
    trans = torch.full((K, K), 1.0 / K)
    z = ppl.markov_chain("z", K, trans, length=y.shape[-1])
    ppl.sample("y", dist.Normal(z.float().cumsum(-1), 1.0), obs=y)


@ppl.model
def lds(y, D=2):
    A = ppl.sample("A", dist.Normal(torch.zeros(D, D), 0.5).to_event(2))
    x = ppl.gaussian_chain("x", D, A, 0.1 * torch.eye(D), length=y.shape[-2])
    C = ppl.param("C", torch.ones(y.shape[-1], D))
    ppl.sample("y", dist.Normal(x @ C.T, 0.5).to_event(2), obs=y)


@ppl.model
def lds_nonlinear(y, D=2):
    x = ppl.gaussian_chain("x", D, 0.9 * torch.eye(D), 0.1 * torch.eye(D), length=y.shape[-2])
    ppl.sample("y", dist.Normal(torch.tanh(x).sum(-1, keepdim=True), 0.5).to_event(2), obs=y)


class Decoder(torch.nn.Module):
    def __init__(self, D=2, N=3):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(D, 8), torch.nn.Tanh(), torch.nn.Linear(8, N))

    def forward(self, x):
        return self.net(x)


class ScaledIdentity(torch.nn.Module):
    """A one-parameter float64 'network' x -> scale * x (scale starts at 1): a likelihood through it counts as
    neural while staying linear-Gaussian, so exact answers exist."""

    def __init__(self):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones((), dtype=torch.float64))

    def forward(self, x):
        return self.scale * x


@ppl.model
def neural_lds(y, D=2):
    decoder = ppl.module("decoder", Decoder(D, y.shape[-1]))
    x = ppl.gaussian_chain("x", D, 0.9 * torch.eye(D), 0.1 * torch.eye(D), length=y.shape[-2])
    ppl.sample("y", dist.Normal(decoder(x), 0.5).to_event(2), obs=y)


@ppl.model
def normal_normal(y, prior_loc=1.0, prior_scale=2.0, noise=1.5):
    mu = ppl.sample("mu", dist.Normal(prior_loc, prior_scale))
    with ppl.plate("data", y.shape[0]):
        ppl.sample("y", dist.Normal(mu, noise), obs=y)


@ppl.model
def poisson_latent(y):
    n = ppl.sample("n", dist.Poisson(3.0))
    ppl.sample("y", dist.Normal(n, 1.0), obs=y)


@ppl.model
def shifted(y):
    """A learned offset ``b`` (a ppl.param) plus a latent ``mu``: the data's level lives in ``b``."""
    b = ppl.param("b", torch.tensor(0.0))
    mu = ppl.sample("mu", dist.Normal(0.0, 1.0))
    with ppl.plate("data", y.shape[0]):
        ppl.sample("y", dist.Normal(b + mu, 0.1), obs=y)


@ppl.model
def local_shift(x):
    """b ~ N(0, 10^2); z_n ~ N(0, 1); x_n ~ N(z_n + b, 1): continuous locals for the amortized backend."""
    b = ppl.sample("b", dist.Normal(x.new_zeros(()), 10.0))
    with ppl.plate("data", x.shape[0]):
        z = ppl.sample("z", dist.Normal(x.new_zeros(()), 1.0))
        ppl.sample("x", dist.Normal(z + b, 1.0), obs=x)
