"""The training loops every optimizing backend shares, Pyro ELBOs, autoguide fits.

``optimize`` runs Adam (stochastic objectives: SVI, the SVAE); ``optimize_lbfgs`` runs L-BFGS with a
strong-Wolfe line search on a deterministic objective (the exact backend's MAP on the exact marginal
likelihood, where a quasi-Newton method converges in tens of evaluations instead of hundreds of Adam
steps). ``fit_guide`` fits an AutoNormal / AutoDelta guide on the model a backend prepared (chains
collapsed, discrete sites enumerated); ``init_fn`` is the initialization the backends use.
"""
from __future__ import annotations

import math
import sys
import warnings
from typing import Any, Callable

import pyro
import pyro.poutine as poutine
import torch
from pyro.infer import Trace_ELBO, TraceEnum_ELBO
from pyro.infer.autoguide import AutoDelta, AutoNormal, init_to_median, init_to_value
from torch.optim.lbfgs import _strong_wolfe
from torch.utils._foreach_utils import _get_fused_kernels_supported_devices
from tqdm.auto import tqdm

from . import compiled
from .checkpoints import Checkpoints, restore, rng_state, set_rng_state, snapshot

GUIDES = {"normal": AutoNormal, "delta": AutoDelta}


def max_plate_nesting(graph) -> int:
    """The most plates any site of ``graph`` sits in."""
    return max([len(s.plates) for s in graph.sites()] + [0])


def _unvalidated(loss_fn: Callable[[], torch.Tensor]) -> Callable[[], torch.Tensor]:
    """``loss_fn`` with Pyro's distribution validation off. The compiler's trace validated the model's
    distributions and data once; inside the fit every value comes through a transform into its support, and
    re-checking constraints (e.g. LKJ's Cholesky factor) at every step is a third of the cost of a small model.
    A non-finite objective still stops the fit."""

    def run() -> torch.Tensor:
        with pyro.validation_enabled(False):
            return loss_fn()

    return run


def progress_bar(desc: str, total: int, enabled: bool) -> tqdm:
    """A tqdm bar over ``total`` steps: redrawn every 0.5 s on a terminal, every 30 s when stderr is a file or
    a pipe (a log gets a few lines, not one carriage return per redraw)."""
    interactive = getattr(sys.stderr, "isatty", lambda: False)()
    return tqdm(total=total, desc=desc, disable=not enabled, leave=False, mininterval=0.5 if interactive else 30.0)


def traced_loss(loss_fn: Callable[[], torch.Tensor]) -> Callable[[], tuple[torch.Tensor, list]]:
    """Wrap a loss so that it also returns the unconstrained Pyro parameters it touched."""

    def step():
        with poutine.trace(param_only=True) as tr:
            loss = loss_fn()
        return loss, [site["value"].unconstrained() for site in tr.trace.nodes.values()]

    return step


class History(list):
    """The objective per step (a list of floats); ``interrupted`` is True when the user stopped the fit (Ctrl-C)
    and the parameters are the state reached."""

    interrupted: bool = False
    lbfgs: Any = None  # optimize_lbfgs: its final LbfgsState, to continue the run (its ``memory``)


class Interrupted(UserWarning):
    """A fit was stopped by the user (KeyboardInterrupt); the result holds the state reached."""


def mark_interrupted(history: History, desc: str, total: int) -> History:
    """Mark ``history`` interrupted and say so; a fit stopped before its first step has no state to return."""
    if not history:
        raise KeyboardInterrupt(f"{desc}: interrupted before the first step")
    history.interrupted = True
    warnings.warn(f"{desc}: interrupted by the user after {len(history)} of {total} steps; the result holds the "
                  "state reached (post.interrupted is True)", Interrupted, stacklevel=4)
    return history


