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
from torch.fx.experimental.proxy_tensor import make_fx
from pyro.infer.autoguide import AutoDelta, AutoLowRankMultivariateNormal, AutoMultivariateNormal, AutoNormal

import ppl
from ppl import dist
from ppl.inference import chains, compiled, graph_recording, training
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


# ----------------------------------------------------------------------------- the recorded density (issue 13)

def _density(model, args, kwargs, guide_class=AutoNormal):
    """The TracedDensity (log joint + log-Jacobian of the sites' transforms) over the unconstrained sites of
    ``guide_class``, recorded at a draw of the guide, with a zero point of its layout."""
    plan = ppl.compile(model, *args, **kwargs)
    fmodel = chains.fit_model(model, plan.facts)
    with pyro.get_param_store().scope():
        guide = guide_class(poutine.block(fmodel, hide=list(plan.facts.enumerable)))
        compiled._initialize(guide, args, kwargs)
        names, transforms, draw, _ = compiled._draw_function(guide)
        density = compiled.TracedDensity(fmodel, args, kwargs, compiled.SitePlan.of(plan), names, transforms, True)
        pyro.set_rng_seed(0)
        with torch.no_grad():
            density(*draw()[0])
        (key,) = density.recorded
    point = [torch.zeros(shape, dtype=dtype, device=device) for shape, dtype, device in key]
    return density, point


def _value_and_grad(fn, point):
    inputs = [u.clone().requires_grad_() for u in point]
    value = fn(*inputs)
    return value.detach(), (torch.autograd.grad(value, inputs) if inputs else ())


# models recorded as one graph (a collapsed chain's exact kernel is one custom op in it); the others: the neural
# models' own parameters, and the switching LDS's evaluation runs more than MAX_RECORDED_OPS operations
RECORDED_LIBRARY = ("gmm", "mixture_of_experts", "cca", "lda", "nmf", "hmm", "lds", "factorial_hmm", "iohmm")
RECORDED = RECORDED_LIBRARY + ("readme_hmm", "readme_hmm_missing")


@ppl.model
def readme_hmm(y, K=3):
    """README, quick start."""
    trans = ppl.sample("trans", dist.Dirichlet(torch.ones(K, K, dtype=y.dtype)).to_event(1))
    loc = ppl.sample("loc", dist.Normal(torch.zeros(K, dtype=y.dtype), 10.0).to_event(1))
    z = ppl.markov_chain("z", num_states=K, transition=trans, length=y.shape[-1])
    ppl.sample("y", dist.Normal(loc[z], 1.0), obs=y)


@ppl.model
def readme_hmm_missing(y, mask, K=3):
    """README, conditioning and missing data."""
    trans = ppl.sample("trans", dist.Dirichlet(torch.ones(K, K, dtype=y.dtype)).to_event(1))
    loc = ppl.sample("loc", dist.Normal(torch.zeros(K, dtype=y.dtype), 10.0).to_event(1))
    z = ppl.markov_chain("z", num_states=K, transition=trans, length=y.shape[-1])
    ppl.sample("y", dist.Normal(loc[z], 1.0), obs=y, mask=mask)


def _readme_case(name):
    torch.manual_seed(0)
    y = torch.cat([torch.randn(20) - 5, torch.randn(20), torch.randn(20) + 5]).double()
    if name == "readme_hmm":
        return readme_hmm, (y,), {}
    y_ext, mask = ppl.extend(y, steps=5)
    return readme_hmm_missing, (y_ext,), {"mask": mask}


