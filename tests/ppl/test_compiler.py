"""Rule routing, overrides, plan explanation and clear errors."""
import pytest
import torch

import ppl
from ppl.backends import UnknownBackendError, UnsupportedModelError, all_backends, routing_rules
from tests.ppl import models_for_tests as M


def test_rules_are_data_ordered_across_backends():
    rules = routing_rules(all_backends())
    assert [r.name for r in rules] == ["implicit-simulator", "energy-based", "binary-latent-vectors",
                                       "nothing-latent", "discrete-only", "conjugate-exponential",
                                       "discrete-with-globals", "exact-chains", "neural-structured",
                                       "small-continuous", "amortized-locals", "default-svi"]
    assert all(callable(r.applies) and r.reason and r.backend for r in rules)


@pytest.mark.parametrize("model, args, backend, rule", [
    (M.gmm, (torch.randn(20, 2),), "vi", "conjugate-exponential"),   # Dirichlet weights, Normal means: conjugate
    (M.normal_normal, (torch.randn(10),), "mcmc", "small-continuous"),
    (M.hmm, (torch.randn(8),), "vi", "conjugate-exponential"),       # Dirichlet rows, Normal means: VB-HMM
    (M.lds, (torch.randn(8, 1),), "exact", "exact-chains"),
    (M.lds_nonlinear, (torch.randn(8, 1),), "svi", "default-svi"),
    (M.neural_lds, (torch.randn(8, 3),), "svae", "neural-structured"),
])
def test_routing(model, args, backend, rule):
    plan = ppl.compile(model, *args)
    assert (plan.backend, plan.rule) == (backend, rule)


def test_explain_lists_backend_reason_and_every_site():
    plan = ppl.compile(M.hmm, torch.randn(8), backend="exact")
    text = plan.explain()
    assert "backend: exact" in text and "user override" in text
    for site, treatment in [("trans", "point estimate"), ("z", "message passing"), ("y", "observed")]:
        assert plan.treatment(site) == treatment
        assert site in text
    assert "forward-backward" in text


def test_override_and_treatments_change_with_backend():
    plan = ppl.compile(M.gmm, torch.randn(20, 2), backend="mcmc")
    assert plan.backend == "mcmc" and plan.rule == "user override"
    assert plan.treatment("loc") == "sampled" and plan.treatment("z") == "enumerate"


def test_unknown_backend_is_a_clear_error():
    with pytest.raises(UnknownBackendError, match=r"unknown backend .magic.; choose one of exact, svae, svi, mcmc"):
        ppl.compile(M.gmm, torch.randn(5, 2), backend="magic")
    with pytest.raises(UnknownBackendError):
        ppl.infer(M.gmm, torch.randn(5, 2), backend="magic")


def test_forced_backend_that_cannot_run_names_the_fact():
    with pytest.raises(UnsupportedModelError, match=r"backend 'mcmc' cannot run model 'neural_lds': site 'y' depends on a neural network"):
        ppl.compile(M.neural_lds, torch.randn(6, 3), backend="mcmc")
    with pytest.raises(UnsupportedModelError, match=r"backend 'exact' cannot run model 'lds_nonlinear'.*'x'.*not linear-Gaussian"):
        ppl.compile(M.lds_nonlinear, torch.randn(6, 1), backend="exact")


def test_unsupported_structure_is_a_clear_error():
    with pytest.raises(UnsupportedModelError, match="site 'n' is a latent discrete variable with infinite support"):
        ppl.compile(M.poisson_latent, torch.tensor(2.0))


def test_model_that_raises_reports_tracing_site_and_line():
    @ppl.model
    def broken(x):
        ppl.sample("a", ppl.dist.Normal(0.0, 1.0))
        return x @ torch.ones(5)  # shape error

    with pytest.raises(ppl.ModelTraceError, match=r"while tracing model 'broken' \(after site 'a'; at .*test_compiler.py:\d+ in broken: `return x @ torch.ones\(5\)"):
        ppl.compile(broken, torch.ones(3, 2))


def test_bad_data_reports_while_tracing():
    y = torch.tensor([1.0, float("nan")])
    with pytest.raises(ppl.ModelInputError, match=r"while tracing model 'normal_normal'.*site 'y'.*NaN"):
        ppl.infer(M.normal_normal, y)


def test_unknown_option_is_rejected_by_name():
    with pytest.raises(TypeError, match=r"backend 'mcmc' does not take option\(s\) guide"):
        ppl.infer(M.normal_normal, torch.randn(5), guide="delta", progress=False)


def test_plan_shows_the_backends_options_with_defaults_and_the_users_choices():
    y = torch.randn(8)
    plan = ppl.compile(M.hmm, y, backend="exact")
    options = dict(plan.options)
    assert options["num_steps"] == 500 and options["restarts"] == 3 and options["optimizer"] == "lbfgs"
    assert "options: " in plan.explain() and "restarts=3" in plan.explain()
    post = ppl.infer(M.hmm, y, backend="exact", num_steps=40, restarts=1, progress=False)
    ran = dict(post.plan.options)
    assert ran["num_steps"] == 40 and ran["restarts"] == 1 and ran["lr"] == 0.05


@pytest.mark.parametrize("name, message", [("rbm", "no normalized log-density"), ("gan", "no normalized log-density"),
                                           ("discrete_vae", "too large to enumerate")])
@pytest.mark.parametrize("backend", ["exact", "svi", "vi", "amortized", "svae"])
def test_density_backends_refuse_energy_simulator_and_combinatorial_sites(name, message, backend):
    """An RBM's unnormalized log_prob, a simulator without one, 2^20 binary codes: a backend that scores a
    normalized log-density would be silently wrong (MAP on an energy) or fail inside; it refuses, naming the
    site and the backend that can."""
    import importlib
    module = importlib.import_module(f"ppl.models.{name}")
    sim = module.simulate(seed=0)
    with pytest.raises(UnsupportedModelError, match=message):
        ppl.compile(module.model, *sim.args, backend=backend, **sim.kwargs)