def optimize(step: Callable[[], tuple[torch.Tensor, list]], num_steps: int, lr: float, progress: bool,
             desc: str, checkpoints: Checkpoints | None = None, extra: LoopState | None = None,
             after_backward: Callable[[list], None] | None = None,
             schedule: Callable[[int, int], float] | None = None, max_grad_norm: float | None = None) -> History:
    """Adam on ``step() -> (loss, params)``; the parameters are those of the first step (guides create theirs
    lazily). ``max_grad_norm``: clip the gradients' joint 2-norm to it (``clip_gradients``; the network fits of the
    svae and amortized backends use 10); None (the default, as Pyro's SVI) does not clip, because clipping a noisy
    ELBO gradient biases where the fit settles: the steps whose draw gives a large gradient are shrunk more, so the
    scale of an AutoNormal guide ends too wide (a Bayesian linear regression with 80 rows: 1.2-1.35 x the
    mean-field optimum with clipping at 10, 0.93-1.1 x without; ``tests/inference/test_svi.py``).
    A step with an attribute ``direct() -> (loss, [(param, gradient), ...]) or None``
    (``compiled.guide_objective``'s) gives the gradients itself where it can (no autograd pass), else the loss is
    differentiated. Returns the loss per step; Ctrl-C stops the loop
    and returns what was reached (``History.interrupted``).

    ``checkpoints`` (``checkpoints.py``): the loop's state is written every ``checkpoints.every`` steps, at the
    end and on Ctrl-C; a saved state of this loop is restored (finished) or continued from its step with its
    Adam moments and RNG state (partial): bit-identical to the uninterrupted run. ``extra`` carries state the
    step itself updates outside the parameters (the SVAE's conjugate q's). ``after_backward(params)`` runs
    between the gradient and the step (data parallel: averaging the gradients over processes).
    ``schedule(step, num_steps)`` multiplies ``lr`` at each step (e.g. ``cosine_tail``): a function of the step
    index only, so a resumed fit follows it exactly.
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    key = checkpoints.key(desc) if checkpoints else None
    saved = checkpoints.resumed(key) if checkpoints else None
    history = History()
    bar = progress_bar(desc, num_steps, progress)
    loss, touched = step()
    params = list({id(p): p for p in touched}.values())
    optim = adam(params, lr)
    if saved is not None:
        history = _resume(saved, params, optim, extra)
        loss = None
        bar.update(len(history))
        if saved["done"]:
            bar.close()
            return history
    boundary, written = rng_state(), len(history)

    def state(done: bool) -> dict:
        return {"step": len(history), "done": done, "params": snapshot(params), "optim": optim.state_dict(),
                "rng": boundary, "history": list(history), "extra": extra.get() if extra else None}

    direct = getattr(step, "direct", None)  # the loss and gradients without autograd, when the step offers it
    param_ids = {id(p) for p in params}
    try:
        for _ in range(len(history), num_steps):
            bar.update()
            grads = None
            if loss is None:
                evaluated = direct() if direct is not None else None
                loss, grads = evaluated if evaluated is not None else (step()[0], None)
            if schedule is not None:
                for group in optim.param_groups:
                    group["lr"] = lr * schedule(len(history), num_steps)
            value = float(loss.detach())  # the one host sync of the step
            if not math.isfinite(value):
                raise FloatingPointError(f"{desc}: the objective became {value} at step {len(history) + 1}; "
                                         "lower lr= or check the model's parameters")
            if grads is None or {id(param) for param, _ in grads} != param_ids:
                optim.zero_grad()
            if grads is None:
                loss.backward()
            else:  # every parameter's gradient is replaced: no zero_grad
                for param, grad in grads:  # a graph run under inference_mode gives tensors not to write into
                    param.grad = grad.clone() if grad.is_inference() else grad
            if after_backward is not None:
                after_backward(params)
            if max_grad_norm is not None:
                clip_gradients(params, max_grad_norm)
            optim.step()
            history.append(value)
            loss = None
            if progress:
                bar.set_postfix(loss=f"{value:.4g}", refresh=False)
            if checkpoints:
                boundary = rng_state()
                if checkpoints.due(len(history), written):
                    checkpoints.write(key, state(False))
                    written = len(history)
        if checkpoints:
            checkpoints.write(key, state(True))
    except KeyboardInterrupt:
        if checkpoints and history:
            checkpoints.write(key, state(False))
        mark_interrupted(history, desc, num_steps)
    finally:
        bar.close()
    return history


def clip_gradients(params: list, max_norm: float) -> None:
    r"""``torch.nn.utils.clip_grad_norm_``'s rule: when the 2-norm of all the gradients together exceeds
    ``max_norm``, every gradient is multiplied by ``max_norm / (norm + 1e-6)``. Gradients within the bound are
    left as they are (torch multiplies them by 1.0: the same numbers, four more small ops per step); the one
    host read of the norm is what a CPU step pays anyway. Gradients on several devices or of several dtypes go
    through torch's function."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    if len({(g.device, g.dtype) for g in grads}) > 1:
        torch.nn.utils.clip_grad_norm_(params, max_norm)
        return
    total = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
    if not float(total) <= max_norm:  # NaN too: torch's rule then makes every gradient NaN
        torch._foreach_mul_(grads, (max_norm / (total + 1e-6)).clamp(max=1.0))


def adam(params: list, lr: float):
    """Adam over ``params`` (torch.optim.Adam's defaults): ``FusedAdam`` where PyTorch has a fused kernel for them
    (CPU and CUDA floating tensors of one device and dtype: a third of the time of the per-tensor loop on a small
    model), else ``torch.optim.Adam``. Same update rule either way (round-off aside)."""
    if FusedAdam.supports(params):
        return FusedAdam(params, lr)
    return torch.optim.Adam(params, lr=lr)


