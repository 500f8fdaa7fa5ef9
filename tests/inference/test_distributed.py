"""Data-parallel training (``inference/distributed.py``) for the amortized, svae and svi backends: two gloo
processes on localhost, each fitting half of every batch, end with the parameters of one process on the whole
batch (float64, to summation-order round-off), the svae's conjugate globals (Dirichlet, MNIW) included. One
spawn runs every backend's fit (a process start costs seconds); the helpers themselves are checked without a
process group."""
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import ppl
from ppl import dist
from ppl.inference import distributed
from tests.ppl import models_for_tests as M
from tests.ppl.models_for_tests import ScaledIdentity

ROOT = Path(__file__).resolve().parents[2]
LOCS = torch.tensor([[-4.0, 0.0], [4.0, 0.0], [0.0, 5.0]], dtype=torch.float64)


def mixture_data(n: int = 16) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    z = torch.arange(n) % 3
    return LOCS[z] + 0.5 * torch.randn(n, 2, generator=g, dtype=torch.float64)


def dirichlet_mixture(decoder):
    """An SVAE mixture: weights ~ Dir(1) (a conjugate global: natural-gradient steps on the batch's expected
    counts), z_n ~ Cat(weights), x_n ~ N(loc_z, 0.1 I), y_n ~ N(decoder(x_n), 0.15 I)."""

    def model(y):
        dec = ppl.module("dec", decoder)
        weights = ppl.sample("weights", dist.Dirichlet(torch.ones(3, dtype=y.dtype)))
        with ppl.plate("data", y.shape[0]):
            k = ppl.sample("z", dist.Categorical(weights))
            x = ppl.sample("x", dist.MultivariateNormal(LOCS[k], 0.1 * torch.eye(2, dtype=y.dtype)))
            ppl.sample("y", dist.Normal(dec(x), 0.15 ** 0.5).to_event(1), obs=y)

    return model


@ppl.model
def regression(x, y):
    """w ~ N(0, 10^2 I); s ~ HalfNormal(1); y_n ~ N(x_n w, s^2): global latents only."""
    w = ppl.sample("w", dist.Normal(x.new_zeros(2), 10.0).to_event(1))
    s = ppl.sample("s", dist.HalfNormal(x.new_ones(())))
    with ppl.plate("data", x.shape[0]):
        ppl.sample("y", dist.Normal(x @ w, s), obs=y)


def regression_data(n: int = 32):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 2, generator=g, dtype=torch.float64)
    return x, x @ torch.tensor([1.0, -2.0], dtype=torch.float64) + 0.5 * torch.randn(n, generator=g,
                                                                                      dtype=torch.float64)


def _params(post, *extra: str) -> dict[str, torch.Tensor]:
    out = {k: v.detach().clone() for k, v in post.params.items()}
    out.update({f"point.{k}": post.point[k].detach().clone() for k in extra})
    return out


