"""The compiled log density (inference/compiled.py) against Pyro's interpreter on the same input.

Oracle: Pyro's ``TraceEnum_ELBO`` (enumerated sites summed by its own contraction, chains collapsed by the same
``chains.fit_model``) with the same guide at the same parameters and, for stochastic guides, the same random
draws. Every model of the library, in float64, to 1e-6 relative.
"""
import importlib
import warnings

import pyro
import pyro.poutine as poutine
import pytest
import torch
from pyro.infer.autoguide import AutoDelta, AutoLowRankMultivariateNormal, AutoMultivariateNormal, AutoNormal

import ppl
from ppl import dist
from ppl.inference import chains, compiled, training
from ppl.models import MODEL_MODULES, NEURAL_MODULES


def _double(value):
    if isinstance(value, torch.Tensor) and value.is_floating_point():
        return value.double()
    if isinstance(value, torch.nn.Module):
        return value.double()
    return value


def _both_losses(model, args, kwargs, guide_class, seed=0):
    """(compiled loss, Pyro's loss) of ``guide_class`` at its initial parameters, same random draws."""
    plan = ppl.compile(model, *args, **kwargs)
    fmodel = chains.fit_model(model, plan.facts)
    with pyro.get_param_store().scope():
        guide = guide_class(poutine.block(fmodel, hide=list(plan.facts.enumerable)))
        step = compiled.guide_objective(fmodel, guide, args, kwargs, compiled.SitePlan.of(plan))
        elbo = training.make_elbo(plan.graph, plan.facts)
        pyro.set_rng_seed(seed)
        ours = float(step()[0].detach())
        pyro.set_rng_seed(seed)
        with pyro.validation_enabled(False):
            theirs = float(elbo.differentiable_loss(fmodel, guide, *args, **kwargs))
    return ours, theirs


def _library_case(name):
    module = importlib.import_module(f"ppl.models.{name}")
    sim = module.simulate(seed=0)
    args = tuple(_double(a) for a in sim.args)
    kwargs = {k: _double(v) for k, v in sim.kwargs.items()}
    return module.model, args, kwargs


@pytest.mark.parametrize("name", MODEL_MODULES + NEURAL_MODULES)
def test_compiled_map_objective_equals_pyros_on_every_library_model(name):
    model, args, kwargs = _library_case(name)
    ours, theirs = _both_losses(model, args, kwargs, AutoDelta)
    assert ours == pytest.approx(theirs, rel=1e-6, abs=1e-6)


@pytest.mark.parametrize("guide_class", [AutoNormal, AutoMultivariateNormal, AutoLowRankMultivariateNormal])
@pytest.mark.parametrize("name", ["gmm", "hmm", "cca"])
def test_compiled_elbo_equals_pyros_for_stochastic_guides(name, guide_class):
    """Same seed, same draws: the single-sample ELBO estimates agree (to round-off)."""
    model, args, kwargs = _library_case(name)
    ours, theirs = _both_losses(model, args, kwargs, guide_class)
    assert ours == pytest.approx(theirs, rel=1e-6, abs=1e-6)


@ppl.model
def two_enumerated(y):
    """Two dependent enumerated sites per data point (z1 -> z2 -> y) and a masked, scaled observation."""
    probs = ppl.sample("probs", dist.Dirichlet(y.new_ones(3)))
    trans = ppl.sample("trans", dist.Dirichlet(y.new_ones(3, 2)).to_event(1))
    loc = ppl.sample("loc", dist.Normal(y.new_zeros(2), 3.0).to_event(1))
    with ppl.plate("data", y.shape[0]):
        z1 = ppl.sample("z1", dist.Categorical(probs))
        z2 = ppl.sample("z2", dist.Categorical(trans[z1]))
        ppl.sample("y", dist.Normal(loc[z2], 1.0), obs=y, mask=y > -2.5)


def test_two_dependent_enumerated_sites_and_a_mask_equal_brute_force():
    """log p(y, globals) = sum_n log sum_{z1, z2} p(z1) p(z2 | z1) p(y_n | z2)^{mask_n}: by hand."""
    torch.manual_seed(0)
    y = torch.randn(7, dtype=torch.float64) * 2
    plan = ppl.compile(two_enumerated, y)
    values = {"probs": torch.tensor([0.2, 0.3, 0.5], dtype=torch.float64),
              "trans": torch.tensor([[0.9, 0.1], [0.4, 0.6], [0.3, 0.7]], dtype=torch.float64),
              "loc": torch.tensor([-1.0, 2.0], dtype=torch.float64)}
    ours = compiled.log_joint(chains.fit_model(two_enumerated, plan.facts), (y,), {}, values,
                              compiled.SitePlan.of(plan))
    lik = torch.distributions.Normal(values["loc"], 1.0).log_prob(y[:, None])           # (N, 2)
    lik = torch.where((y > -2.5)[:, None], lik, torch.zeros_like(lik))
    joint = values["probs"].log()[:, None] + values["trans"].log()                      # (3, 2)
    per_point = torch.logsumexp(joint[None] + lik[:, None, :], dim=(1, 2))
    prior = (dist.Dirichlet(torch.ones(3, dtype=torch.float64)).log_prob(values["probs"])
             + dist.Dirichlet(torch.ones(3, 2, dtype=torch.float64)).log_prob(values["trans"]).sum()
             + dist.Normal(torch.zeros((), dtype=torch.float64), 3.0).log_prob(values["loc"]).sum())
    assert float(ours) == pytest.approx(float(per_point.sum() + prior), rel=1e-10)


def test_a_guide_it_does_not_know_uses_pyros_elbo():
    """A hand-written guide: no compiled objective (None), the fit runs on Pyro's ELBO."""
    plan = ppl.compile(two_enumerated, torch.randn(5))
    fmodel = chains.fit_model(two_enumerated, plan.facts)
    assert compiled.guide_objective(fmodel, lambda y: None, (torch.randn(5),), {}, compiled.SitePlan.of(plan)) is None


def test_a_latent_site_without_value_is_named():
    @ppl.model
    def model(y):
        n = ppl.sample("n", dist.Poisson(3.0))
        ppl.sample("y", dist.Normal(n, 1.0), obs=y)

    with pytest.raises(compiled.NotCompilable, match="'n'"):
        compiled.log_joint(model, (torch.zeros(()),), {}, {}, compiled.SitePlan(frozenset(), 0))


def test_the_fit_falls_back_to_pyros_elbo_with_a_warning_naming_the_site(monkeypatch):
    """If the compiled run refuses the model, ppl.infer still fits it (Pyro's ELBO) and says why."""
    def refuse(*args, **kwargs):
        raise compiled.NotCompilable("site 'loc': refused for the test")

    monkeypatch.setattr(compiled, "guide_objective", refuse)
    y = torch.randn(20, dtype=torch.float64)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        post = ppl.infer(two_enumerated, y, backend="exact", restarts=1, num_steps=20, progress=False)
    messages = [str(w.message) for w in caught if issubclass(w.category, training.PyroObjective)]
    assert messages and "site 'loc'" in messages[0] and "TraceEnum_ELBO" in messages[0]
    assert post.mean("loc").shape == (2,)