class FusedAdam:
    r"""Adam by PyTorch's fused kernel ``torch._fused_adam_``, bitwise ``torch.optim.Adam(params, lr, fused=True)``
    (the same kernel on the same state) without ``torch.optim.Optimizer``: its first ``add_param_group`` imports
    ``torch._dynamo`` (~1 s, once a process: half of a 2000-step GMM fit) and its ``step`` spends ~100 us of Python
    a call (hooks, profiler scope, regrouping the tensors by device). Per parameter with gradient g at step t:
    :math:`m \leftarrow eta_1 m + (1 - eta_1) g`, :math:`v \leftarrow eta_2 v + (1 - eta_2) g^2`,
    :math:`	heta \leftarrow 	heta - lr\,\hat m / (\sqrt{\hat v} + \epsilon)` with the bias-corrected
    :math:`\hat m = m / (1 - eta_1^t)`, :math:`\hat v = v / (1 - eta_2^t)`; betas (0.9, 0.999), eps 1e-8.

    What ``optimize`` reads of an optimizer: ``param_groups`` (one group; a schedule sets its ``"lr"``), ``state``
    (param -> step (float32 0-dim), exp_avg, exp_avg_sq), ``zero_grad``, ``step`` and ``state_dict`` /
    ``load_state_dict`` in torch.optim's format (a checkpoint written by either loads into the other)."""

    def __init__(self, params: list, lr: float):
        self.param_groups = [{"params": list(params), "lr": lr, "betas": (0.9, 0.999), "eps": 1e-8,
                              "weight_decay": 0, "amsgrad": False, "maximize": False, "foreach": None,
                              "capturable": False, "differentiable": False, "fused": True,
                              "decoupled_weight_decay": False}]
        self.state: dict = {}

    @staticmethod
    def supports(params: list) -> bool:
        """Floating parameters, all on one device and of one dtype, that PyTorch's fused Adam kernel takes."""
        kinds = {(p.device, p.dtype) for p in params}
        if not params or len(kinds) != 1 or not hasattr(torch, "_fused_adam_"):
            return False
        device, dtype = kinds.pop()
        return dtype.is_floating_point and device.type in _get_fused_kernels_supported_devices()

    def zero_grad(self) -> None:
        for p in self.param_groups[0]["params"]:
            p.grad = None

    def _state_of(self, p: torch.Tensor) -> dict:
        if p not in self.state:  # torch.optim.Adam's _init_group for fused=True
            self.state[p] = {"step": torch.tensor(0.0, dtype=torch.float32, device=p.device),
                             "exp_avg": torch.zeros_like(p, memory_format=torch.preserve_format),
                             "exp_avg_sq": torch.zeros_like(p, memory_format=torch.preserve_format)}
        return self.state[p]

    def step(self) -> None:
        """One Adam update of the parameters that have a gradient."""
        group = self.param_groups[0]
        params = [p for p in group["params"] if p.grad is not None]
        if not params:
            return
        states = [self._state_of(p) for p in params]
        steps = [s["step"] for s in states]
        beta1, beta2 = group["betas"]
        with torch.no_grad():
            torch._foreach_add_(steps, 1)
            torch._fused_adam_(params, [p.grad for p in params], [s["exp_avg"] for s in states],
                               [s["exp_avg_sq"] for s in states], [], steps, amsgrad=False, lr=group["lr"],
                               beta1=beta1, beta2=beta2, weight_decay=group["weight_decay"], eps=group["eps"],
                               maximize=False, grad_scale=None, found_inf=None)

    def state_dict(self) -> dict:
        """torch.optim's layout: ``{"state": {index: {...}}, "param_groups": [{..., "params": [indices]}]}``."""
        params = self.param_groups[0]["params"]
        group = {k: v for k, v in self.param_groups[0].items() if k != "params"}
        return {"state": {i: dict(self.state[p]) for i, p in enumerate(params) if p in self.state},
                "param_groups": [dict(group, params=list(range(len(params))))]}

    def load_state_dict(self, saved: dict) -> None:
        """Load a ``state_dict`` of this class or of a one-group ``torch.optim.Adam`` over the same parameters
        (moments cast to each parameter's dtype and device, the step count to float32 as fused Adam keeps it)."""
        params = self.param_groups[0]["params"]
        (group,) = saved["param_groups"]
        if len(group["params"]) != len(params):
            raise ValueError(f"the saved Adam state has {len(group['params'])} parameters, this fit {len(params)}")
        self.param_groups[0].update({k: v for k, v in group.items() if k != "params"})
        self.state = {}
        for index, p in zip(group["params"], params):
            if index in saved["state"]:
                s = saved["state"][index]
                self.state[p] = {"step": s["step"].to(device=p.device, dtype=torch.float32),
                                 "exp_avg": s["exp_avg"].to(device=p.device, dtype=p.dtype),
                                 "exp_avg_sq": s["exp_avg_sq"].to(device=p.device, dtype=p.dtype)}


def cosine_tail(step: int, num_steps: int, start: float = 0.5, floor: float = 0.1) -> float:
    """1 for the first ``start`` fraction of the steps, then a cosine down to ``floor``: noisy (one-draw ELBO,
    minibatch) gradients settle at the end instead of leaving the last iterate wherever the constant step put it."""
    begin = start * num_steps
    if step < begin:
        return 1.0
    progress = (step - begin) / max(1.0, num_steps - begin)
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


