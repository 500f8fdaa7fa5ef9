"""ppl.models.gmm against scikit-learn's GaussianMixture (the peer) on the same data.

Convention for "our log-likelihood": log p(x | weights, loc, scale[, corr_chol]) with every z summed
out, computed through the model code: the model with its globals fixed by ``ppl.condition`` has only
finite discrete latents left, so ``ppl.infer`` (backend auto -> "exact", rule ``discrete-only``)
enumerates them and reports ``log_evidence`` = exact log p(data) (the fixed sites' prior densities
excluded). sklearn's ``score(x)`` is the mean per-point log-likelihood, so ``N * score`` is the peer's.
"""
import numpy as np
import pytest
import torch

import ppl
from ppl.models import gmm
from ppl.models._util import best_permutation

sklearn_mixture = pytest.importorskip("sklearn.mixture")

K, D, N = 3, 2, 400


def _truth(dtype) -> dict[str, torch.Tensor]:
    """Three components with different weights, scales and (for "full") correlations 0.6, -0.5, 0."""
    corr = torch.tensor([[[1.0, 0.0], [0.6, 0.8]], [[1.0, 0.0], [-0.5, 0.75 ** 0.5]], [[1.0, 0.0], [0.0, 1.0]]])
    return {"weights": torch.tensor([0.5, 0.3, 0.2], dtype=dtype),
            "loc": torch.tensor([[-4.0, 0.0], [3.0, 3.0], [2.0, -4.0]], dtype=dtype),
            "scale": torch.tensor([[1.0, 0.5], [0.7, 1.2], [1.0, 1.0]], dtype=dtype),
            "corr_chol": corr.to(dtype)}


def _draw(truth: dict, covariance: str, seed: int = 0) -> torch.Tensor:
    """``x: (N, D)`` from the mixture ``truth`` (its correlations ignored for "diag")."""
    gen = torch.Generator().manual_seed(seed)
    dtype = truth["loc"].dtype
    corr = truth["corr_chol"] if covariance == "full" else torch.eye(D, dtype=dtype).expand(K, D, D)
    tril = truth["scale"].unsqueeze(-1) * corr
    z = torch.multinomial(truth["weights"], N, replacement=True, generator=gen)
    eps = torch.randn(N, D, 1, generator=gen, dtype=dtype)
    return truth["loc"][z] + (tril[z] @ eps).squeeze(-1)


def _params(truth: dict, covariance: str) -> dict:
    """The sites to fix in the model: corr_chol only exists for "full"."""
    return {k: v for k, v in truth.items() if covariance == "full" or k != "corr_chol"}


def _peer_with(params: dict, covariance: str):
    """A GaussianMixture whose parameters are set (not fitted) to ``params``."""
    peer = sklearn_mixture.GaussianMixture(K, covariance_type=covariance)
    peer.weights_ = params["weights"].double().numpy()
    peer.means_ = params["loc"].double().numpy()
    scale = params["scale"].double()
    if covariance == "full":
        tril = scale.unsqueeze(-1) * params["corr_chol"].double()
        cov = tril @ tril.transpose(-1, -2)
        peer.covariances_ = cov.numpy()
        # sklearn's precisions_cholesky_: upper-triangular U with U U^T = Sigma^{-1}.
        peer.precisions_cholesky_ = np.linalg.cholesky(np.linalg.inv(cov.numpy()))
    else:
        peer.covariances_ = (scale ** 2).numpy()
        peer.precisions_cholesky_ = (1.0 / scale).numpy()
    return peer


def our_log_likelihood(params: dict, x: torch.Tensor, covariance: str):
    """Exact log p(x | params) through the model (see the module docstring); returns (value, posterior)."""
    post = ppl.infer(ppl.condition(gmm.model, params), x, model_kwargs={"K": K, "covariance": covariance},
                     progress=False)
    assert post.log_evidence.kind == "exact log p(data)"
    return post.log_evidence.value, post


@pytest.mark.parametrize("covariance", ["full", "diag"])
def test_log_likelihood_at_fixed_parameters_matches_sklearn(covariance):
    truth = _truth(torch.float64)
    x = _draw(truth, covariance)
    params = _params(truth, covariance)
    ours, post = our_log_likelihood(params, x, covariance)
    assert (post.plan.backend, post.plan.rule) == ("exact", "discrete-only")
    peer_model = _peer_with(params, covariance)
    peer = N * peer_model.score(x.numpy())
    # Same float64 numbers through two exact formulas (logsumexp over 3 components of 400 points):
    # they agreed exactly on this draw (relative difference 0.0); 1e-9 relative leaves room for BLAS order.
    assert ours == pytest.approx(peer, rel=1e-9)
    # The check is not vacuous: moving one mean by 0.5 changes both by several nats.
    moved = {**params, "loc": params["loc"] + torch.tensor([0.5, 0.0], dtype=torch.float64)}
    assert abs(our_log_likelihood(moved, x, covariance)[0] - ours) > 5.0
    # The responsibilities p(z_n | x_n, params): exact enumeration vs sklearn's predict_proba, both in
    # float64 -> 1e-9 absolute.
    resp = post.marginals("z")
    assert resp.shape == (N, K)
    assert torch.allclose(resp, torch.as_tensor(peer_model.predict_proba(x.numpy())), atol=1e-9, rtol=0)


def test_fitted_log_likelihood_is_close_to_sklearn_em_maximum():
    """Fit both on the same data (ours: SVI with gmm's defaults; sklearn: EM from 3 k-means starts)
    and compare log-likelihoods at the fitted parameters, and the fitted means."""
    truth = _truth(torch.float64)
    x = _draw(truth, "full", seed=1)
    post = ppl.infer(gmm.model, x, model_kwargs={"K": K, "covariance": "full"}, progress=False,
                     num_steps=400, lr=0.05, num_samples=200, init=gmm.init_locations(x, K))
    chol = post.mean("corr_chol")
    fitted = {"weights": post.mean("weights"), "loc": post.mean("loc"), "scale": post.mean("scale"),
              # a mean of correlation Cholesky factors has rows of norm < 1: renormalize the rows.
              "corr_chol": chol / chol.norm(dim=-1, keepdim=True)}
    ours, _ = our_log_likelihood(fitted, x, "full")
    peer = sklearn_mixture.GaussianMixture(K, covariance_type="full", n_init=3, tol=1e-8, max_iter=1000,
                                           random_state=0).fit(x.numpy())
    peer_ll = N * peer.score(x.numpy())
    # sklearn's EM finds the maximum-likelihood estimate, so ours cannot beat it (0.01 nats for rounding).
    # Ours is a posterior mean, about a posterior sd from the MLE in each of the 17 parameters: the drop
    # is ~ chi2_17 / 2 ~ 8.5 nats on average, plus the priors' pull (measured 4.1, 5.5, 5.1 nats on
    # draws 0, 1, 2) -> 15 nats (0.04 nats per point).
    assert ours <= peer_ll + 0.01
    assert peer_ll - ours < 15.0
    # Means under the best relabelling: the posterior-mean/MLE difference measured 0.05-0.11 on draws
    # 0-2 (posterior sd of a mean ~ 1 / sqrt(80..200) ~ 0.07-0.11) -> 0.25.
    peer_loc = torch.as_tensor(peer.means_)
    perm = best_permutation(fitted["loc"], peer_loc)
    assert float((fitted["loc"][perm] - peer_loc).abs().max()) < 0.25
