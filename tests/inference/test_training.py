"""The shared training loops (inference/training.py): L-BFGS for deterministic objectives (the exact backend's
MAP), checked against closed-form minima, and its guards (budget, leaving the domain)."""

import copy
import io
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pyro
import pytest
import torch

import ppl
from ppl.inference import chains, compiled, training
from ppl.inference.training import Interrupted, NotConverged, optimize, optimize_lbfgs, progress_bar
from ppl.models import hmm as hmm_lib
from tests.ppl.models_for_tests import normal_normal


def _objective(f, x0):
    x = torch.tensor(x0, dtype=torch.float64, requires_grad=True)
    return x, (lambda: (f(x), [x]))


def test_lbfgs_finds_the_minimum_of_a_rosenbrock_valley():
    x, step = _objective(lambda x: (1 - x[0]) ** 2 + 100 * (x[1] - x[0] ** 2) ** 2, [-1.2, 1.0])
    history = optimize_lbfgs(step, 500, progress=False, desc="test")
    assert torch.allclose(x.detach(), torch.ones(2, dtype=torch.float64), atol=1e-5)
    assert len(history) < 200 and history[-1] <= history[0]


def _rosenbrock(x):
    return (1 - x[0]) ** 2 + 100 * (x[1] - x[0] ** 2) ** 2 + (x[2] - x[1]) ** 2


def test_lbfgs_evaluates_the_points_torchs_lbfgs_evaluates():
    """Oracle: torch.optim.LBFGS (history 20, strong Wolfe, blocks of 10 iterations: its step() called until it stops
    moving) on a
    3-D Rosenbrock valley in float64. optimize_lbfgs runs the same iterations without torch re-evaluating the
    starting point of each step() call: the sequence of evaluated points is torch's with those repeats removed,
    equal to round-off, and both end at the minimum (1, 1, 1)."""
    x0 = [-1.2, 1.0, 0.5]
    seen = []

    def recorded(x):
        def step():
            seen.append(x.detach().clone())
            return _rosenbrock(x), [x]
        return step

    x, _ = _objective(_rosenbrock, x0)
    ours_step = recorded(x)
    history = optimize_lbfgs(ours_step, 1000, progress=False, desc="test", rel_tol=0.0)
    ours, seen = seen, []
    y = torch.tensor(x0, dtype=torch.float64, requires_grad=True)
    optim = torch.optim.LBFGS([y], lr=1.0, max_iter=training.LBFGS_BLOCK_ITERS, max_eval=training.LBFGS_BLOCK_EVALS,
                              history_size=training.LBFGS_HISTORY, tolerance_grad=1e-9, tolerance_change=1e-12,
                              line_search_fn="strong_wolfe")
    theirs_step = recorded(y)

    def closure():
        optim.zero_grad()
        loss = theirs_step()[0]
        loss.backward()
        return loss

    while True:
        before = len(seen)
        optim.step(closure)
        if len(seen) == before + 1:        # only torch's re-evaluation of the starting point: it stopped
            break
    theirs = [p for i, p in enumerate(seen) if i == 0 or not torch.equal(p, seen[i - 1])]
    ours = [p for i, p in enumerate(ours) if i == 0 or not torch.equal(p, ours[i - 1])]
    assert len(ours) == len(theirs) == len(history) and len(ours) > 30
    for a, b in zip(ours, theirs):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-12)
    assert torch.allclose(x.detach(), torch.ones(3, dtype=torch.float64), atol=1e-6)
    assert torch.allclose(y.detach(), torch.ones(3, dtype=torch.float64), atol=1e-6)


def test_lbfgs_keeps_to_its_evaluation_budget():
    """Line-search trials count: a budget of n evaluations means n calls of the objective (the first included)."""
    for budget in (1, 2, 7, 30, 31):
        x, step = _objective(_rosenbrock, [-1.2, 1.0, 0.5])
        calls = [0]

        def counted():
            calls[0] += 1
            return step()

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NotConverged)
            history = optimize_lbfgs(counted, budget, progress=False, desc="test")
        assert calls[0] == len(history) == budget


def test_lbfgs_never_keeps_a_point_outside_the_domain():
    """f(x) = x - log x (minimum at 1) is NaN for x < 0: trial points there are refused, the fit ends at 1."""
    x, step = _objective(lambda x: (x - torch.log(x)).sum(), [30.0])
    optimize_lbfgs(step, 200, progress=False, desc="test")
    assert abs(float(x.detach()) - 1.0) < 1e-5