class LoopState:
    """State a loop's step updates outside its parameters, saved with its checkpoints: ``get() -> value``,
    ``set(value)``."""

    def __init__(self, get: Callable[[], Any], set: Callable[[Any], None]):  # noqa: A002
        self.get, self.set = get, set


def _resume(saved: dict, params: list, optim, extra: LoopState | None) -> History:
    """Load a loop's saved state into its parameters, optimizer, RNG and ``extra``; its history so far."""
    restore(params, saved["params"])
    optim.load_state_dict(saved["optim"])
    set_rng_state(saved["rng"])
    if extra is not None and saved.get("extra") is not None:
        extra.set(saved["extra"])
    return History(saved["history"])


class NotConverged(UserWarning):
    """An optimization stopped at its step budget while the objective was still changing."""


MOVING_WINDOW = 0.1    # the last two windows of this fraction of the steps (at least 20 steps each) are compared
MOVING_TOLERANCE = 1e-3  # an objective still improving by more than this relative amount per window warns


def still_moving(history, window: float = MOVING_WINDOW) -> tuple[float, float, int] | None:
    r"""``(drop, level, w)`` when the noisy objective ``history`` (a loss per step) still decreases at the end: the
    median over the last window of ``w = max(20, window * len)`` steps is below the median over the window before
    by ``drop`` > 4 standard errors (of the last window's median, :math:`1.25 \cdot 1.4826\,\mathrm{MAD}/\sqrt w`:
    robust to the heavy-tailed one-draw losses of, e.g., a log-link likelihood, whose few huge values would hide a
    falling trend from a mean and a standard deviation) and > ``MOVING_TOLERANCE * (|level| + 1)`` (level: the last
    window's median); None otherwise or when the history is shorter than 2 w."""
    w = max(20, int(window * len(history)))
    if len(history) < 2 * w:
        return None
    last = torch.tensor(history[-w:], dtype=torch.float64)
    previous = torch.tensor(history[-2 * w:-w], dtype=torch.float64)
    level = float(last.median())
    drop = float(previous.median()) - level
    se = 1.25 * 1.4826 * float((last - level).abs().median()) / math.sqrt(w)
    if drop > 4 * se and drop > MOVING_TOLERANCE * (abs(level) + 1):
        return drop, level, w
    return None


def warn_if_still_moving(history, name: str) -> None:
    """Warn ``NotConverged`` (naming the backend ``name``) when a stochastic fit's objective was still improving
    at the end (``still_moving``)."""
    moving = still_moving(list(history))
    if moving is not None:
        drop, level, w = moving
        warnings.warn(f"{name}: the negative ELBO was still falling at the end ({drop:.4g} lower over the last {w} "
                      f"steps, now {level:.4g}): the fit has not converged; give more num_steps= (or a larger lr=)",
                      NotConverged, stacklevel=4)


def _finite_grads(params) -> bool:
    """Whether every gradient of ``params`` is finite (one host read)."""
    grads = [p.grad.reshape(-1) for p in params if p.grad is not None]
    return not grads or bool(torch.isfinite(torch.cat(grads)).all())


LBFGS_HISTORY = 20       # curvature pairs kept
LBFGS_BLOCK_ITERS = 10   # iterations of a block (torch.optim.LBFGS's max_iter: one ``step`` call); the stopping
# rule compares the best loss before and after a block: 10 iterations stopped the library GMM on iris and a Gaussian
# HMM on yearly sunspots at the optimum of 20 with 13-21 fewer evaluations, 5 stopped the HMM 0.002 nats short
LBFGS_BLOCK_EVALS = 12   # evaluations of a block (its max_eval: max_iter * 5 // 4, torch's default ratio)
LBFGS_TOL_GRAD = 1e-9    # a gradient whose largest entry is below this is a stationary point
LBFGS_TOL_CHANGE = 1e-12  # a step, directional derivative or loss change below this ends a block


class LbfgsState:
    r"""What L-BFGS carries between iterations (all on the parameters' device and dtype, ``n`` = number of
    parameter entries): the current loss and flat gradient ``(n,)``, the gradient before the last step
    ``prev_grad``, the last direction ``d`` and step length ``t``, the curvature pairs :math:`s_i = t_i d_i`,
    :math:`y_i = g_{i+1} - g_i` (at most ``LBFGS_HISTORY``) with :math:`\rho_i = 1 / y_i^\top s_i`, the initial
    inverse-Hessian scale :math:`\gamma = y^\top s / y^\top y` and the iteration count. ``as_dict``/``from_dict``:
    the form a checkpoint stores."""

    FIELDS = ("loss", "grad", "prev_grad", "d", "t", "dirs", "steps", "ro", "h_diag", "n_iter")

    def __init__(self, loss: float, grad: torch.Tensor):
        self.loss, self.grad = loss, grad
        self.d, self.t, self.prev_grad = None, None, None
        self.dirs, self.steps, self.ro = [], [], []
        self.h_diag, self.n_iter = 1.0, 0

    def as_dict(self) -> dict:
        return {name: getattr(self, name) for name in self.FIELDS}

    @classmethod
    def from_dict(cls, saved: dict) -> "LbfgsState":
        state = cls(saved["loss"], saved["grad"])
        for name in cls.FIELDS:
            setattr(state, name, saved[name])
        return state