@pytest.mark.parametrize("name", MODEL_MODULES + NEURAL_MODULES + ("readme_hmm", "readme_hmm_missing"))
def test_the_recorded_density_equals_the_interpreters_log_joint(name):
    """Float64, at two random points away from those the recording was checked at: value and gradient to 1e-6
    relative; the models in RECORDED must run recorded (else the test would compare the interpreter to itself),
    the others say why not."""
    model, args, kwargs = _readme_case(name) if name.startswith("readme") else _library_case(name)
    density, point = _density(model, args, kwargs)
    (key,) = density.recorded
    if name in RECORDED:
        assert density.reason is None and density.recorded[key] is not None
    elif density.reason is None:
        pytest.fail(f"{name} is recorded now: add it to RECORDED")
    else:
        assert density.fallback_reason[key] == density.reason
    gen = torch.Generator().manual_seed(1)
    for _ in range(2):
        at = [u + 0.5 * torch.randn(u.shape, generator=gen, dtype=u.dtype) for u in point]
        ours, ours_grad = _value_and_grad(density, at)
        theirs, theirs_grad = _value_and_grad(density.interpreted, at)
        assert float(ours) == pytest.approx(float(theirs), rel=1e-6, abs=1e-6)
        for a, b in zip(ours_grad, theirs_grad):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", RECORDED_LIBRARY)
def test_the_recorded_autonormal_step_equals_its_interpreter(name):
    """The AutoNormal loss recorded as one graph with the guide's draw and log q (``NormalObjective``), float64:
    at two random (locs, raw scales, noises) away from the recording point, its value and its gradients with
    respect to the locs and raw scales equal the interpreter's (draw in torch, log joint by ``log_joint``) to
    1e-6 relative; called with the wrong number of tensors, it says what it takes."""
    model, args, kwargs = _library_case(name)
    plan = ppl.compile(model, *args, **kwargs)
    fmodel = chains.fit_model(model, plan.facts)
    with pyro.get_param_store().scope():
        guide = AutoNormal(poutine.block(fmodel, hide=list(plan.facts.enumerable)))
        step = compiled.guide_objective(fmodel, guide, args, kwargs, compiled.SitePlan.of(plan), record_after=1)
        pyro.set_rng_seed(0)
        step()
    objective = step.density
    assert isinstance(objective, compiled.NormalObjective) and objective.reason is None
    (key,) = objective.recorded
    n = len(objective.names)
    gen = torch.Generator().manual_seed(1)
    for _ in range(2):
        at = [0.5 * torch.randn(shape, generator=gen, dtype=dtype) for shape, dtype, _ in key]
        ours, theirs = (_value_and_grad(lambda *p, f=f: f(*p, *at[2 * n:]), at[:2 * n])
                        for f in (objective, objective.interpreted))
        assert float(ours[0]) == pytest.approx(float(theirs[0]), rel=1e-6, abs=1e-6)
        for a, b in zip(ours[1], theirs[1]):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match=f"takes {3 * n} tensors .*noises of sites.* got {2 * n}"):
        objective(*at[:2 * n])


def test_simplify_removes_the_ops_that_return_their_argument_and_keeps_the_values():
    """graph_recording.simplify on a recorded graph: detach, x + 0, x * 1, x ** 1, a view to the same shape and
    ones_like (a constant once the shape is fixed) go; an int tensor + 0.0 (a float result: another dtype) and an
    expand to a larger shape stay; the outputs are the original graph's at points other than the example."""
    def fn(x, n):
        y = (x.detach() + 0) * 1
        y = y.view(y.shape) ** 1 + torch.ones_like(x) * 2
        return y.expand(2, 3).sum(0), n + 0.0

    example = (torch.randn(3, dtype=torch.float64), torch.arange(3))
    module = make_fx(fn)(*example)
    simpler = graph_recording.simplify(module, *example)
    ops = [str(n.target) for n in simpler.graph.nodes if n.op == "call_function"]
    assert not any(name in op for op in ops for name in ("detach", "ones_like", "view", "aten.pow"))
    assert sum("mul.Tensor" in op for op in ops) == 1   # the constant's * 2 (for fold_constants), not the * 1
    assert any("expand" in op for op in ops) and sum("add.Tensor" in op for op in ops) == 2
    assert len(ops) < len([n for n in module.graph.nodes if n.op == "call_function"])
    for at in ((torch.randn(3, dtype=torch.float64), torch.arange(3, 6)), example):
        for a, b in zip(simpler(*at), module(*at)):
            assert a.dtype == b.dtype and torch.equal(a, b)


