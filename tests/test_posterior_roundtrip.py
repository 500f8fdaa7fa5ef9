"""A Posterior is data: it pickles and ``torch.save``s, and a fresh process that loads it gets identical
``mean``, ``sample``, ``predictive`` and (svae, amortized) ``encode`` — for every backend."""
import importlib
import pickle
import subprocess
import sys
import textwrap

import pytest
import torch

import ppl
from tests.ppl import models_for_tests as M

ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]


def fit(backend: str) -> tuple[ppl.Posterior, tuple]:
    """A small fit of each backend on a model importable by name; returns (posterior, new data for encode)."""
    torch.manual_seed(0)
    if backend == "exact":
        y = torch.cat([torch.randn(10) - 3, torch.randn(10) + 3])
        return ppl.infer(M.hmm, y, backend="exact", model_kwargs={"K": 2}, num_steps=30, progress=False), ()
    if backend == "svi":
        x = torch.cat([torch.randn(15, 2) - 4, torch.randn(15, 2) + 4])
        return ppl.infer(M.gmm, x, model_kwargs={"K": 2}, backend="svi", num_steps=30, num_samples=40,
                         progress=False), ()
    if backend == "svi-param":
        y = 5.0 + 0.1 * torch.randn(20)
        return ppl.infer(M.shifted, y, backend="svi", num_steps=300, lr=0.05, num_samples=40, progress=False), ()
    if backend == "vi":
        y = torch.cat([torch.randn(10) - 3, torch.randn(10) + 3])
        return ppl.infer(M.hmm, y, backend="vi", model_kwargs={"K": 2}, num_samples=20, progress=False), ()
    if backend == "amortized":
        x = 2.0 + torch.randn(40)
        return ppl.infer(M.local_shift, x, backend="amortized", num_steps=20, batch_size=8, num_samples=10,
                         progress=False), (torch.randn(4),)
    if backend in ("adversarial", "discrete_vi", "energy"):   # the library's gan, discrete_vae, rbm: tiny fits
        name = {"adversarial": "gan", "discrete_vi": "discrete_vae", "energy": "rbm"}[backend]
        module = importlib.import_module(f"ppl.models.{name}")
        sim = module.simulate(seed=0)
        options = {"adversarial": dict(num_steps=3, num_samples=5), "discrete_vi": dict(num_steps=3, num_samples=5),
                   "energy": dict(num_steps=3, ais_betas=20, ais_chains=5)}[backend]
        return ppl.infer(module.model, *sim.args, model_kwargs=sim.kwargs, progress=False, **options), ()
    if backend == "mcmc":
        return ppl.infer(M.normal_normal, torch.randn(12), num_samples=15, warmup_steps=15, progress=False), ()
    y = torch.randn(6, 3)
    return ppl.infer(M.neural_lds, y, num_steps=5, num_samples=4, progress=False), (torch.randn(6, 3),)


def outputs(post: ppl.Posterior, new_data: tuple) -> dict:
    """Everything a user reads from a Posterior, computed from its stored state."""
    torch.set_num_threads(1)
    out = {"mean": {k: post.mean(k) for k in post.draws}, "sample": post.sample(7, seed=3),
           "predictive": post.predictive(3, seed=2), "discrete": post.discrete, "point": post.point,
           "smoothed_means": post.smoothed_means, "log_evidence": post.log_evidence.value}
    if new_data:
        out["encode"] = {k: tuple(local) for k, local in post.encode(*new_data).items()}
    return out


def assert_identical(a, b, where="out"):
    if isinstance(a, dict):
        assert set(a) == set(b), f"{where}: keys {sorted(a)} vs {sorted(b)}"
        for k in a:
            assert_identical(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(a, (tuple, list)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_identical(x, y, f"{where}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b), f"{where}: differs after loading (max diff {(a - b).abs().max()})"
    elif isinstance(a, float) and a != a:
        assert b != b, where
    else:
        assert a == b, f"{where}: {a!r} vs {b!r}"


CHILD = textwrap.dedent("""
    import pickle, sys, torch
    import ppl
    from tests.test_posterior_roundtrip import outputs
    saved, pickled, new_data, result = sys.argv[1:]
    new = torch.load(new_data)
    with open(pickled, "rb") as f:
        from_pickle = pickle.load(f)
    results = [outputs(ppl.Posterior.load(saved), new), outputs(from_pickle, new)]
    torch.save(results, result)
""")


@pytest.mark.parametrize("backend", ["exact", "svi", "svi-param", "mcmc", "svae", "vi", "amortized", "adversarial",
                                     "discrete_vi", "energy"])
def test_posterior_round_trips_into_a_fresh_process(backend, tmp_path):
    post, new_data = fit(backend)
    assert post.backend == backend.split("-")[0]
    expected = outputs(post, new_data)
    post.save(tmp_path / "post.pt")
    (tmp_path / "post.pkl").write_bytes(pickle.dumps(post))
    torch.save(new_data, tmp_path / "new.pt")
    paths = [str(tmp_path / n) for n in ("post.pt", "post.pkl", "new.pt", "result.pt")]
    run = subprocess.run([sys.executable, "-c", CHILD, *paths], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    for got in torch.load(paths[-1], weights_only=False):
        assert_identical(expected, got)


def test_predictive_runs_with_the_fitted_parameters():
    post, _ = fit("svi-param")
    assert float(post.params["b"]) > 2.0                  # the data's level 5 is split between b and mu
    level = float(post.predictive(20, seed=0)["y"].mean())
    assert abs(level - 5.0) < 0.3, level                   # b + mu; about 2 if b were not restored


def test_posterior_holds_no_closure():
    post, _ = fit("exact")
    assert post.local_sampler is not None and "<locals>" not in post.local_sampler.fn.__qualname__
    with pytest.raises(TypeError, match="module-level function"):
        ppl.posterior.StateFunction(lambda state, n: state, None)


def test_load_refuses_what_is_not_a_posterior(tmp_path):
    torch.save({"a": 1}, tmp_path / "x.pt")
    with pytest.raises(TypeError, match="not a ppl.Posterior"):
        ppl.Posterior.load(tmp_path / "x.pt")
