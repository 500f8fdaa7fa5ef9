"""The potential NUTS runs on: ``U(z) = -log p(z, data)`` over the flat unconstrained latents of a model.

``make_potential`` is the one place the mcmc backend gets its density: the compiled log joint
(``compiled.potential_fn``, finite discrete sites enumerated and chains collapsed by ``chains.fit_model``) with
Pyro's ``initialize_model`` transforms and starting points. In order of preference, the C chains' potential and
gradient come from

1. one traced graph (``_traced``): ``torch.func.vmap(torch.func.grad_and_value(U))`` (or, when the model's
   code cannot be vmapped, the chains' autograd passes unrolled) recorded once by ``make_fx`` as a
   straight-line program of aten ops (the handler stack, the model's Python and autograd's bookkeeping run
   once, at build time), constants folded and the graph shrunk (``graph_recording.fold_and_simplify``:
   shape-only ops, identities, common subexpressions), then ``torch.jit.trace``-d, run by the sampler inside its
   inference mode; the values the model's Python read off
   z-dependent tensors are guarded (a call where one differs is evaluated eagerly); kept only when it equals
   the eager values at the starting points;
2. the same ``vmap`` run eagerly at every call (``_vectorized``), when the trace is refused;
3. one autograd pass per chain (``pyro_potential_and_grad``), when the model's code cannot be vmapped;
4. Pyro's own ``potential_fn``, when the model cannot be compiled (a ``PyroObjective`` warning names the site).
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Callable

import torch
from pyro.infer.mcmc.util import initialize_model

from .. import chains, compiled, training
from ..graph_recording import record_graph
from .nuts import AllChains, Recorded


@dataclass(frozen=True)
class Layout:
    """How the flat vector ``z`` ``(..., D)`` splits into sites: names, unconstrained shapes, offsets."""

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]

    @property
    def sizes(self) -> tuple[int, ...]:
        return tuple(math.prod(s) for s in self.shapes)

    @property
    def dim(self) -> int:
        return sum(self.sizes)

    def unravel(self, z: torch.Tensor) -> dict[str, torch.Tensor]:
        """``z`` ``(*batch, D)`` -> site -> ``(*batch, *shape)`` (views)."""
        out, offset = {}, 0
        for name, shape, size in zip(self.names, self.shapes, self.sizes):
            out[name] = z[..., offset:offset + size].reshape(z.shape[:-1] + shape)
            offset += size
        return out

    def ravel(self, values: dict[str, torch.Tensor], batch: tuple[int, ...]) -> torch.Tensor:
        """site -> ``(*batch, *shape)`` -> ``(*batch, D)``."""
        return torch.cat([values[n].reshape(batch + (-1,)) for n in self.names], -1)


@dataclass(frozen=True)
class Potential:
    """What the sampler needs: ``potential_and_grad(z (C, D)) -> (U (C,), grad (C, D))``; the layout of ``z``;
    the transforms (site -> ``torch.distributions.Transform`` from constrained to unconstrained values, as
    Pyro's ``initialize_model`` gives them; ``constrain`` applies their inverses); starting points ``init``
    ``(C, D)``."""

    potential_and_grad: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
    layout: Layout
    transforms: dict
    init: torch.Tensor

    def constrain(self, z: torch.Tensor) -> dict[str, torch.Tensor]:
        """Unconstrained draws ``(*batch, D)`` -> site -> constrained values ``(*batch, *shape)``."""
        return {name: self.transforms[name].inv(v) if name in self.transforms else v
                for name, v in self.layout.unravel(z).items()}


def pyro_potential_and_grad(potential_fn: Callable[[dict], torch.Tensor], layout: Layout
                            ) -> Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """Batch Pyro's ``potential_fn(site -> unconstrained value) -> U`` over chains: ``z (C, D) -> (U (C,),
    dU/dz (C, D))`` by one autograd pass per chain; a chain where U is not finite gets a NaN gradient (the
    sampler treats it as a divergence)."""

    def potential_and_grad(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        us, grads = [], []
        with torch.enable_grad():
            for row in z:
                row = row.detach().requires_grad_(True)
                u = potential_fn(layout.unravel(row))
                if torch.isfinite(u):
                    (g,) = torch.autograd.grad(u, row)
                else:
                    g = torch.full_like(row, math.nan)
                us.append(u.detach())
                grads.append(g)
        return torch.stack(us).to(z.dtype), torch.stack(grads)

    return potential_and_grad


def make_potential(model: Callable, args: tuple, kwargs: dict, plan, num_chains: int) -> Potential:
    """The potential of ``model(*args, **kwargs)`` under ``plan`` for ``num_chains`` chains: collapsible chains
    marginalized exactly and finite discrete sites enumerated (``chains.fit_model``), continuous latents mapped
    to unconstrained space with the log-Jacobian included; starting points drawn uniformly in (-2, 2) on the
    unconstrained scale (Pyro's ``init_to_uniform``, from the global torch RNG).

    The density is the compiled log joint (``compiled.potential_fn``: no trace, the enumerated sites contracted
    in place), evaluated on all chains at once by a traced graph (``_traced``, wrapped in ``nuts.AllChains``:
    its shapes are those of C chains) of ``vmap`` (or of the chains one after another, when the model's code
    cannot be vmapped), else by ``vmap`` itself, else chain by chain, each only when it gives the same values as
    one chain at a time at the starting points; Pyro's ``potential_fn`` if the model cannot be compiled (a
    ``PyroObjective`` warning names the site)."""
    fmodel = chains.fit_model(model, plan.facts)
    init, pyro_potential, transforms, _ = initialize_model(
        fmodel, model_args=args, model_kwargs=kwargs, max_plate_nesting=training.max_plate_nesting(plan.graph),
        num_chains=num_chains)
    batch = (num_chains,) if num_chains > 1 else ()
    names = tuple(init)
    layout = Layout(names, tuple(tuple(init[n].shape[len(batch):]) for n in names))
    flat = layout.ravel({n: v.detach() for n, v in init.items()}, batch).reshape(num_chains, layout.dim)
    ours = compiled.potential_fn(fmodel, args, kwargs, dict(transforms), compiled.SitePlan.of(plan))
    try:
        one_by_one = pyro_potential_and_grad(ours, layout)
        reference = one_by_one(flat)
    except compiled.NotCompilable as why:
        warnings.warn(f"model '{plan.model_name}': the compiled log density stopped ({why}); sampling on Pyro's "
                      "potential instead (same density, slower)", training.PyroObjective, stacklevel=3)
        return Potential(pyro_potential_and_grad(pyro_potential, layout), layout, dict(transforms), flat)
    batched = _vectorized(ours, layout, flat, reference)
    eager = batched or one_by_one
    traced = _traced(ours, layout, flat, reference, eager, vmapped=batched is not None)
    return Potential(eager if traced is None else traced, layout, dict(transforms), flat)


def _vectorized(potential_fn: Callable[[dict], torch.Tensor], layout: Layout, z: torch.Tensor,
                reference: tuple[torch.Tensor, torch.Tensor]):
    """``potential_and_grad`` over all chains in one ``vmap``-ed call, if it runs on ``z`` and agrees with
    ``reference`` (the chain-by-chain values there, 1e-6 relative); else None. A model whose Python code cannot
    be vmapped (data-dependent branches, in-place writes into its inputs) keeps the chain-by-chain loop."""
    def value(row: torch.Tensor) -> torch.Tensor:
        return potential_fn(layout.unravel(row))

    grad_and_value = torch.func.vmap(torch.func.grad_and_value(value))

    def potential_and_grad(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        grads, us = grad_and_value(rows.detach())
        bad = ~torch.isfinite(us)
        if bool(bad.any()):
            grads = torch.where(bad.unsqueeze(-1), torch.full_like(grads, math.nan), grads)
        return us.detach().to(rows.dtype), grads.detach()

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            u, g = potential_and_grad(z)
    except Exception:  # noqa: BLE001 - any failure to vmap the user's code means: evaluate chain by chain
        return None
    ok = (torch.allclose(u, reference[0], rtol=1e-6, atol=1e-6)
          and torch.allclose(g, reference[1], rtol=1e-5, atol=1e-6, equal_nan=True))
    return potential_and_grad if ok else None


def _row_by_row(value: Callable[[torch.Tensor], torch.Tensor]) -> Callable:
    """``Z (C, D) -> (grad (C, D), U (C,))`` by one autograd pass per row (what ``make_fx`` unrolls when the
    model's code cannot be vmapped: a branch on a latent value, an in-place write into an input)."""

    def grads_and_values(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        us, grads = [], []
        for c in range(rows.shape[0]):
            with torch.enable_grad():
                row = rows[c].detach().requires_grad_(True)
                u = value(row)
                (g,) = torch.autograd.grad(u, row)
            us.append(u.detach())
            grads.append(g)
        return torch.stack(grads), torch.stack(us)

    return grads_and_values


def _traced(potential_fn: Callable[[dict], torch.Tensor], layout: Layout, z: torch.Tensor,
            reference: tuple[torch.Tensor, torch.Tensor], fallback: Callable, vmapped: bool):
    """``potential_and_grad`` of the chains by one traced graph, or None when it cannot be trusted.

    ``functionalize(vmap(grad_and_value(U)))`` at ``z`` ``(C, D)`` (``vmapped``) or, for a model whose code
    cannot be vmapped, one row's autograd pass (``_row_by_row`` at ``z[:1]``; constants folded only when it has
    no in-place op) is recorded by ``make_fx``: a straight-line program of aten ops computing (grad, U). Python
    reads of tensor values are evaluated there and baked in; those that depend on z (a check or a branch of the
    model on a latent value, e.g. ``markov_chain`` validating its transition matrix) become guards
    (``graph_recording.add_guards``): every call compares them with their values at ``z`` and evaluates the call by
    ``fallback`` (the eager potential) when one differs. The trace is refused (None) when a shape depends on z's
    values, when tracing fails, or when its values at ``z`` differ from ``reference`` (chain by chain, 1e-6
    relative). Constants are folded and the graph shrunk (``graph_recording.fold_and_simplify``, kept only where
    it gives the same outputs) and the graph is run by ``torch.jit.trace`` (fewer interpreter calls per op),
    checked against the graph at ``z``. The vmapped graph is returned as ``nuts.AllChains(..., needs_autograd=False)``: the sampler calls
    it on all C chains (another number of rows is run C at a time, padded); the one-row graph, as
    ``nuts.Recorded``, is run once per row asked for. Both run inside the sampler's ``torch.inference_mode``; a
    guard that fails evaluates the call by ``fallback`` outside it. Where U is not finite the
    gradient is whatever the graph gives (the sampler stops such a trajectory as divergent on U alone)."""
    def value(row: torch.Tensor) -> torch.Tensor:
        return potential_fn(layout.unravel(row))

    z = z.detach()
    traced_fn = torch.func.vmap(torch.func.grad_and_value(value)) if vmapped else _row_by_row(value)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            example = z if vmapped else z[:1]
            # a vmapped potential is functionalized once recorded: functionalize cannot run the autograd.Function
            # the exact kernels' ops are called through (NYI in torch); the graph calls the op
            run, graph_out = record_graph(traced_fn, example, max_functionalized_nodes=float("inf") if vmapped else 0)
    except Exception:  # noqa: BLE001 - a model make_fx cannot record keeps the eager potential
        return None
    C, expected = example.shape[0], graph_out[2]
    guarded = expected.numel() > 0

    def block_potential(block: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        grads, us, guards = run(block)
        if guarded and not torch.equal(guards, expected):
            with torch.inference_mode(False):     # the eager potential needs autograd: not on inference tensors
                return fallback(block.clone())
        if us.dtype != block.dtype or grads.dtype != block.dtype:
            us, grads = us.to(block.dtype), grads.to(block.dtype)
        return us, grads

    def potential_and_grad(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if rows.shape[0] == C:
            return block_potential(rows)
        # another number of rows (one row at a time for a row-by-row graph; a caller that does not honour
        # AllChains): C at a time, the last block padded with copies of its first row
        us, grads = [], []
        for block in rows.split(C):
            n = block.shape[0]
            u, g = block_potential(torch.cat([block, block[:1].expand(C - n, -1)]) if n < C else block)
            us.append(u[:n])
            grads.append(g[:n])
        return torch.cat(us), torch.cat(grads)

    u, g = potential_and_grad(z)
    finite = torch.isfinite(reference[0])
    ok = (bool((torch.isfinite(u) == finite).all())
          and torch.allclose(u[finite], reference[0][finite], rtol=1e-6, atol=1e-6)
          and torch.allclose(g[finite], reference[1][finite], rtol=1e-5, atol=1e-6))
    if not ok:
        return None
    return AllChains(potential_and_grad, needs_autograd=False) if vmapped else Recorded(potential_and_grad)