def test_inline_mutations_rewrites_writes_into_temporaries_and_keeps_the_values():
    """A recorded graph with the in-place ops autograd's backward formulas write into temporaries (``relu_``, a mask
    ``logical_and_``, ``masked_fill_``, ``scatter_`` into a ``zeros_like``): ``inline_mutations`` leaves no op that
    writes in place, the values equal the original graph's bitwise (float32, at the example and at another point),
    and the readers of a temporary after its write read the written value. A write into an input or into a view
    of a temporary is not rewritten (``without_mutations`` then records through functionalize, same values)."""
    def fn(x):
        y = x * 2
        mask = y > 0
        mask.logical_and_(y < 3)
        z = torch.zeros_like(y).scatter_(0, torch.tensor([1]), 5.0)
        w = (y - 1).relu_().masked_fill_(mask, -1.0)
        return w + z, mask

    example = torch.tensor([0.5, -1.0, 2.0, 4.0])
    module = graph_recording.make_graph(fn, example)
    assert graph_recording.mutates(module.graph)
    reference = [module(at) for at in (example, torch.tensor([1.2, 3.0, -0.1, 0.2]))]
    rewritten = graph_recording._copy(module)
    assert graph_recording.inline_mutations(rewritten)
    assert not graph_recording.mutates(rewritten.graph)
    for at, expected in zip((example, torch.tensor([1.2, 3.0, -0.1, 0.2])), reference):
        for a, b in zip(rewritten(at), expected):
            assert a.dtype == b.dtype and torch.equal(a, b)
    assert torch.equal(rewritten(example)[0], torch.tensor([-1.0, 5.0, 3.0, 7.0]))  # the closed form

    def writes_into_a_view(x):
        y = x * 1.5
        y[1:].add_(1.0)            # a view of a temporary: the temporary changes too
        return y * 2

    def writes_into_its_input(x):
        return x.mul_(2.0) + 1

    for fn, functional in ((writes_into_a_view, True), (writes_into_its_input, False)):
        module = graph_recording.make_graph(fn, example.clone())
        assert not graph_recording.inline_mutations(graph_recording._copy(module))
        recorded = graph_recording.without_mutations(module, example.clone())
        assert graph_recording.mutates(recorded.graph) != functional  # functionalize keeps the input's copy_
        assert torch.equal(recorded(example.clone()), fn(example.clone()))


def test_cumprod_is_recorded_with_eager_autograds_backward_and_a_guard_for_zeros():
    """A recording of a gradient through ``cumprod`` (the stick-breaking transform's) has eager autograd's backward
    for inputs without zeros (reverse cumsum / x: no ``masked_fill``, ``scatter``, ``gather`` of the traced
    branch-free form) and gives eager autograd's gradient bitwise, at the recording point and at another; its
    guard differs at a point with a zero (the caller then evaluates eagerly), and a recording made at such a point
    gives eager's gradient there."""
    weights = torch.tensor([1.0, -2.0, 0.5, 3.0])

    def grad_and_value(x):
        with torch.enable_grad():
            leaf = x.detach().requires_grad_(True)
            value = (leaf.cumprod(-1) * weights).sum()
            grad, = torch.autograd.grad(value, leaf)
        return [grad], value.detach()

    x = torch.tensor([[0.5, 1.5, -2.0, 0.7], [1.1, 0.3, 0.9, -0.4]])
    ops = {str(n.target) for n in graph_recording.make_graph(grad_and_value, x).graph.nodes if n.op == "call_function"}
    assert not any(name in op for op in ops for name in ("masked_fill", "scatter", "gather"))
    run, (_, _, recorded_guards) = graph_recording.record_graph(grad_and_value, x)
    for at in (x, x.flip(0) * 1.3):
        grads, value, guards = run(at)
        eager_grads, eager_value = grad_and_value(at)
        assert torch.equal(grads[0], eager_grads[0]) and torch.equal(value, eager_value)
        assert torch.equal(guards, recorded_guards)
    zero = x.clone()
    zero[1, 1] = 0.0
    assert not torch.equal(run(zero)[2], recorded_guards)
    run_at_zero, _ = graph_recording.record_graph(grad_and_value, zero)
    assert torch.equal(run_at_zero(zero)[0][0], grad_and_value(zero)[0][0])