def lbfgs_direction(state: LbfgsState) -> torch.Tensor:
    r"""The quasi-Newton direction :math:`d = -H g` ``(n,)`` by the two-loop recursion over the stored pairs, with
    :math:`H_0 = \gamma I` (Nocedal & Wright, Algorithm 7.4; torch.optim.LBFGS's arithmetic)."""
    q = state.grad.neg()
    alphas = [None] * len(state.dirs)
    for i in range(len(state.dirs) - 1, -1, -1):
        alphas[i] = state.steps[i].dot(q) * state.ro[i]
        q.add_(state.dirs[i], alpha=-alphas[i])
    r = torch.mul(q, state.h_diag)
    for i in range(len(state.dirs)):
        beta = state.dirs[i].dot(r) * state.ro[i]
        r.add_(state.steps[i], alpha=alphas[i] - beta)
    return r


def lbfgs_remember(state: LbfgsState) -> None:
    r"""Store the pair of the last step, :math:`s = t d`, :math:`y = g - g_{prev}` (``state.prev_grad``), when the
    curvature condition :math:`y^\top s > 10^{-10}` holds (the oldest pair dropped beyond ``LBFGS_HISTORY``), and set
    :math:`\gamma = y^\top s / y^\top y`."""
    y = state.grad.sub(state.prev_grad)
    s = state.d.mul(state.t)
    ys = y.dot(s)
    if ys > 1e-10:
        if len(state.dirs) == LBFGS_HISTORY:
            state.dirs.pop(0), state.steps.pop(0), state.ro.pop(0)
        state.dirs.append(y)
        state.steps.append(s)
        state.ro.append(1.0 / ys)
        state.h_diag = ys / y.dot(y)


def _flat_grad(params: list) -> torch.Tensor:
    """The parameters' gradients as one flat vector ``(n,)`` (zeros where a parameter has none)."""
    return torch.cat([p.new_zeros(p.numel()) if p.grad is None else p.grad.reshape(-1) for p in params])


def _move(params: list, t: float, d: torch.Tensor) -> None:
    """``params += t * d`` in place, ``d`` flat ``(n,)`` in the parameters' order."""
    offset = 0
    with torch.no_grad():
        for p in params:
            p.add_(d[offset:offset + p.numel()].view_as(p), alpha=t)
            offset += p.numel()


def lbfgs_block(state: LbfgsState, params: list, evaluate: Callable[[], tuple[float, torch.Tensor]],
                budget: int) -> int:
    r"""Up to ``LBFGS_BLOCK_ITERS`` L-BFGS iterations from ``state`` (updated in place, ``params`` left at the last
    accepted point): torch.optim.LBFGS's ``step`` (strong-Wolfe line search, step length 1, or
    :math:`\min(1, 1/\|g\|_1)` at the very first iteration) without its evaluation of the starting point, which
    ``state`` already holds. ``evaluate() -> (loss, flat gradient)`` at the current ``params``; at most
    ``min(budget, LBFGS_BLOCK_EVALS)`` evaluations (a line search's trial points each count). Stops early at a
    stationary point or when the step, the directional derivative or the loss change falls below
    ``LBFGS_TOL_CHANGE``. Returns the number of evaluations."""
    if budget < 1 or float(state.grad.abs().max()) <= LBFGS_TOL_GRAD:
        return 0
    used = 0
    x0 = [p.detach().clone() for p in params]

    def along(x, t, d):  # the objective at x + t d; the parameters are put back at x
        _move(params, t, d)
        loss, grad = evaluate()
        with torch.no_grad():
            for p, v in zip(params, x):
                p.copy_(v)
        return loss, grad

    for _ in range(LBFGS_BLOCK_ITERS):
        state.n_iter += 1
        if state.n_iter == 1:
            state.d = state.grad.neg()
        else:
            lbfgs_remember(state)
            state.d = lbfgs_direction(state)
        state.prev_grad, previous_loss = state.grad.clone(), state.loss
        t = min(1.0, 1.0 / float(state.grad.abs().sum())) if state.n_iter == 1 else 1.0
        gtd = state.grad.dot(state.d)
        if gtd > -LBFGS_TOL_CHANGE:
            break
        with torch.no_grad():
            for p, v in zip(x0, params):
                p.copy_(v)
        max_ls = min(LBFGS_BLOCK_EVALS, budget) - 1 - used  # a line search evaluates at most max_ls + 1 points
        state.loss, state.grad, state.t, evals = _strong_wolfe(along, x0, t, state.d, state.loss, state.grad, gtd,
                                                               max_ls=max_ls)
        _move(params, state.t, state.d)
        used += evals
        if (used >= min(LBFGS_BLOCK_EVALS - 1, budget) or float(state.grad.abs().max()) <= LBFGS_TOL_GRAD
                or float(state.d.mul(state.t).abs().max()) <= LBFGS_TOL_CHANGE
                or abs(state.loss - previous_loss) < LBFGS_TOL_CHANGE):
            break
    return used