def test_lbfgs_warns_when_the_budget_ends_before_convergence():
    x, step = _objective(lambda x: (1 - x[0]) ** 2 + 100 * (x[1] - x[0] ** 2) ** 2, [-1.2, 1.0])
    with pytest.warns(NotConverged, match="raise num_steps"):
        optimize_lbfgs(step, 5, progress=False, desc="test")
    with pytest.raises(ValueError, match="num_steps must be an integer >= 1"):
        optimize_lbfgs(step, 2.5, progress=False, desc="test")


def test_exact_map_by_lbfgs_reaches_adams_optimum_or_better():
    """The exact backend's default L-BFGS MAP vs 2000 Adam steps on a Gaussian HMM: same point, log evidence
    at least as high, in far fewer evaluations."""
    sim = hmm_lib.simulate(seed=0, N=2, T=100)
    init = hmm_lib.init_values(sim.args[0], 3)
    fits = {opt: ppl.infer(hmm_lib.hmm, *sim.args, model_kwargs=sim.kwargs, optimizer=opt, init=init, restarts=1,
                           progress=False,
                           **({"num_steps": 2000, "lr": 0.05} if opt == "adam" else {}))
            for opt in ("lbfgs", "adam")}
    lbfgs, adam = fits["lbfgs"], fits["adam"]
    assert lbfgs.backend == "exact" and len(lbfgs.history) < 300
    assert lbfgs.log_evidence.value >= adam.log_evidence.value - 1e-3
    assert torch.allclose(lbfgs.point["loc"], adam.point["loc"], atol=0.02)


def test_progress_bars_redraw_rarely_when_stderr_is_not_a_terminal(monkeypatch):
    """In a log (stderr not a terminal) a bar redraws at most every 30 s; on a terminal every 0.5 s."""
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    assert progress_bar("fit", 1000, True).mininterval == 30.0
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    assert progress_bar("fit", 1000, True).mininterval == 0.5


def _stopping_after(n: int, step):
    """``step`` that raises KeyboardInterrupt (a Ctrl-C) at its ``n + 1``-th call."""
    calls = [0]

    def wrapped():
        calls[0] += 1
        if calls[0] > n:
            raise KeyboardInterrupt
        return step()

    return wrapped


def test_ctrl_c_stops_the_loops_and_keeps_the_state_reached():
    x, step = _objective(lambda x: ((x - 3.0) ** 2).sum(), [0.0, 0.0])
    with pytest.warns(Interrupted, match="after 5 of 100 steps"):
        history = optimize(_stopping_after(5, step), 100, 0.1, progress=False, desc="test")
    assert history.interrupted and len(history) == 5 and 0 < float(x.detach()[0]) < 3
    x, step = _objective(lambda x: (1 - x[0]) ** 2 + 100 * (x[1] - x[0] ** 2) ** 2, [-1.2, 1.0])
    with pytest.warns(Interrupted):
        history = optimize_lbfgs(_stopping_after(8, step), 500, progress=False, desc="test")
    assert history.interrupted and len(history) == 8
    assert float(history[0]) > min(history)                           # the best point reached is kept
    with pytest.raises(KeyboardInterrupt):                             # nothing reached: nothing to return
        optimize(_stopping_after(0, step), 100, 0.1, progress=False, desc="test")


def test_an_interrupted_fit_returns_a_posterior_marked_interrupted(monkeypatch):
    """ppl.infer with Ctrl-C after 12 SVI steps: a usable Posterior of the state reached, marked, with its history."""
    original = training.objective
    monkeypatch.setattr(training, "objective", lambda *a: _stopping_after(12, original(*a)))
    y = 1.0 + torch.randn(20)
    with pytest.warns(Interrupted):
        post = ppl.infer(normal_normal, y, backend="svi", num_steps=500, num_samples=10, progress=False)
    assert post.interrupted and len(post.history) == 12 and "interrupted" in repr(post)
    assert post.sample(5)["mu"].shape == (5,)


def test_an_interrupted_exact_fit_keeps_its_best_point(monkeypatch):
    original = training.objective
    monkeypatch.setattr(training, "objective", lambda *a: _stopping_after(10, original(*a)))
    sim = hmm_lib.simulate(seed=0, N=1, T=50)
    with pytest.warns(Interrupted):
        post = ppl.infer(hmm_lib.hmm, *sim.args, model_kwargs=sim.kwargs, restarts=1, progress=False,
                         init=hmm_lib.init_values(sim.args[0], 3))
    assert post.backend == "exact" and post.interrupted and len(post.history) == 10
    assert post.viterbi("z").shape == (1, 50)