def test_simplify_replaces_outer_product_bmms_and_pads_by_cheaper_ops_with_the_same_values():
    """``simplify``: a ``bmm`` over an inner dim of size 1 (outer products, here of transposed views) becomes a
    broadcast ``mul`` with bmm's contiguous layout, a ``constant_pad_nd`` along one dim a ``cat`` with constant
    blocks (padding) or a ``narrow_copy`` (cropping), ``x ** 2`` ``x * x``; a bmm with a real inner sum and a pad
    along two dims stay;
    the outputs equal the original graph's bitwise at points other than the example."""
    aten = torch.ops.aten

    def fn(a, b):
        outer = torch.bmm(a.transpose(1, 2), b[:, :1, :])                  # (4, 3, 1) @ (4, 1, 3)
        inner = torch.bmm(a, b.transpose(1, 2))                            # a sum over 3
        padded = aten.constant_pad_nd.default(a, [1, 2], 0.5)            # last dim, both sides
        cropped = aten.constant_pad_nd.default(b, [0, 0, -1, 0])         # the middle dim
        both = aten.constant_pad_nd.default(a, [1, 0, 1, 0])             # two dims: kept
        return outer.view(4, 9) * 2, inner, padded.sum(-1), cropped + 1, both.sum(), (b ** 2).sum(1)

    gen = torch.Generator().manual_seed(0)
    example = (torch.randn(4, 1, 3, generator=gen), torch.randn(4, 2, 3, generator=gen))
    module = make_fx(fn)(*example)
    simpler = graph_recording.simplify(module, *example)
    ops = [str(n.target) for n in simpler.graph.nodes if n.op == "call_function"]
    assert sum("bmm" in op for op in ops) == 1 and sum("constant_pad_nd" in op for op in ops) == 1
    assert sum("narrow_copy" in op for op in ops) == 1 and sum("aten.cat" in op for op in ops) == 1
    assert not any("pow" in op for op in ops)
    for at in ((torch.randn(4, 1, 3, generator=gen), torch.randn(4, 2, 3, generator=gen)), example):
        for a, b in zip(simpler(*at), module(*at)):
            assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)


