r"""Find a model's conjugate-exponential structure by *probing* it (no symbolic parsing).

The model runs under ``Tabulate``: its one discrete local z (a Categorical site in a plate, or a
``markov_chain``) takes its enumerated support ``arange(K)`` in a new leftmost dim, so every site that uses
z is evaluated at all K states at once, and every global is drawn from its prior. Run twice with different
draws, a pair is recognized when, in both runs, a child's distribution parameter *is* the global indexed by
the local — ``child.rate[k] == rate[k]`` for every state k, broadcast over the data — and the child's family
is the conjugate one (Dirichlet -> Categorical probs / a chain's initial and transition rows; Gamma -> Poisson
rate; Beta -> Bernoulli probs; Normal or MultivariateNormal -> a Gaussian's loc with known covariance;
``ppl.NormalInverseWishart`` -> a MultivariateNormal's (loc, covariance); ``probe``). Parameters that are not a global
must be the same in both runs (known). Anything else raises ``NotConjugate`` naming the site: the backend
never guesses.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from torch.distributions import biject_to

from ppl.backends import UnsupportedModelError

from .links import Child, outer_products
from .probe import (PROBE_SEEDS, child_params, close, is_global, is_global_indexed, num_states, peel, probe_runs,
                    run_held)

PRIOR_FAMILIES = ("Dirichlet", "Gamma", "Beta", "Normal", "MultivariateNormal", "NormalInverseWishart")
CONJUGATE_CHILD = {"Categorical": ("Dirichlet",), "Poisson": ("Gamma",), "Bernoulli": ("Beta",),
                   "Normal": ("Normal", "MultivariateNormal"),
                   "MultivariateNormal": ("Normal", "MultivariateNormal", "NormalInverseWishart")}


class NotConjugate(UnsupportedModelError):
    """The model is outside what the vi backend recognizes; the message names the site and why."""


@dataclass(frozen=True)
class Global:
    """A conjugate global: ``family`` (key of ``families.FAMILIES``), ``prior`` params with a leading state dim,
    ``shape`` its site's value shape, ``indexed`` whether the local's states index its leading dim."""

    name: str
    family: str
    prior: tuple
    shape: tuple
    indexed: bool


@dataclass(frozen=True)
class Local:
    """The discrete local: ``kind`` "mixture" | "chain"; K states; ``zshape`` its value's shape; ``priors``:
    role ("weights" | "initial" | "transition") -> a Dirichlet global's name or a fixed log-probability tensor
    (``(*zshape, K)`` weights, ``(..., K)`` initial, ``(..., K, K)`` transition)."""

    name: str
    kind: str
    K: int
    zshape: tuple
    priors: dict


@dataclass(frozen=True, eq=False)
class PointSites:
    """Continuous globals whose prior is in no conjugate family (a HalfNormal or LogNormal scale, ...), each feeding
    observed sites only: held at ``values`` (site -> tensor) while the model is probed, point-estimated inside the
    coordinate ascent (``point_globals``). ``families``: site -> its prior's family; ``supports``: site -> its
    support (the L-BFGS step works in ``biject_to(support)``'s unconstrained coordinates); ``observed``: the
    observed sites that depend on them (their known parameters, tables or log-densities are recomputed at each
    value); ``base_constant``: the log-density of the latent-free observed sites that do not; ``model``, ``args``,
    ``kwargs``: what is rerun with the sites held."""

    values: dict
    families: dict
    supports: dict
    observed: tuple
    base_constant: float
    model: object
    args: tuple
    kwargs: dict


@dataclass(frozen=True)
class Structure:
    """What the coordinate ascent runs on: the local (None: no discrete latent), the globals, the observed
    children, and ``constant``: the log-density of observed sites that depend on no latent."""

    local: Local | None
    globals: dict
    children: tuple
    constant: float = 0.0
    dtype: torch.dtype = torch.float64
    links: dict = field(default_factory=dict)   # global -> tuple of (child or local role) names it feeds
    points: PointSites | None = None            # non-conjugate globals point-estimated in the loop (None: none)


def local_site(facts) -> str | None:
    """The one discrete local (an enumerable site or a markov_chain), None if there is none; ``NotConjugate``
    naming the structure the backend cannot take."""
    if facts.gaussian_chains:
        raise NotConjugate(f"gaussian_chain '{facts.gaussian_chains[0]}': backend 'vi' runs mixtures and "
                           "discrete chains only (use backend='exact' for an LDS)")
    if facts.neural:
        raise NotConjugate(f"site '{facts.neural[0]}' depends on a network: no conjugate update exists")
    if facts.unenumerable:
        raise NotConjugate(f"site '{facts.unenumerable[0]}' is discrete with infinite support")
    if facts.continuous_local:
        raise NotConjugate(f"site '{facts.continuous_local[0]}' is a continuous latent local to the data (it "
                           "shares a plate with a discrete latent): backend 'vi' takes continuous globals only")
    locals_ = facts.enumerable + facts.markov_chains
    if len(locals_) > 1:
        raise NotConjugate(f"sites {', '.join(repr(s) for s in locals_)}: backend 'vi' takes one discrete "
                           "latent (a mixture assignment or one markov_chain)")
    for chain in facts.markov_chains:
        if not facts.tabulable.get(chain):
            raise NotConjugate(f"markov_chain '{chain}': its children do not use its value elementwise")
    return locals_[0] if locals_ else None


def _same(name: str, what: str, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a``, checked equal to ``b`` (the same quantity in the other probe run): it must not depend on a latent."""
    if not close(a, b):
        raise NotConjugate(f"site '{name}': its {what} depends on a latent variable that is not a conjugate "
                           "global it uses directly (indexed by the discrete latent)")
    return a


def _prior_params(name: str, site_a: dict, site_b: dict) -> tuple[str, tuple]:
    """(prior family, params expanded to the site's value shape) of global ``name``."""
    base, _, _ = peel(site_a["fn"])
    other, _, _ = peel(site_b["fn"])
    family = type(base).__name__
    if family not in PRIOR_FAMILIES:
        raise NotConjugate(f"site '{name}': a {family} prior is not conjugate to any likelihood backend 'vi' "
                           f"knows (priors it knows: {', '.join(PRIOR_FAMILIES)})")
    shape = site_a["value"].shape
    if family == "NormalInverseWishart":
        batch = tuple(shape[:-2])
        fields = zip(base.natural(), other.natural(), (2, 1, 0, 0))
        return family, tuple(_same(name, "prior", a, b).expand(batch + tuple(a.shape[a.dim() - n:]))
                             for a, b, n in fields)
    names = {"Dirichlet": ("concentration",), "Gamma": ("concentration", "rate"),
             "Beta": ("concentration1", "concentration0"), "Normal": ("loc", "scale"),
             "MultivariateNormal": ("loc", "covariance_matrix")}[family]
    params = []
    for attr in names:
        value = _same(name, f"prior's {attr}", getattr(base, attr), getattr(other, attr))
        if family == "MultivariateNormal":
            value = value.expand(shape + shape[-1:]) if attr == "covariance_matrix" else value.expand(shape)
        else:
            value = value.expand(shape)
        params.append(value ** 2 if attr == "scale" else value)
    return family, tuple(params)


def _local_roles(name: str, site_a: dict, site_b: dict) -> tuple[str, int, tuple, dict]:
    """(kind, K, zshape, role -> (param in run a, in run b)) of the discrete local ``name``."""
    fn_a, fn_b = site_a["fn"], site_b["fn"]
    if site_a["mask"] is not None or not (isinstance(site_a["scale"], float) and site_a["scale"] == 1.0):
        raise NotConjugate(f"site '{name}': a masked or scaled discrete latent is not supported by backend 'vi'")
    K = num_states(fn_a)
    if hasattr(fn_a, "log_trans"):
        if fn_a.time_varying:
            raise NotConjugate(f"markov_chain '{name}': input-driven (time-varying) transitions have no "
                               "conjugate Dirichlet update")
        roles = {"initial": (fn_a.log_init.exp(), fn_b.log_init.exp()),
                 "transition": (fn_a.log_trans.exp(), fn_b.log_trans.exp())}
        return "chain", K, tuple(fn_a.batch_shape + fn_a.event_shape), roles
    if type(fn_a).__name__ != "Categorical":
        raise NotConjugate(f"site '{name}': a {type(fn_a).__name__} latent; backend 'vi' takes a Categorical "
                           "mixture assignment or a markov_chain")
    return "mixture", K, tuple(fn_a.batch_shape), {"weights": (fn_a.probs, fn_b.probs)}


def _link_local(name: str, roles: dict, runs, priors: dict) -> tuple[dict, dict]:
    """(role -> Dirichlet global name or fixed log-probabilities, global -> roles it feeds)."""
    a, b = runs
    out, fed = {}, {}
    for role, (pa, pb) in roles.items():
        match = [g for g, (fam, _) in priors.items() if fam == "Dirichlet"
                 and is_global(pa, a.sites[g]["value"]) and is_global(pb, b.sites[g]["value"])]
        if match:
            out[role] = match[0]
            fed.setdefault(match[0], []).append(f"{name}.{role}")
        else:
            out[role] = _same(name, f"{role} probabilities (neither a Dirichlet global nor fixed)", pa, pb).log()
    return out, fed


def _weights(site: dict, base, extra: int, inner_mask) -> torch.Tensor:
    """mask times scale over the base distribution's batch shape (0 where an entry is missing)."""
    ref = base.mean if type(base).__name__ != "Categorical" else base.probs[..., 0]
    shape = tuple(base.batch_shape)
    w = torch.ones(shape, dtype=ref.dtype, device=ref.device)
    for m in (site["mask"], inner_mask):
        if isinstance(m, torch.Tensor):
            m = m.reshape(tuple(m.shape) + (1,) * (extra if m is site["mask"] else 0))
            w = w * m.to(w.dtype)
        elif m is False:
            w = w * 0
    scale = site["scale"]
    if isinstance(scale, torch.Tensor):
        scale = scale.reshape(tuple(scale.shape) + (1,) * extra)
    return w * scale


def _match(params_a: dict, params_b: dict, runs, priors: dict, indexed: tuple | None) -> dict:
    """param -> global whose value it is in both runs (``indexed = (K, zshape)``: the global indexed by the local)."""
    a, b = runs
    out = {}
    for param in params_a:
        for g, (family, _) in priors.items():
            va, vb = a.sites[g]["value"], b.sites[g]["value"]
            if family == "NormalInverseWishart":
                pick = 0 if param == "loc" else 1
                va, vb = (va[..., -1], va[..., :-1])[pick], (vb[..., -1], vb[..., :-1])[pick]
            if indexed is not None:
                ok = is_global_indexed(params_a[param], va, *indexed) and \
                    is_global_indexed(params_b[param], vb, *indexed)
            else:
                ok = is_global(params_a[param], va) and is_global(params_b[param], vb)
            if ok:
                out[param] = g
                break
    return out


def _kind(name: str, family: str, linked: dict, priors: dict) -> str:
    """The conjugate pair of a child with ``linked`` (param -> global); NotConjugate if there is none."""
    globs = set(linked.values())
    if len(globs) != 1:
        raise NotConjugate(f"site '{name}': its parameters come from several globals ({', '.join(sorted(globs))}); "
                           "backend 'vi' needs one conjugate global per likelihood")
    (g,) = globs
    prior = priors[g][0]
    if prior not in CONJUGATE_CHILD.get(family, ()):
        raise NotConjugate(f"site '{name}': a {family} likelihood with a {prior} prior on its "
                           f"{', '.join(linked)} ('{g}') is not a conjugate pair backend 'vi' knows")
    if prior == "NormalInverseWishart":
        if set(linked) != {"loc", "covariance_matrix"}:
            raise NotConjugate(f"site '{name}': the NormalInverseWishart global '{g}' must give both its loc "
                               "and covariance_matrix")
        return "niw"
    wanted = {"Dirichlet": "probs", "Gamma": "rate", "Beta": "probs"}.get(prior, "loc")
    if set(linked) != {wanted}:
        raise NotConjugate(f"site '{name}': the {prior} global '{g}' feeds its {', '.join(linked)}; the "
                           f"conjugate pair needs exactly its {wanted}")
    if family == "MultivariateNormal" or prior == "MultivariateNormal":
        return "gaussian"
    return {"Categorical": "categorical", "Poisson": "poisson", "Bernoulli": "bernoulli", "Normal": "normal"}[family]


def _constant_over_states(name: str, what: str, x: torch.Tensor, nz: int) -> torch.Tensor:
    """``x (K, *zshape, *rest)`` -> ``(K, *rest)``, checked constant over the data (zshape)."""
    first = x[(slice(None),) + (0,) * nz]
    if not close(x, first.reshape(first.shape[:1] + (1,) * nz + first.shape[1:])):
        raise NotConjugate(f"site '{name}': its {what} varies across data points; the conjugate Gaussian update "
                           "of backend 'vi' needs one known covariance per state")
    return first


def _known(name: str, kind: str, base_a, base_b, nz: int, indexed: bool):
    """Known (non-global) parameters of a conjugate child, laid out with a leading state dim."""
    lead = (lambda x: x) if indexed else (lambda x: x.unsqueeze(0))
    if kind == "normal":
        return lead(_same(name, "scale", base_a.scale, base_b.scale) ** 2)
    if kind != "gaussian":
        return None
    if type(base_a).__name__ == "MultivariateNormal":
        cov = _same(name, "covariance", base_a.covariance_matrix, base_b.covariance_matrix)
    else:
        cov = torch.diag_embed(_same(name, "scale", base_a.scale, base_b.scale) ** 2)
    cov = _constant_over_states(name, "covariance", lead(cov), nz)
    L = torch.linalg.cholesky(cov)
    return torch.cholesky_inverse(L), 2 * L.diagonal(dim1=-2, dim2=-1).log().sum(-1)


def _layout(name: str, kind: str, site: dict, base, extra: int, inner_mask, indexed: bool, gvalue):
    """(y, w, nz) of a conjugate child (see ``links.Child``)."""
    bb = tuple(base.batch_shape)
    w = _weights(site, base, extra, inner_mask)
    if indexed:
        if not close(w, w[:1]):
            raise NotConjugate(f"site '{name}': its mask or scale depends on the state of the discrete latent")
        w = w[0]
        bb = bb[1:]
    event = tuple(base.event_shape)
    y = site["value"]
    if kind == "gaussian" and not event:              # a Normal child of a Gaussian (vector) prior: D is its last dim
        w = w[..., 0]
        data = bb[:-1]
        event = bb[-1:]
    else:
        data = bb
    y = y.expand(data + event) if y.shape != data + event else y
    w = w.expand(data)
    elementwise = kind not in ("gaussian", "niw", "categorical")   # the global's own dims E follow the data's
    nz = len(data) - (gvalue.dim() - (1 if indexed else 0)) if elementwise else len(data)
    keep = w != 0
    y = torch.where(keep.reshape(keep.shape + (1,) * len(event)), y, torch.zeros_like(y))
    return y, w, nz


def _fixed_child(name: str, site: dict, base, extra: int, inner_mask, local: Local | None, uses_local: bool):
    """A child that no global feeds: its tabulated log-density ``(K, *zshape)`` as a "fixed" Child, or (when it
    does not use the local either) its log-density as a number."""
    lp = base.log_prob(site["value"]) * _weights(site, base, extra, inner_mask)
    if not uses_local:
        return float(lp.sum())
    lead = (local.K,) + local.zshape
    if tuple(lp.shape[:len(lead)]) != lead:
        raise NotConjugate(f"site '{name}': its log-density tabulated over the states of '{local.name}' has shape "
                           f"{tuple(lp.shape)}, which does not start with (states, *{local.zshape})")
    table = lp.sum(tuple(range(len(lead), lp.dim()))) if lp.dim() > len(lead) else lp
    return Child(name, "fixed", None, site["value"], torch.ones(local.zshape, dtype=lp.dtype, device=lp.device),
                 table, len(local.zshape))


def _child(name: str, runs, priors: dict, graph, local: Local | None, dtype: torch.dtype):
    """The observed site ``name`` as a ``links.Child`` (or a constant log-density); NotConjugate if its
    dependence on the latents is not a recognized conjugate pair."""
    a, b = runs
    site = a.sites[name]
    base_a, extra, inner_mask = peel(site["fn"])
    base_b = peel(b.sites[name]["fn"])[0]
    family = type(base_a).__name__
    parents = graph.parents_of(name)
    uses_local = local is not None and local.name in parents
    pa, pb = child_params(base_a), child_params(base_b)
    linked = _match(pa, pb, runs, priors, (local.K, local.zshape) if uses_local else None)
    if not linked:
        glob = [p for p in parents if p in priors]
        if glob:
            raise NotConjugate(f"site '{name}': it depends on '{glob[0]}' in a way backend 'vi' does not recognize "
                               f"(a conjugate pair needs the global itself, indexed by the discrete latent, as "
                               f"the {family}'s parameter)")
        return _fixed_child(name, site, base_a, extra, inner_mask, local, uses_local)
    if local is not None and not uses_local:
        raise NotConjugate(f"site '{name}': a conjugate global outside the mixture/chain '{local.name}' is not "
                           "supported together with it")
    kind = _kind(name, family, linked, priors)
    for param in set(pa) - set(linked):
        _same(name, param, pa[param], pb[param])
    glob = next(iter(linked.values()))
    y, w, nz = _layout(name, kind, site, base_a, extra, inner_mask, uses_local, a.sites[glob]["value"])
    known = _known(name, kind, base_a, base_b, nz, uses_local)
    if not bool(torch.isfinite(y[w != 0] if y.shape == w.shape else y).all()):
        raise ValueError(f"site '{name}': observed values must be finite where observed; mark missing entries "
                         "with mask=")
    y = y.long() if kind == "categorical" else y.to(dtype)
    if isinstance(known, tuple):
        known = tuple(k.to(dtype) for k in known)
    elif known is not None:
        known = known.to(dtype)
    yy = outer_products(y) if kind in ("gaussian", "niw") else None
    return Child(name, kind, glob, y, w.to(dtype), known, nz, yy)


def _global(name: str, family: str, params: tuple, kinds: set, indexed: bool, shape: tuple, dtype) -> Global:
    """A ``Global`` with the family its children need (a Normal prior on a vector mean becomes a full Gaussian)."""
    if family == "Normal" and "gaussian" in kinds:
        if len(shape) == 0:
            raise NotConjugate(f"site '{name}': a scalar Normal prior cannot be the mean of a MultivariateNormal")
        params, family = (params[0], torch.diag_embed(params[1])), "Gaussian"
    elif family == "MultivariateNormal":
        family = "Gaussian"
    if family in ("Normal", "Gaussian") and kinds - {"normal", "gaussian"}:
        raise NotConjugate(f"site '{name}': a {family} global feeds likelihoods of kinds {sorted(kinds)}")
    return Global(name, family, tuple(p.to(dtype) for p in params), tuple(shape), indexed)


def point_starts(model, args, kwargs, facts, graph, local: str | None) -> tuple[dict, dict, dict]:
    """``(values, families, supports)`` of the continuous globals whose prior family is not one of
    ``PRIOR_FAMILIES``: each starts at ``biject_to(support)(0)`` (1 for a positive scale; ``point_globals`` then
    moves it to a data-driven value before the sweeps), in the observed data's floating dtype. NotConjugate names a
    site that feeds a latent site (the local's prior, another global's prior): its point step would change more than
    the expected log-likelihood of observed sites, which the step does not track."""
    if not facts.continuous:
        return {}, {}, {}
    run = run_held(model, args, kwargs, {}, PROBE_SEEDS[0], local=local)
    dtype = _dtype({}, run.sites)
    values, families, supports = {}, {}, {}
    for g in facts.continuous:
        fn = run.sites[g]["fn"]
        family = type(peel(fn)[0]).__name__
        if family in PRIOR_FAMILIES:
            continue
        latent = [c for c in graph.children_of(g) if not run.sites.get(c, {}).get("observed", False)]
        if latent:
            raise NotConjugate(f"site '{g}': its {family} prior is not conjugate, and a non-conjugate global is "
                               f"point-estimated by backend 'vi' only when it feeds observed sites alone; it feeds "
                               f"the latent site '{latent[0]}'")
        transform = biject_to(fn.support)
        value = run.sites[g]["value"].detach().to(dtype)
        values[g] = transform(torch.zeros_like(transform.inv(value)))
        families[g], supports[g] = family, fn.support
    return values, families, supports


def analyse(model, args, kwargs, facts, graph) -> Structure:
    """Probe ``model(*args, **kwargs)`` and return its conjugate ``Structure``; NotConjugate names the site that
    stops it. Continuous globals with a non-conjugate prior that feed observed sites only (``point_starts``) are
    held at a start value in both probe runs, so what they feed is a known parameter given them
    (``Structure.points``)."""
    local_name = local_site(facts)
    try:
        held, families, supports = point_starts(model, args, kwargs, facts, graph, local_name)
        runs = probe_runs(model, args, kwargs, local_name, held=held)
    except (RuntimeError, IndexError, TypeError) as exc:
        what = f"with '{local_name}' set to all its states at once" if local_name else "with fresh prior draws"
        raise NotConjugate(f"the model fails when run {what} (it must use the discrete latent elementwise, "
                           f"e.g. loc[z]): {type(exc).__name__}: {exc}") from exc
    a, b = runs
    if a.params:
        raise NotConjugate(f"'{a.params[0]}' is a learnable parameter (ppl.param / ppl.module): backend 'vi' fits "
                           "no parameters; use backend='exact' or 'svi'")
    priors = {g: _prior_params(g, a.sites[g], b.sites[g]) for g in facts.continuous if g not in held}
    dtype = _dtype(priors, a.sites)
    local, fed = None, {}
    if local_name is not None:
        kind, K, zshape, roles = _local_roles(local_name, a.sites[local_name], b.sites[local_name])
        local = Local(local_name, kind, K, zshape, {})
        role_map, fed = _link_local(local_name, roles, runs, priors)
        local = Local(local_name, kind, K, zshape, {r: v.to(dtype) if isinstance(v, torch.Tensor) else v
                                                    for r, v in role_map.items()})
    children, constant, base_constant = [], 0.0, 0.0
    for name, site in a.sites.items():
        if site["observed"]:
            child = _child(name, runs, priors, graph, local, dtype)
            if isinstance(child, Child):
                children.append(child)
                if child.glob is not None:
                    fed.setdefault(child.glob, []).append(name)
            else:
                constant += child
                base_constant += 0.0 if set(graph.parents_of(name)) & set(held) else child
    for g in priors:
        if graph.children_of(g) and g not in fed:
            raise NotConjugate(f"site '{g}': none of its children ({', '.join(graph.children_of(g))}) uses it in a "
                               "conjugate pair backend 'vi' recognizes")
    globals_ = {g: _global(g, fam, params, {c.kind for c in children if c.glob == g},
                           any(c.glob == g and local is not None for c in children), a.sites[g]["value"].shape, dtype)
                for g, (fam, params) in priors.items()}
    points = None
    if held:
        observed = tuple(n for n, site in a.sites.items() if site["observed"] and set(graph.parents_of(n)) & set(held))
        points = PointSites(held, families, supports, observed, base_constant, model, tuple(args), dict(kwargs))
        for g in held:
            fed[g] = [n for n in observed if g in graph.parents_of(n)]
    return Structure(local, globals_, tuple(children), constant, dtype, {g: tuple(v) for g, v in fed.items()}, points)


def _dtype(priors: dict, sites: dict) -> torch.dtype:
    """The widest floating dtype among the priors' parameters and the observed values."""
    dtype = torch.float32
    for _, params in priors.values():
        for p in params:
            dtype = torch.promote_types(dtype, p.dtype)
    for site in sites.values():
        if site["observed"] and site["value"].is_floating_point():
            dtype = torch.promote_types(dtype, site["value"].dtype)
    return dtype