def fit_amortized():
    x = 2.0 + torch.randn(64, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    post = ppl.infer(M.local_shift, x, backend="amortized", num_steps=15, batch_size=16, num_samples=2,
                     progress=False)
    return _params(post)


def fit_svae_mixture():
    post = ppl.infer(dirichlet_mixture(ScaledIdentity()), mixture_data(), backend="svae", num_steps=6,
                     batch_size=8, num_samples=2, progress=False)
    return _params(post, "weights")


def fit_svae_lds():
    from ppl.models import svae_lds

    sim = svae_lds.simulate(seed=0, N=8, T=5, P=4, num_test=1, dtype=torch.float64)
    post = ppl.infer(svae_lds.model, *sim.args, model_kwargs=sim.kwargs, backend="svae", num_steps=4,
                     batch_size=4, num_samples=2, progress=False)
    return _params(post)


def fit_svae_mniw():
    """The LDS-SVAE with a conjugate matrix-normal-inverse-Wishart on (A, Q): its q's natural-gradient step is
    taken from the all-reduced transition statistics (a named tuple of natural parameters)."""
    from ppl import MatrixNormalInverseWishart
    from ppl.models import svae_lds
    from tests.inference.test_svae_mniw import lds_mniw

    sim = svae_lds.simulate(seed=0, N=8, T=5, P=4, num_test=1, dtype=torch.float64)
    eye = torch.eye(2, dtype=torch.float64)
    init = {"dynamics": MatrixNormalInverseWishart.pack(svae_lds.slow_rotation(2, dtype=torch.float64), 0.01 * eye)}
    post = ppl.infer(lds_mniw, sim.args[0], model_kwargs=sim.kwargs, backend="svae", num_steps=3, batch_size=4,
                     init=init, num_samples=2, progress=False)
    return _params(post, "dynamics")


def fit_svi(batch_size=8):
    post = ppl.infer(regression, *regression_data(), backend="svi", num_steps=20, batch_size=batch_size,
                     num_samples=2, progress=False)
    return _params(post)


FITS = {"amortized": fit_amortized, "svae mixture": fit_svae_mixture, "svae lds": fit_svae_lds,
        "svae mniw": fit_svae_mniw, "svi": fit_svi}

SCRIPT = """
import sys, torch, torch.distributed as dist, torch.multiprocessing as mp
sys.path.insert(0, {root!r})

def uneven():
    from tests.inference.test_distributed import FITS
    try:
        FITS["svi"](batch_size=7)
    except ValueError as error:
        return str(error)
    return "no error"

def worker(rank, path):
    from tests.inference.test_distributed import FITS
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method="file://" + path + ".rendezvous", rank=rank, world_size=2)
    fits = {{name: fit() for name, fit in FITS.items()}}
    torch.save(dict(fits, uneven=uneven()), path + f".rank{{rank}}")
    dist.destroy_process_group()

if __name__ == "__main__":
    mp.spawn(worker, args=(sys.argv[1],), nprocs=2)
"""


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """The fits of one process (this one, while the two gloo processes run) and of rank 0 and 1 of the two:
    part -> backend -> parameter name -> value."""
    tmp = tmp_path_factory.mktemp("ddp")
    script = tmp / "ddp.py"
    script.write_text(textwrap.dedent(SCRIPT.format(root=str(ROOT))))
    ddp = subprocess.Popen([sys.executable, str(script), str(tmp / "fit")], cwd=ROOT, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)
    try:
        single = {name: fit() for name, fit in FITS.items()}
        _, stderr = ddp.communicate(timeout=600)
    finally:
        ddp.kill()
    assert ddp.returncode == 0, stderr[-3000:]
    return {"single": single, **{part: torch.load(tmp / f"fit.{part}") for part in ("rank0", "rank1")}}


@pytest.mark.parametrize("backend", list(FITS))
def test_two_processes_equal_one_process_with_the_same_total_batch(fitted, backend):
    single, rank0, rank1 = (fitted[part][backend] for part in ("single", "rank0", "rank1"))
    assert set(single) == set(rank0) == set(rank1) and len(single) >= 2
    for name in single:
        assert torch.equal(rank0[name], rank1[name]), f"{backend}: the processes disagree on {name}"
        assert torch.allclose(single[name], rank0[name], rtol=1e-9, atol=1e-11), f"{backend}: {name}"


def test_a_batch_the_processes_cannot_share_evenly_is_refused(fitted):
    assert fitted["rank0"]["uneven"] == ("batch_size=7 must be a multiple of the 2 processes of torch.distributed "
                                         "(each process fits an equal share of every batch)")


def test_without_a_process_group_the_helpers_are_the_identity():
    assert distributed.world() == (0, 1) and distributed.is_main()
    assert distributed.shard(7) == slice(0, 7)
    t = torch.arange(3.0)
    assert distributed.average(t) is t
    p = torch.zeros(2, requires_grad=True)
    p.grad = torch.ones(2)
    distributed.average_gradients([p])
    assert torch.equal(p.grad, torch.ones(2))
    assert distributed.device() == torch.device("cpu")


def test_only_rank_0_reports_progress_and_writes_checkpoints(monkeypatch, tmp_path):
    from ppl.inference.checkpoints import Checkpoints

    assert distributed.main_only(True, Checkpoints(tmp_path / "fit.ckpt"))[0] is True
    monkeypatch.setattr(distributed, "world", lambda: (1, 2))
    progress, checkpoints = distributed.main_only(True, Checkpoints(tmp_path / "fit.ckpt"))
    assert progress is False and checkpoints.path is None
    checkpoints.write("svi#1", {"step": 1})   # recorded (a resumed fit reads it), no file written
    assert checkpoints.resumed("svi#1") == {"step": 1} and not (tmp_path / "fit.ckpt").exists()
    assert distributed.main_only(False, None) == (False, None)