def test_simplify_collapses_chains_of_views_of_a_fresh_tensor_into_one_as_strided():
    """``simplify``: a chain of views (view, permute, transpose, unsqueeze, expand, diagonal) of a tensor an op
    computes becomes one ``as_strided`` of that tensor; a chain that starts at an input stays (its layout may
    differ between calls); the outputs equal the original graph's bitwise, also at an input with other strides,
    and a recording (``record_graph``) made and run at transposed inputs gives the function's values."""
    def fn(x):
        y = x.exp()
        chain = y.view(2, 3, 2).permute(2, 0, 1).transpose(0, 1).unsqueeze(0).expand(4, 2, 2, 3)
        diag = (y * 2).view(3, 2, 2).diagonal(0, -2, -1).t()
        from_input = x.view(3, 4).t().unsqueeze(1)
        return chain * 3, diag.sum(0), from_input + 1

    example = torch.randn(12, dtype=torch.float64)
    module = make_fx(fn)(example)
    simpler = graph_recording.simplify(module, example)
    ops = [graph_recording._op_name(n) for n in simpler.graph.nodes if n.op == "call_function"]
    assert ops.count("as_strided") == 2
    assert ops.count("t") + ops.count("unsqueeze") + ops.count("view") == 3    # the input's chain
    assert not any(name in ops for name in ("permute", "transpose", "expand", "diagonal"))
    for at in (torch.randn(24, dtype=torch.float64)[::2], example):
        for a, b in zip(simpler(at), module(at)):
            assert a.shape == b.shape and a.stride() == b.stride() and torch.equal(a, b)

    def grads_and_value(x):    # a recording's inputs are made contiguous: the layouts it was simplified at
        g = x.exp().reshape(3, 4).t().unsqueeze(0).expand(2, 4, 3) * 2
        return [g.sum(0)], g.sum()

    transposed = torch.randn(3, 4, dtype=torch.float64).t()
    run, _ = graph_recording.record_graph(grads_and_value, transposed)
    for at in (torch.randn(3, 4, dtype=torch.float64).t(), transposed.contiguous()):
        (grad,), value, _ = run(at)
        (expected,), expected_value = grads_and_value(at)
        assert torch.equal(grad, expected) and torch.equal(value, expected_value)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_python_numbers_become_constants_of_the_ops_dtype_with_the_same_values(dtype):
    """``simplify`` replaces the Python numbers ops take in place of a tensor (``x * 0.1``, ``x.mul(2.0)`` as
    ``mul.Scalar``, ``x >= 0.3``, ``masked_fill(m, 1e-3)``, ``rsub``) by 0-dim constants of the op's dtype, switching
    ``.Scalar`` overloads to ``.Tensor``; ``alpha``, integer tensors' numbers and ``pow``'s exponent stay; the
    outputs equal the original graph's bitwise at points other than the example."""
    aten = torch.ops.aten

    def fn(x, n):
        y = aten.mul.Tensor(x, 0.1) + aten.mul.Scalar(x, 2.0)
        y = aten.masked_fill.Scalar(y, aten.ge.Scalar(x, 0.3), 1e-3)
        y = aten.rsub.Scalar(y, 0.7) + aten.add.Tensor(x, 1.3, alpha=2) + x ** 3
        return y.sum(), aten.mul.Tensor(n, 3)

    example = (torch.tensor([0.2, 0.5, -1.7], dtype=dtype), torch.arange(3))
    module = make_fx(fn)(*example)
    simpler = graph_recording.simplify(module, *example)
    numbers = {str(node.target): [a for a in node.args if isinstance(a, (int, float)) and not isinstance(a, bool)]
               for node in simpler.graph.nodes if node.op == "call_function"}
    assert not any(".Scalar" in op for op in numbers if "pow" not in op)
    assert numbers["aten.pow.Tensor_Scalar"] == [3] and numbers["aten.mul.Tensor"] == [3]  # the integer tensor's
    assert [n.kwargs.get("alpha") for n in simpler.graph.nodes if n.target == aten.add.Tensor and n.kwargs] == [2]
    twice = graph_recording.simplify(simpler, *example)   # new constants do not overwrite the first pass's
    gen = torch.Generator().manual_seed(0)
    for at in ((torch.randn(3, generator=gen, dtype=dtype), torch.arange(3, 6)), example):
        for a, b, c in zip(simpler(*at), module(*at), twice(*at)):
            assert a.dtype == b.dtype and torch.equal(a, b) and torch.equal(c, b)


@ppl.model
def branchy(y):
    """The likelihood's scale depends on a Python branch on a latent value."""
    mu = ppl.sample("mu", dist.Normal(y.new_zeros(()), 3.0))
    scale = 1.0 if float(mu) > 0 else 2.0
    with ppl.plate("data", y.shape[0]):
        ppl.sample("y", dist.Normal(mu, scale), obs=y)


def _branchy_density():
    y = torch.tensor([0.3, -0.2, 1.1], dtype=torch.float64)
    plan = ppl.compile(branchy, y)
    return compiled.TracedDensity(branchy, (y,), {}, compiled.SitePlan.of(plan), ["mu"], {"mu": None}, False), y


def test_a_branch_on_a_latent_value_is_guarded():
    """Recorded at mu = 0.5 (branch scale 1): at mu = -0.5 the guard sends the call to the interpreter, whose
    value is the closed form with scale 2; at mu = 0.7 the recording runs and has scale 1."""
    density, y = _branchy_density()
    at = torch.tensor(0.5, dtype=torch.float64)
    density(at)
    for mu, scale in ((-0.5, 2.0), (0.7, 1.0)):
        mu = torch.tensor(mu, dtype=torch.float64, requires_grad=True)
        value = density(mu)
        exact = (torch.distributions.Normal(y.new_zeros(()), 3.0).log_prob(mu)
                 + torch.distributions.Normal(mu, scale).log_prob(y).sum())
        assert float(value) == pytest.approx(float(exact), rel=1e-12)
        (grad,) = torch.autograd.grad(value, mu)
        (exact_grad,) = torch.autograd.grad(exact, mu)
        assert float(grad) == pytest.approx(float(exact_grad), rel=1e-10)