def optimize_lbfgs(step: Callable[[], tuple[torch.Tensor, list]], max_evals: int, progress: bool, desc: str,
                   rel_tol: float = 1e-7, warn: bool = True, checkpoints: Checkpoints | None = None,
                   memory: LbfgsState | None = None) -> History:
    r"""Minimize a deterministic ``step() -> (loss, params)`` by L-BFGS (history ``LBFGS_HISTORY``, strong-Wolfe
    line search; ``lbfgs_block``: torch.optim.LBFGS's iterations, not its optimizer object, whose first
    construction imports torch._dynamo, ~1 s, and which evaluates the starting point of every block again).

    Runs blocks of at most ``LBFGS_BLOCK_ITERS`` iterations and stops when a block changes the best loss by less
    than ``rel_tol * (1 + |loss|)`` (converged) or after ``max_evals`` objective evaluations in all, line-search
    trials included (then, if ``warn``, warns ``NotConverged`` naming the last change). The parameters end at the
    best finite loss seen: a line-search trial that leaves the domain (non-finite loss) is never kept.
    The first evaluation must succeed; later ones that raise ``ValueError``/``RuntimeError`` (the model refusing
    a line-search trial point, e.g. a transition matrix that overflowed) count as outside the domain.
    A step with an attribute ``direct() -> (loss, [(param, gradient), ...]) or None`` (``compiled.guide_objective``'s)
    gives the gradients itself where it can (a recorded density: no autograd pass).
    Returns the loss at every evaluation; Ctrl-C stops it at the best point so far (``History.interrupted``).
    ``checkpoints``: as ``optimize``, written between blocks once ``checkpoints.every`` evaluations have passed (a
    resumed loop continues with its curvature pairs and best point). ``memory``: the ``History.lbfgs`` of an earlier
    run that ended at this starting point (same parameters in the same order): its curvature pairs are kept, so the
    fit continues that run instead of starting one with no memory. ``History.lbfgs`` is the state at the end (None
    when the best point is not the last accepted one, or Ctrl-C stopped it).
    """
    if not isinstance(max_evals, int) or max_evals < 1:
        raise ValueError(f"num_steps must be an integer >= 1, got {max_evals!r}")
    key = checkpoints.key(desc) if checkpoints else None
    saved = checkpoints.resumed(key) if checkpoints else None
    loss, params = step()
    params = list({id(p): p for p in params}.values())
    history = History([float(loss.detach())])
    if not params:
        return history
    if not torch.isfinite(loss):
        raise FloatingPointError(f"{desc}: the objective is {history[0]} at the initial values; "
                                 "check the model's parameters or give init=")
    for p in params:
        p.grad = None
    if loss.requires_grad:
        loss.backward()
    state = LbfgsState(history[0], _flat_grad(params))
    if memory is not None and memory.grad.shape == state.grad.shape and memory.grad.dtype == state.grad.dtype:
        memory.loss, memory.grad = state.loss, state.grad  # the same point, evaluated afresh
        state = memory
    best = (history[0], snapshot(params))
    previous, change = best[0], float("inf")
    if saved is not None:
        restore(params, saved["params"])
        set_rng_state(saved["rng"])
        history = History(saved["history"])
        state = LbfgsState.from_dict(saved["optim"])
        extra = saved["extra"]
        best = (extra["best"], snapshot(extra["best_params"]))
        previous, change = extra["previous"], extra["change"]
        if saved["done"]:
            restore(params, best[1])
            return history
    direct = getattr(step, "direct", None)
    ids = {id(p) for p in params}

    def gradients() -> tuple[torch.Tensor, torch.Tensor | None]:
        """(loss, flat gradient or None: then the loss is differentiated) at the current parameters."""
        evaluated = direct() if direct is not None else None
        if evaluated is not None and {id(p) for p, _ in evaluated[1]} == ids:
            by_id = {id(p): g for p, g in evaluated[1]}
            return evaluated[0], torch.cat([by_id[id(p)].reshape(-1) for p in params])
        for p in params:
            p.grad = None
        return step()[0], None

    def evaluate() -> tuple[float, torch.Tensor]:
        nonlocal best
        try:
            with warnings.catch_warnings():  # a NaN at a line-search trial point is handled below
                warnings.filterwarnings("ignore", message="Encountered NaN")
                value, grad = gradients()
        except (ValueError, RuntimeError):  # a trial point the model refuses (e.g. an overflowed matrix)
            value, grad = params[0].new_tensor(float("nan")), None
        history.append(float(value.detach()))
        finite = math.isfinite(history[-1])
        if finite and grad is None:
            finite = value.requires_grad
            if finite:
                value.backward()
                grad = _flat_grad(params)
        if finite and bool(torch.isfinite(grad).all()):
            if history[-1] < best[0]:
                best = (history[-1], snapshot(params))
            return history[-1], grad
        # outside the domain (or a NaN gradient, e.g. a simplex at a vertex: 0 * log 0): a huge finite value makes
        # the line search step back instead of keeping that point as the best and stopping there
        return 1e30, torch.zeros_like(state.grad)

    def checkpoint_state(done: bool) -> dict:
        return {"step": len(history), "done": done, "params": snapshot(params), "optim": state.as_dict(),
                "rng": rng_state(), "history": list(history),
                "extra": {"best": best[0], "best_params": best[1], "previous": previous, "change": change}}

    bar = progress_bar(desc, max_evals, progress)
    bar.update(len(history) - 1)
    written = len(history)
    try:
        while len(history) < max_evals:
            before = len(history)
            with torch.enable_grad():
                lbfgs_block(state, params, evaluate, max_evals - len(history))
            bar.update(len(history) - before)
            bar.set_postfix(loss=f"{best[0]:.6g}", refresh=False)
            change = abs(previous - best[0])
            if change <= rel_tol * (1 + abs(best[0])) or len(history) == before:
                break
            previous = best[0]
            if checkpoints and checkpoints.due(len(history), written):
                checkpoints.write(key, checkpoint_state(False))
                written = len(history)
        if checkpoints:
            checkpoints.write(key, checkpoint_state(True))
    except KeyboardInterrupt:
        mark_interrupted(history, desc, max_evals)
        change = 0.0
    finally:
        bar.close()
    restore(params, best[1])
    history.lbfgs = state if state.loss == best[0] and not history.interrupted else None
    if warn and len(history) >= max_evals and change > rel_tol * (1 + abs(best[0])):
        moved = f"changed by {change:.3g} in the last iteration" if change < float("inf") else "was still moving"
        warnings.warn(f"{desc}: L-BFGS used its {max_evals} evaluations (num_steps) and the objective {moved}; "
                      "raise num_steps", NotConverged, stacklevel=3)
    return history


