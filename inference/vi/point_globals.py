r"""Non-conjugate globals of a discrete-local model (mixture or ``markov_chain``) point-estimated inside the
coordinate ascent of the vi backend.

A continuous global :math:`\theta` whose prior is in no conjugate family (a HalfNormal or LogNormal scale, ...) and
that feeds observed sites only (``conjugacy.point_starts``) is held at a value while the model is probed, so what it
feeds is a *known* parameter (a Normal's variance given the scale): the rest is the conjugate ``Structure`` given
:math:`\theta` (``Structure.points``). The sweeps then maximize

.. math:: \mathcal L(q, \theta) + \log p(\theta),\qquad
    \mathcal L = E_q[\log p(y, z, g \mid \theta)] + H[q],

coordinate-wise: q(z) (``cavi.local_step``), each q(g) (``cavi.global_step``), then :math:`\theta` with q fixed:
L-BFGS (``point_step.lbfgs_ascent``) on :math:`E_q[\log p(y \mid z, g, \theta)] + \log p(\theta)` (the only terms
that depend on it; each evaluation reruns the model with :math:`\theta` requiring grad, so the known parameters are
differentiable in it, and the expected log-likelihood is ``links.table``'s closed form), the step kept only if the
objective rises. The objective therefore never decreases. Start: q(g) from the data-driven hard start (k-means
labels), then ``START_ROUNDS`` alternations of the :math:`\theta` step and the global step (a within-cluster scale
for a scale; the prior's median is no robust start).
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from . import cavi
from .conjugacy import Structure, _fixed_child, _known, _weights
from .point_step import lbfgs_ascent
from .probe import peel, run_held

START_ROUNDS = 3      # theta step / global step alternations from the hard start before the sweeps
LBFGS_ITERS = 5       # L-BFGS iterations per theta step
PRIOR_TERM = "log p(point estimates)"


def at(structure: Structure, theta: dict, grad: bool = False) -> tuple[Structure, torch.Tensor, torch.Tensor]:
    r"""``(structure at theta, c(theta), log p(theta))``: the model rerun once with the point sites held at ``theta``
    (site -> tensor; differentiable in it when ``grad``), the known parameters ("normal": variance, "gaussian":
    precision and log det) and tables ("fixed") of the children that depend on it recomputed, and
    :math:`c(\theta)` the log-density of the latent-free observed sites that do (folded into ``constant``)."""
    points, local = structure.points, structure.local
    # unseeded: what is read here depends on theta only (the probe checked it against two different prior draws)
    run = run_held(points.model, points.args, points.kwargs, theta, None, grad,
                   local.name if local is not None else None)
    dtype = structure.dtype
    children = []
    for c in structure.children:
        if c.name not in points.observed:
            children.append(c)
            continue
        site = run.sites[c.name]
        base, extra, inner = peel(site["fn"])
        if c.kind == "fixed":
            known = _fixed_child(c.name, site, base, extra, inner, local, True).known.to(dtype)
        else:
            known = _known(c.name, c.kind, base, base, c.nz, local is not None)
            known = tuple(k.to(dtype) for k in known) if isinstance(known, tuple) else known.to(dtype)
        children.append(replace(c, known=known))
    names = {c.name for c in structure.children}
    device = next(iter(theta.values())).device
    const = torch.zeros((), dtype=dtype, device=device)
    for name in points.observed:
        if name not in names:
            site = run.sites[name]
            base, extra, inner = peel(site["fn"])
            const = const + (base.log_prob(site["value"]) * _weights(site, base, extra, inner)).sum().to(dtype)
    log_prior = sum((run.sites[s]["fn"].log_prob(v).sum().to(dtype) for s, v in theta.items()),
                    torch.zeros((), dtype=dtype, device=device))
    out = replace(structure, children=tuple(children), constant=points.base_constant + float(const))
    return out, const, log_prior


def theta_objective(structure: Structure, theta: dict, q: dict, state, grad: bool) -> torch.Tensor:
    r""":math:`E_q[\log p(y \mid z, g, \theta)] + c(\theta) + \log p(\theta)` plus terms that do not depend on
    :math:`\theta` (``cavi.local_terms``: E log p(z), H[q(z)]), with q(z) = ``state`` and q(g) = ``q`` fixed."""
    s, const, log_prior = at(structure, theta, grad)
    terms = cavi.local_terms(s, q, cavi.child_tables(s, q), state)
    return sum(terms.values(), const + log_prior)


def theta_step(structure: Structure, theta: dict, q: dict, state) -> dict:
    """The point estimates after one L-BFGS step on ``theta_objective`` (``point_step.lbfgs_ascent``), ``theta``
    itself when that does not raise it."""
    old = float(theta_objective(structure, theta, q, state, False))
    found = lbfgs_ascent(theta, structure.points.supports,
                         lambda th, grad: theta_objective(structure, th, q, state, grad), old, LBFGS_ITERS)
    return theta if found is None else found[0]


@dataclass(kw_only=True)
class PointFit(cavi.Fit):
    """A ``cavi.Fit`` whose ``history`` is the ELBO plus ``log p(theta)``; ``theta`` the point estimates,
    ``log_prior`` their log prior density at the end, ``structure`` the structure at ``theta``."""

    theta: dict
    log_prior: float
    structure: Structure


def coordinate_ascent(structure: Structure, start: cavi.LocalState | None, num_steps: int, tol: float,
                      on_step=None) -> PointFit:
    """Sweeps (local step, global step, theta step; module docstring) from the hard start ``start`` (None: no local)
    until the relative change of the objective (ELBO + log p(theta)) is at most ``tol`` or ``num_steps`` sweeps ran."""
    theta = dict(structure.points.values)
    s = at(structure, theta)[0]
    q = cavi.global_step(s, start, {g: G.prior for g, G in s.globals.items()})
    for _ in range(START_ROUNDS):
        theta = theta_step(structure, theta, q, start)
        s = at(structure, theta)[0]
        q = cavi.global_step(s, start, q)

    def step(current, history):
        s, theta, q, state = current
        if s.local is not None:
            state = cavi.local_step(s, q, cavi.child_tables(s, q))
        q = cavi.global_step(s, state, q)
        theta = theta_step(structure, theta, q, state)
        s, _, log_prior = at(structure, theta)
        terms = {k: float(v) for k, v in cavi.elbo_terms(s, q, cavi.child_tables(s, q), state).items()}
        terms[PRIOR_TERM] = float(log_prior)
        return (s, theta, q, state), terms, None

    (s, theta, q, state), history, terms, converged, interrupted = cavi.sweep_until(
        step, (s, theta, q, start), num_steps, tol, structure.dtype, on_step)
    log_prior = terms[PRIOR_TERM][-1] if history else float(at(structure, theta)[2])
    return PointFit(history, terms, converged, interrupted, q=q, state=state, tables=cavi.child_tables(s, q),
                    theta=theta, log_prior=log_prior, structure=s)


def describe(structure: Structure) -> dict[str, str]:
    """point site -> the update ``plan.explain()`` prints."""
    points = structure.points
    out = {}
    for name, family in points.families.items():
        fed = ", ".join(structure.links.get(name, ())) or "nothing"
        out[name] = (f"point estimate (L-BFGS on the expected log joint inside each sweep, {family} prior "
                     f"not conjugate to what it feeds: {fed}); posterior draws are a point mass")
    return out