def test_a_value_dependent_shape_gives_the_interpreters_value_at_every_pattern():
    """Boolean indexing by a latent's sign: the number of entries kept depends on the values. Recorded at one
    pattern, the density is right at another pattern of the same size and at one of another size (a shape
    the recording fixed that does not fit: the interpreter evaluates it)."""
    @ppl.model
    def shape_from_values(y):
        mu = ppl.sample("mu", dist.Normal(y.new_zeros(3), 1.0).to_event(1))
        positive = mu[mu > 0]                      # how many entries: read off the values
        ppl.sample("y", dist.Normal(positive.sum(), 1.0), obs=y)

    y = torch.tensor(0.4, dtype=torch.float64)
    plan = ppl.compile(shape_from_values, y)
    density = compiled.TracedDensity(shape_from_values, (y,), {}, compiled.SitePlan.of(plan), ["mu"],
                                     {"mu": None}, False)
    density(torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64))
    for values in ([-0.5, 1.0, 2.0], [0.5, 1.5, 2.0], [-0.5, -1.5, 2.0]):
        mu = torch.tensor(values, dtype=torch.float64)
        exact = (torch.distributions.Normal(y.new_zeros(()), 1.0).log_prob(mu).sum()
                 + torch.distributions.Normal(mu[mu > 0].sum(), 1.0).log_prob(y))
        assert float(density(mu)) == pytest.approx(float(exact), rel=1e-12)


def test_a_model_with_its_own_parameters_runs_the_interpreter_and_says_why():
    @ppl.model
    def with_param(y):
        shift = ppl.param("shift", torch.tensor(0.5, dtype=y.dtype))
        mu = ppl.sample("mu", dist.Normal(y.new_zeros(()), 1.0))
        ppl.sample("y", dist.Normal(mu + shift, 1.0), obs=y)

    y = torch.tensor(0.3, dtype=torch.float64)
    density, _ = _density(with_param, (y,), {})
    assert "own parameters" in density.reason and "shift" in density.reason


def test_pyros_argument_validation_runs_once_on_the_users_data():
    """Bernoulli data of 0.5 is outside its support: the first evaluation says so (the recording would not)."""
    @ppl.model
    def coin(y):
        p = ppl.sample("p", dist.Beta(y.new_ones(()), 1.0))
        with ppl.plate("data", y.shape[0]):
            ppl.sample("y", dist.Bernoulli(p), obs=y)

    y = torch.tensor([1.0, 0.5, 0.0], dtype=torch.float64)
    density = compiled.TracedDensity(coin, (y,), {}, compiled.SitePlan(frozenset(), 1), ["p"],
                                     {"p": None}, False)
    with pytest.raises(ValueError, match="support"):
        density(torch.tensor(0.3, dtype=torch.float64))


def test_a_fit_on_the_recording_follows_the_interpreters_fit():
    """Same seed, 30 Adam steps of AutoNormal on the float64 GMM: the losses agree to 1e-6 relative step by step
    (the recording computes the same objective and gradient; the RNG draws are the same)."""
    model, args, kwargs = _library_case("gmm")
    plan = ppl.compile(model, *args, **kwargs)
    fmodel = chains.fit_model(model, plan.facts)
    histories = []
    for trace in (True, False):
        with pyro.get_param_store().scope():
            guide = AutoNormal(poutine.block(fmodel, hide=list(plan.facts.enumerable)))
            pyro.set_rng_seed(0)
            step = compiled.guide_objective(fmodel, guide, args, kwargs, compiled.SitePlan.of(plan), trace=trace,
                                            record_after=1)
            histories.append(training.optimize(step, 30, 0.02, False, "test"))
            assert (step.density.reason is None) == trace
    assert histories[0] == pytest.approx(histories[1], rel=1e-6)


@ppl.model
def scaled_evidence(y):
    """A global enumerated site whose children sit under different scales: the compiled run refuses it."""
    p = ppl.sample("p", dist.Beta(y.new_ones(()), 1.0))
    z = ppl.sample("z", dist.Bernoulli(p))
    with pyro.poutine.scale(scale=2.0):
        ppl.sample("y1", dist.Normal(z, 1.0), obs=y)
    ppl.sample("y2", dist.Normal(z, 1.0), obs=y)