@pytest.mark.parametrize("max_grad_norm", [None, 10.0])
def test_optimize_takes_the_steps_of_torchs_adam_with_clipping(max_grad_norm):
    """optimize's Adam (fused where PyTorch has it) against the per-tensor torch.optim.Adam with the same
    gradient-norm clipping (none by default), 50 steps on a float64 quadratic with two parameters: the same
    iterates to round-off and the recorded losses are the objective's values before each step."""
    target = torch.tensor([3.0, -2.0, 0.5], dtype=torch.float64)

    def make():
        a = torch.zeros(3, dtype=torch.float64, requires_grad=True)
        b = torch.ones((), dtype=torch.float64, requires_grad=True)
        return a, b, (lambda: (((a - target) ** 2).sum() * 4 + (b - 2) ** 4, [a, b]))

    a, b, step = make()
    history = optimize(step, 50, 0.1, False, "test", max_grad_norm=max_grad_norm)
    ra, rb, reference = make()
    optim = torch.optim.Adam([ra, rb], lr=0.1, foreach=False)
    losses = []
    for _ in range(50):
        loss, _ = reference()
        losses.append(float(loss.detach()))
        optim.zero_grad()
        loss.backward()
        if max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_([ra, rb], max_grad_norm)
        optim.step()
    assert history == pytest.approx(losses, rel=1e-10, abs=1e-12)
    torch.testing.assert_close(a.detach(), ra.detach(), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(b.detach(), rb.detach(), rtol=1e-10, atol=1e-12)


def test_fused_adam_makes_torchs_fused_adam_update_bitwise():
    """``training.FusedAdam`` (the fused kernel called directly, no torch.optim.Optimizer) against an identical
    ``torch.optim.Adam(fused=True)``: 6 steps of random float32 gradients over three parameters, one of them without
    a gradient at step 2, the rate changed between steps (a schedule): bitwise the same parameters, moments and
    step counts. Its ``state_dict`` loads into a torch Adam and a torch Adam's into it, and both continue
    identically; float64 parameters too; integer parameters or mixed dtypes are not its to take."""
    gen = torch.Generator().manual_seed(0)
    shapes = ((3,), (2, 4), ())
    start = [torch.randn(shape, generator=gen) for shape in shapes]
    ours = [x.clone().requires_grad_(True) for x in start]
    theirs = [x.clone().requires_grad_(True) for x in start]
    opt_ours, opt_theirs = training.adam(ours, 0.05), torch.optim.Adam(theirs, lr=0.05, fused=True)
    assert isinstance(opt_ours, training.FusedAdam)
    for n in range(6):
        grads = [torch.randn(shape, generator=gen) * 10 ** (n % 3 - 1) for shape in shapes]
        for i, (p, q, g) in enumerate(zip(ours, theirs, grads)):
            p.grad, q.grad = (None, None) if (n, i) == (2, 1) else (g.clone(), g.clone())
        for opt in (opt_ours, opt_theirs):
            opt.param_groups[0]["lr"] = 0.05 / (1 + n)
        opt_ours.step()
        opt_theirs.step()
        for p, q in zip(ours, theirs):
            assert torch.equal(p.detach(), q.detach())
            for key in ("step", "exp_avg", "exp_avg_sq"):
                assert torch.equal(opt_ours.state[p][key], opt_theirs.state[q][key])
    into_torch = [x.detach().clone().requires_grad_(True) for x in ours]
    into_ours = [x.detach().clone().requires_grad_(True) for x in ours]
    opt_torch = torch.optim.Adam(into_torch, lr=0.05, fused=True)
    opt_torch.load_state_dict(copy.deepcopy(opt_ours.state_dict()))
    opt_back = training.FusedAdam(into_ours, 0.05)
    opt_back.load_state_dict(copy.deepcopy(opt_theirs.state_dict()))
    for params in (ours, into_torch, into_ours):
        for p in params:
            p.grad = torch.ones_like(p)
    for opt in (opt_ours, opt_torch, opt_back):
        opt.step()
    assert all(torch.equal(p.detach(), q.detach()) and torch.equal(p.detach(), r.detach())
               for p, q, r in zip(ours, into_torch, into_ours))
    a64 = torch.randn(4, dtype=torch.float64, generator=gen).requires_grad_(True)
    b64 = a64.detach().clone().requires_grad_(True)
    o64, t64 = training.adam([a64], 0.1), torch.optim.Adam([b64], lr=0.1, fused=True)
    for _ in range(3):
        a64.grad = b64.grad = (a64.detach() - 1) ** 3
        o64.step()
        t64.step()
    assert torch.equal(a64.detach(), b64.detach())
    assert not training.FusedAdam.supports([torch.zeros(2, dtype=torch.float64), torch.zeros(2)])
    assert not training.FusedAdam.supports([torch.zeros(2, dtype=torch.long)])


def test_the_first_fit_in_a_process_does_not_import_torch_dynamo():
    """``optimize``'s Adam (``FusedAdam``) and L-BFGS (``lbfgs_block``) use no torch.optim.Optimizer, whose first
    ``add_param_group`` imports torch._dynamo (~1 s): a fresh process fits by both without importing it."""
    code = textwrap.dedent("""
        import sys, torch
        from ppl.inference import training
        x = torch.zeros(3, requires_grad=True)
        step = lambda: (((x - 2) ** 2).sum(), [x])
        training.optimize(step, 20, 0.1, False, "adam")
        training.optimize_lbfgs(step, 20, False, "lbfgs")
        print("torch._dynamo" in sys.modules)
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).resolve().parents[2])
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "False"


@pytest.mark.parametrize("optimizer, guide, num_steps, recorded_at", [
    ("adam", "normal", compiled.RECORD_AFTER, 1),          # a long Adam fit: recorded at its first step
    ("adam", "normal", 20, None),                          # a short one: never
    ("lbfgs", "delta", compiled.RECORD_AFTER, None)])      # L-BFGS converges early: never (a few evaluations)
def test_a_fit_known_to_be_long_records_its_density_at_once(monkeypatch, optimizer, guide, num_steps, recorded_at):
    """fit_guide passes ``record_after(optimizer, num_steps)``: an Adam fit of at least ``compiled.RECORD_AFTER``
    steps records the density at its first evaluation (no interpreted steps first), a shorter fit or an L-BFGS
    fit only after ``compiled.RECORD_AFTER`` evaluations. Float64 normal-normal: the fit's losses equal those of
    the same fit on the interpreter (``trace=False``, same seed) to 1e-6 relative, step by step; the L-BFGS MAP
    is the closed-form posterior mode."""
    steps = []
    original = compiled.guide_objective

    def spy(*args, **kwargs):
        steps.append(original(*args, **kwargs))
        return steps[-1]

    monkeypatch.setattr(compiled, "guide_objective", spy)
    y = torch.tensor([0.5, 2.0, 1.5], dtype=torch.float64)
    kwargs = {"prior_loc": torch.tensor(1.0, dtype=torch.float64)}
    plan = ppl.compile(normal_normal, y, **kwargs, backend="svi")
    fmodel = chains.fit_model(normal_normal, plan.facts)
    histories = []
    for trace in (True, False):
        with pyro.get_param_store().scope():
            pyro.set_rng_seed(0)
            fitted, _, history = training.fit_guide(fmodel, (y,), kwargs, plan, guide, num_steps, 0.05, False,
                                                    optimizer=optimizer, trace=trace)
            histories.append(history)
            if trace:
                assert training.record_after(optimizer, num_steps) == (recorded_at or compiled.RECORD_AFTER)
                assert bool(steps[0].density.recorded) == (recorded_at is not None)
                if recorded_at is not None:
                    assert steps[0].density.reason is None and sum(steps[0].density.calls.values()) == recorded_at
            elif optimizer == "lbfgs":
                precision = 1 / 2.0 ** 2 + 3 / 1.5 ** 2
                mode = (1.0 / 2.0 ** 2 + float(y.sum()) / 1.5 ** 2) / precision
                assert float(fitted.median()["mu"]) == pytest.approx(mode, abs=1e-5)
    assert histories[0] == pytest.approx(histories[1], rel=1e-6)


@pytest.mark.parametrize("scale", [0.1, 1.0, 50.0])
def test_clip_gradients_is_torchs_clip_grad_norm(scale):
    """``training.clip_gradients`` against ``torch.nn.utils.clip_grad_norm_`` (max norm 10) on gradients whose total
    norm is below, near and above the bound: bitwise the same gradients."""
    gen = torch.Generator().manual_seed(0)
    grads = [scale * torch.randn(shape, generator=gen) for shape in ((3,), (2, 4), ())]
    ours = [torch.zeros_like(g, requires_grad=True) for g in grads]
    theirs = [torch.zeros_like(g, requires_grad=True) for g in grads]
    for p, q, g in zip(ours, theirs, grads):
        p.grad, q.grad = g.clone(), g.clone()
    training.clip_gradients(ours, 10.0)
    torch.nn.utils.clip_grad_norm_(theirs, 10.0)
    for p, q in zip(ours, theirs):
        assert torch.equal(p.grad, q.grad)
