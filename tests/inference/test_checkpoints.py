"""Checkpoints and resume (inference/checkpoints.py): a fit that crashed at step k and is resumed from its
checkpoint file in a fresh process ends bit-identical to the uninterrupted fit (parameters, objective history,
RNG included), for a stochastic Adam fit (svi, AutoNormal), the exact backend's L-BFGS restarts, the SVAE and the
vi backend's coordinate-ascent sweeps.

Each case runs two subprocesses: the first fits once uninterrupted (writing its result) and once more with
``checkpoint=`` and a crash (an exception raised from inside the objective) a few evaluations after the file was
written for the third time (``CRASH_AT``); the second resumes from the checkpoint file and compares.
"""
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import ppl
from ppl.inference.checkpoints import Checkpoints

ROOT = Path(__file__).resolve().parents[2]

PRELUDE = """
import sys, torch, ppl
from ppl.inference import training
from ppl.models import gmm, hmm, svae_gmm

class Crash(Exception):
    pass

def crash_after(writes, n):
    # raise Crash from inside the objective n evaluations after the checkpoint file was written `writes` times
    from ppl.inference.checkpoints import Checkpoints
    from ppl.inference.svae import backend as svae_backend
    original_write, count = Checkpoints.write, [0, 0]
    def write(self, key, state):
        count[0] += 1
        original_write(self, key, state)
    def counting(make_step):
        def make(*a):
            step = make_step(*a)
            def wrapped():
                if count[0] >= writes:
                    count[1] += 1
                    if count[1] > n:
                        raise Crash()
                return step()
            return wrapped
        return make
    Checkpoints.write = write
    training.objective = counting(training.objective)               # the steps of svi and exact fits
    svae_backend.traced_loss = counting(svae_backend.traced_loss)   # the SVAE's
    from ppl.inference.vi import cavi                               # the vi backend's sweeps
    local_step = cavi.local_step
    def counted_local_step(*a):
        counting(lambda: lambda: None)()()
        return local_step(*a)
    cavi.local_step = counted_local_step

def fit(**extra):
    return ppl.infer(MODEL, *ARGS, model_kwargs=KWARGS, progress=False, **OPTIONS, **extra)

def result(post):
    return {"params": {k: v.detach().clone() for k, v in post.params.items()}, "history": list(post.history)}
"""

CASES = {
    "svi": """
torch.manual_seed(0)
MODEL, ARGS, KWARGS = gmm.model, (torch.cat([torch.randn(30, 2) - 3, torch.randn(30, 2) + 3]),), {"K": 2}
OPTIONS = dict(backend="svi", num_steps=60, lr=0.05, num_samples=5, init={"loc": torch.tensor([[-3., -3.], [3., 3.]])})
CRASH_AT, EVERY = (3, 7), 10
""",
    "exact": """
sim = hmm.simulate(seed=0, N=3, T=400)
MODEL, ARGS, KWARGS = hmm.model, sim.args, sim.kwargs
OPTIONS = dict(num_steps=200, restarts=2)
CRASH_AT, EVERY = (5, 0), 5   # two screened starts written (mid and done), then a crash in the final fit
""",
    "vi": """
from tests.ppl.models_for_tests import hmm as conjugate_hmm
torch.manual_seed(0)
MODEL, ARGS, KWARGS = conjugate_hmm, (torch.cat([torch.randn(40) - 4, torch.randn(40) + 4]),), {"K": 2}
OPTIONS = dict(backend="vi", num_steps=60, tol=1e-14, restarts=2, num_samples=5)
CRASH_AT, EVERY = (1, 0), 2
""",
    "svae": """
sim = svae_gmm.simulate(seed=0, num_classes=3, num_per_class=20)
MODEL, ARGS, KWARGS = svae_gmm.model, sim.args, sim.kwargs
OPTIONS = dict(backend="svae", num_steps=30, num_samples=5)
CRASH_AT, EVERY = (3, 2), 5
""",
}

FIRST = """
reference = result(fit())
torch.save(reference, sys.argv[1] + ".reference")
crash_after(*CRASH_AT)
try:
    fit(checkpoint=sys.argv[1], checkpoint_every=EVERY)
except Crash:
    pass
else:
    raise SystemExit("the crash did not happen")
"""

SECOND = """
resumed = result(fit(resume=sys.argv[1]))
reference = torch.load(sys.argv[1] + ".reference")
assert resumed["history"] == reference["history"], (len(resumed["history"]), len(reference["history"]))
assert set(resumed["params"]) == set(reference["params"])
for name, value in reference["params"].items():
    assert torch.equal(resumed["params"][name], value), name
print("bit-identical", len(resumed["history"]))
"""


def _run(code: str, path: Path) -> str:
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code), str(path)], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_crashed_fit_resumed_in_a_fresh_process_is_bit_identical(case, tmp_path):
    path = tmp_path / "fit.ckpt"
    _run(PRELUDE + CASES[case] + FIRST, path)
    saved = torch.load(path, weights_only=False)
    assert saved and not all(entry["done"] for entry in saved.values())   # it stopped mid-fit
    assert "bit-identical" in _run(PRELUDE + CASES[case] + SECOND, path)


def test_checkpoint_options_are_checked():
    with pytest.raises(ValueError, match="checkpoint_every must be an integer >= 1, got 0"):
        Checkpoints.from_options("x.ckpt", 0, None)
    with pytest.raises(FileNotFoundError, match="no checkpoint file at 'missing.ckpt'"):
        Checkpoints.from_options(None, 10, "missing.ckpt")


def test_resuming_from_a_file_that_is_not_a_checkpoint_says_so(tmp_path):
    path = tmp_path / "other.pt"
    torch.save({"a": torch.zeros(2)}, path)
    with pytest.raises(ValueError, match="not a graphppl checkpoint file"):
        ppl.infer(_normal, torch.randn(10), backend="svi", num_steps=5, resume=str(path), progress=False)


@ppl.model
def _normal(y):
    mu = ppl.sample("mu", ppl.dist.Normal(0.0, 10.0))
    with ppl.plate("data", y.shape[0]):
        ppl.sample("y", ppl.dist.Normal(mu, 1.0), obs=y)


def test_resuming_a_different_fit_is_refused(tmp_path):
    """A checkpoint of a fit with other parameter shapes: a clear error, not a silent mix."""
    path = tmp_path / "fit.ckpt"
    ppl.infer(_normal, torch.randn(10), backend="svi", num_steps=5, checkpoint=str(path), progress=False)
    with pytest.raises(ValueError, match="do not match this fit's"):
        ppl.infer(ppl.models.gmm.model, torch.randn(20, 2), backend="svi", num_steps=5, model_kwargs={"K": 2},
                  resume=str(path), progress=False)