def test_the_plan_names_the_fallback_before_the_fit():
    y = torch.tensor(0.4)
    ok = ppl.compile(two_enumerated, torch.randn(5), backend="svi")
    assert ok.density == "" and "density: compiled log density" in ok.explain()
    refused = ppl.compile(scaled_evidence, y, backend="svi")
    assert "'y1'" in refused.density and "'y2'" in refused.density
    assert "density: Pyro's ELBO / potential (fallback)" in refused.explain() and "'y1'" in refused.explain()


def test_the_density_is_recorded_only_after_record_after_evaluations():
    """A short fit (L-BFGS MAP: a few hundred evaluations) runs the interpreter throughout; the recording is made
    at the ``record_after``-th evaluation of a layout, and the objective's values are the same either way."""
    model, args, kwargs = _library_case("gmm")
    plan = ppl.compile(model, *args, **kwargs)
    fmodel = chains.fit_model(model, plan.facts)
    with pyro.get_param_store().scope():
        guide = AutoNormal(poutine.block(fmodel, hide=list(plan.facts.enumerable)))
        step = compiled.guide_objective(fmodel, guide, args, kwargs, compiled.SitePlan.of(plan), record_after=3)
        losses = []
        for n in range(3):
            pyro.set_rng_seed(n)
            losses.append(float(step()[0]))
            assert (len(step.density.recorded) == 1) == (n == 2)
        assert step.density.reason is None
        for n in range(3):
            pyro.set_rng_seed(n)
            assert float(step()[0]) == pytest.approx(losses[n], rel=1e-6)
    assert compiled.RECORD_AFTER > 1   # guide_objective's default: short fits stay on the interpreter


@pytest.mark.parametrize("guide_class", [AutoNormal, AutoDelta])
def test_the_direct_gradients_take_the_steps_of_autograd_on_the_recording(guide_class):
    """``step.direct()`` (loss and gradients straight from the recorded graph, under inference mode) against
    ``step()`` + ``backward`` on the same recording: 40 Adam steps of the float64 GMM from the same seed give
    bitwise the same losses and parameters (the autograd path multiplies the same recorded gradients by 1)."""
    model, args, kwargs = _library_case("gmm")
    plan = ppl.compile(model, *args, **kwargs)
    fmodel = chains.fit_model(model, plan.facts)
    results = []
    for use_direct in (True, False):
        with pyro.get_param_store().scope():
            guide = guide_class(poutine.block(fmodel, hide=list(plan.facts.enumerable)))
            pyro.set_rng_seed(0)
            step = compiled.guide_objective(fmodel, guide, args, kwargs, compiled.SitePlan.of(plan), record_after=1)
            assert step.direct is not None
            if not use_direct:
                step.direct = None
            history = training.optimize(step, 40, 0.02, False, "test")
            assert step.density.reason is None
            results.append((history, [p.detach().clone() for p in step()[1]]))
    assert results[0][0] == results[1][0]
    for a, b in zip(results[0][1], results[1][1]):
        assert torch.equal(a, b)


def test_direct_is_none_until_the_density_is_recorded():
    """Before its recording (``record_after`` evaluations) the step's ``direct()`` gives None (the loop then
    differentiates ``step()``), after it a loss and one gradient per guide parameter."""
    model, args, kwargs = _library_case("gmm")
    plan = ppl.compile(model, *args, **kwargs)
    fmodel = chains.fit_model(model, plan.facts)
    with pyro.get_param_store().scope():
        guide = AutoNormal(poutine.block(fmodel, hide=list(plan.facts.enumerable)))
        step = compiled.guide_objective(fmodel, guide, args, kwargs, compiled.SitePlan.of(plan), record_after=2)
        step()
        assert step.direct() is None
        _, params = step()
        loss, grads = step.direct()
        assert loss.dim() == 0 and {id(p) for p, _ in grads} == {id(p) for p in params}
        assert all(g.shape == p.shape for p, g in grads)
