"""The potential NUTS runs on: ``U(z) = -log p(z, data)`` over the flat unconstrained latents of a model.

``make_potential`` is the one place the mcmc backend gets its density. Today it wraps Pyro's
``initialize_model`` (the model run through Pyro's effect handlers, with finite discrete sites enumerated
and chains collapsed by ``chains.fit_model``) and evaluates the C chains one after another; a compiled,
batched log density can replace it here without touching the sampler.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Callable

import torch
from pyro.infer.mcmc.util import initialize_model

from .. import chains, compiled, training


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
    in place), evaluated on all chains at once by ``torch.func.vmap`` when that gives the same values as one
    chain at a time at the starting points (else chain by chain); Pyro's ``potential_fn`` if the model cannot be
    compiled (a ``PyroObjective`` warning names the site)."""
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
    return Potential(batched or one_by_one, layout, dict(transforms), flat)


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