def make_elbo(graph, facts, num_particles: int = 1):
    """TraceEnum_ELBO when finite discrete sites are enumerated, else Trace_ELBO.

    Dims left of the plates are the model's own batch dims (``Facts.unplated``): summed, not checked.
    """
    if facts.enumerable:
        return TraceEnum_ELBO(max_plate_nesting=max_plate_nesting(graph), num_particles=num_particles)
    return Trace_ELBO(max_plate_nesting=facts.plate_nesting, num_particles=num_particles)


def init_to_prior_mean(site: dict) -> torch.Tensor:
    """A site's prior mean where it is finite and in the support (Pyro ``init_loc_fn`` form), else the median of 15
    prior draws (``init_to_median``: e.g. a HalfCauchy, whose mean is infinite). Deterministic where the mean
    exists, unlike the median of draws (a Normal(0, 10) prior's 15-draw median is ~3 away from 0 as often as not)."""
    fn = site["fn"]
    try:
        value = fn.mean.detach()
        if bool(torch.isfinite(value).all()) and bool(fn.support.check(value).all()):
            return value.expand(fn.shape()).clone()
    except (NotImplementedError, ValueError, RuntimeError, AttributeError):
        pass
    return init_to_median(site, num_samples=15)


def init_fn(init: dict | None, fallback: Callable[[dict], torch.Tensor] | None = None):
    """Initialize latents at ``init`` (site -> value) where given, else by ``fallback`` (an ``init_loc_fn``;
    default: the prior median, ``init_to_median`` of 15 draws).

    Each value is copied: an autoguide may make its parameter from the very tensor it is given, so without the
    copy a fit would write into the user's tensor, and one tensor given for two sites would tie their parameters.
    """
    fallback = fallback or init_to_median(num_samples=15)
    if not init:
        return fallback
    values = {site: torch.as_tensor(value).detach().clone() for site, value in init.items()}
    return init_to_value(values=values, fallback=fallback)


OPTIMIZERS = ("adam", "lbfgs")


class PyroObjective(UserWarning):
    """The model could not be run as a compiled log density; the fit uses Pyro's ELBO (slower, same objective)."""


def objective(fmodel: Callable, guide, elbo, args: tuple, kwargs: dict, plan, trace: bool = True,
              record_after: int = compiled.RECORD_AFTER) -> Callable[[], tuple]:
    """``step() -> (loss, params)`` fitting ``guide`` to ``fmodel``: the compiled log density (``compiled.py``:
    one pass of the model, enumerated sites contracted in place) for Pyro's autoguides, Pyro's ``elbo`` for any
    other guide or a model the compiled run refuses (then a ``PyroObjective`` warning names the site).
    ``trace=False``: never record the density (a model whose data changes between calls, e.g. minibatches);
    ``record_after``: as ``compiled.guide_objective`` (the evaluation at which it is recorded)."""
    try:
        step = compiled.guide_objective(fmodel, guide, args, kwargs, compiled.SitePlan.of(plan), trace=trace,
                                        record_after=record_after)
    except compiled.NotCompilable as why:
        warnings.warn(f"model '{plan.model_name}': the compiled log density stopped ({why}); fitting with Pyro's "
                      f"{type(elbo).__name__} instead (same objective, slower)", PyroObjective, stacklevel=3)
        step = None
    return step or traced_loss(_unvalidated(lambda: elbo.differentiable_loss(fmodel, guide, *args, **kwargs)))


def record_after(optimizer: str, num_steps: int) -> int:
    """The evaluation at which a fit's compiled density is recorded: the first one for Adam with at least
    ``compiled.RECORD_AFTER`` steps (as many evaluations as steps: the recording is paid back over the fit, so
    paying it late only adds interpreted steps), else ``compiled.RECORD_AFTER`` (L-BFGS stops when it converges,
    often after 100-350 evaluations: a short fit never pays for a recording)."""
    return 1 if optimizer == "adam" and num_steps >= compiled.RECORD_AFTER else compiled.RECORD_AFTER


NETWORK_MAX_GRAD_NORM = 10.0  # gradient-norm clip of networks' fits: flow guides (``fit_guide``), svae, amortized


def fit_guide(fmodel: Callable, args: tuple, kwargs: dict, plan, guide_kind: str, num_steps: int, lr: float,
              progress: bool, init: dict | None = None, desc: str = "fit", optimizer: str = "adam",
              warn: bool = True, checkpoints: Checkpoints | None = None,
              after_backward: Callable[[list], None] | None = None,
              schedule: Callable[[int, int], float] | None = None, trace: bool = True,
              init_fallback: Callable[[dict], torch.Tensor] | None = None, memory: LbfgsState | None = None):
    """Fit an autoguide (``guide_kind`` "normal", "delta", or a factory ``(model, init_loc_fn=...) -> autoguide``
    such as ``ppl.flow_guide("iaf")``) to ``fmodel``, the model with chains collapsed and
    discrete sites marked for enumeration (``chains.fit_model``), by Adam on the ELBO (``num_steps`` steps of
    rate ``lr``) or, for a deterministic objective (AutoDelta: MAP), by L-BFGS (at most ``num_steps``
    evaluations).

    ``checkpoints``: written/resumed by the loop (``optimize``); ``after_backward`` and ``schedule``: as
    ``optimize`` (Adam only; data parallel: ``distributed.average_gradients``; minibatches: ``cosine_tail``);
    ``trace``: as ``objective``; the density is recorded at the first evaluation when the fit is known to be long
    (``record_after``), else after ``compiled.RECORD_AFTER`` evaluations. Sites not in ``init`` start at
    ``init_fallback`` (``init_fn``; default: the prior median). ``memory``: as ``optimize_lbfgs`` (L-BFGS only).
    Adam clips the gradients' norm to ``NETWORK_MAX_GRAD_NORM`` for a guide factory's guide (its networks: a
    flow's gradient spikes, e.g. on a funnel, otherwise derail it) and not for AutoNormal / AutoDelta, where
    clipping would bias the fit (``optimize``). Returns ``(guide, elbo, history)``.
    """
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {optimizer!r}")
    if optimizer == "lbfgs" and guide_kind != "delta":
        raise ValueError("optimizer='lbfgs' needs a deterministic objective: guide='delta' (MAP)")
    if not callable(guide_kind) and guide_kind not in GUIDES:
        raise ValueError(f"guide must be one of {sorted(GUIDES)} or a guide factory (model, init_loc_fn=...) -> "
                         f"autoguide (e.g. ppl.flow_guide('iaf')), got {guide_kind!r}")
    facts, graph = plan.facts, plan.graph
    unknown = sorted(set(init or {}) - set(graph.nodes))
    if unknown:
        raise ValueError(f"init names unknown site(s) {unknown}; latent sites are {[s.name for s in graph.latent()]}")
    hidden = poutine.block(fmodel, hide=list(facts.enumerable))
    factory = guide_kind if callable(guide_kind) else GUIDES[guide_kind]
    guide = factory(hidden, init_loc_fn=init_fn(init, init_fallback))
    label = getattr(guide_kind, "kind", type(guide).__name__) if callable(guide_kind) else guide_kind
    elbo = make_elbo(graph, facts)
    step = objective(fmodel, guide, elbo, args, kwargs, plan, trace, record_after(optimizer, num_steps))
    if optimizer == "lbfgs":
        return guide, elbo, optimize_lbfgs(step, num_steps, progress, f"{desc} (MAP, L-BFGS)", warn=warn,
                                           checkpoints=checkpoints, memory=memory)
    clip = NETWORK_MAX_GRAD_NORM if callable(guide_kind) else None  # a guide factory's networks (flows) only
    history = optimize(step, num_steps, lr, progress, f"{desc} ({label})", checkpoints=checkpoints,
                       after_backward=after_backward, schedule=schedule, max_grad_norm=clip)
    return guide, elbo, history
