"""Tools for recording a tensor function as one straight-line graph (``torch.fx`` via ``make_fx``) that can be
trusted: the NUTS potential (``mcmc/potential.py``) and the compiled log density (``compiled.py``) both record
``z -> (gradient, value)`` once and run the graph afterwards.

A recording bakes in every Python value the traced code read off a tensor. ``add_guards`` turns the reads that
depend on the input into extra outputs (checked at each call by the caller); ``fold_constants`` evaluates what
depends on constants alone once; ``mutates`` says whether the graph writes in place (folding is then unsafe).
"""
from __future__ import annotations

import torch
from torch._guards import TracingContext, tracing
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.proxy_tensor import make_fx
from torch.utils import _pytree as pytree


VALUE_READS = frozenset({"_local_scalar_dense", "item", "is_nonzero", "equal", "nonzero", "masked_select",
                         "_unique", "_unique2", "unique_dim", "unique_consecutive", "repeat_interleave",
                         "allclose"})
"""aten ops whose result (a Python number, or a shape) depends on a tensor's values: a trace that does one on a
tensor depending on z has baked in the branch taken at the starting points. A Python number
(``_local_scalar_dense``) is guarded at every call; a value-dependent shape refuses the trace."""

GUARDABLE = frozenset({"_local_scalar_dense", "item", "is_nonzero", "equal", "allclose"})
"""The reads of ``VALUE_READS`` that give a Python number or bool, which a guard can recompute as a tensor."""


def depends_on_input(graph: torch.fx.Graph) -> set:
    """The nodes of ``graph`` computed from its placeholders (in topological order, one pass)."""
    dependent: set = set()
    for node in graph.nodes:
        if node.op == "placeholder" or any(a in dependent for a in node.all_input_nodes):
            dependent.add(node)
    return dependent


def _values_at(module: torch.fx.GraphModule, *examples: torch.Tensor) -> dict:
    """node -> its value when ``module`` runs at ``examples``."""
    values: dict = {}

    class Recorder(torch.fx.Interpreter):
        def run_node(self, node):
            out = super().run_node(node)
            values[node] = out
            return out

    Recorder(module).run(*examples)
    return values


def fold_constants(module: torch.fx.GraphModule, *examples: torch.Tensor) -> torch.fx.GraphModule:
    """``module`` with every tensor computed from constants only (the data, the priors' parameters, the
    validation of the observations) evaluated once and stored as an attribute; dead nodes removed. ``examples``:
    inputs to run it at (one per placeholder). Only for a graph without in-place ops (``mutates``), where a
    folded tensor is never written to."""
    graph = module.graph
    dependent = depends_on_input(graph)
    values = _values_at(module, *examples)
    folded = sum(1 for name, _ in module.named_buffers() if name.startswith("_folded_"))  # a second fold adds names
    for node in list(graph.nodes):
        if (node.op != "call_function" or node in dependent or not isinstance(values.get(node), torch.Tensor)
                or not any(user in dependent for user in node.users)):
            continue
        name = f"_folded_{folded}"
        folded += 1
        module.register_buffer(name, values[node].detach().clone())
        with graph.inserting_before(node):
            constant = graph.get_attr(name)
        node.replace_all_uses_with(constant)
    graph.eliminate_dead_code()
    module.recompile()
    return module


def mutates(graph: torch.fx.Graph) -> bool:
    """Whether an op of ``graph`` writes into one of its arguments (in-place or ``out=``)."""
    return any(node.op == "call_function" and getattr(getattr(node.target, "_schema", None), "is_mutable", False)
               for node in graph.nodes)


def add_guards(module: torch.fx.GraphModule) -> bool:
    """Make the values the traced Python read off tensors that depend on z (``GUARDABLE``: ``bool(t)``,
    ``float(t)``, ``t.item()``, ``torch.allclose``, ``torch.equal``) a third output of ``module``, as tensors,
    one float64 vector (empty when there are none). False when a read of another kind depends on z (a shape
    that depends on values: ``nonzero``, ``unique``, ...), which no guard can check."""
    graph = module.graph
    dependent = depends_on_input(graph)
    reads = []
    for node in graph.nodes:
        name = getattr(getattr(node.target, "overloadpacket", None), "__name__", "")
        if node.op != "call_function" or node not in dependent or name not in VALUE_READS:
            continue
        if name not in GUARDABLE:
            return False
        reads.append((name, node))
    output = next(n for n in graph.nodes if n.op == "output")
    aten = torch.ops.aten
    with graph.inserting_before(output):
        guarded = []
        for name, node in reads:   # the tensor the Python value was read from (jit.trace bakes Python values)
            if name == "allclose":
                x = graph.call_function(aten.all.default, (graph.call_function(aten.isclose.default, node.args,
                                                                               node.kwargs),))
            elif name == "equal":
                x = graph.call_function(aten.all.default, (graph.call_function(aten.eq.Tensor, node.args[:2]),))
            else:
                x = node.args[0]
            guarded.append(x)
        flat = [graph.call_function(aten._to_copy.default, (graph.call_function(aten.reshape.default, (x, [-1])),),
                                    {"dtype": torch.float64}) for x in guarded]
        guards = (graph.call_function(aten.cat.default, (flat,)) if flat else
                  graph.call_function(aten.zeros.default, ([0],), {"dtype": torch.float64}))
    grads, us = output.args[0]
    output.args = ((grads, us, guards),)
    module.recompile()
    return True


SHAPE_ONLY = frozenset({"new_ones", "new_zeros", "new_full", "zeros_like", "ones_like", "full_like"})
"""aten ops whose result reads only the shape, dtype and device of their tensor argument (fixed in a recording),
never its values: constants of the recording even when that argument depends on the input."""

IDENTITY_VIEWS = frozenset({"detach", "alias", "view", "_unsafe_view", "reshape", "expand", "permute", "squeeze",
                            "unsqueeze", "t", "transpose"})
"""aten ops that return their first argument itself when the result has its shape and strides."""

NEUTRAL_SCALARS = {"add": 0, "sub": 0, "mul": 1, "div": 1, "pow": 1}
"""aten ops with a Python number that leaves their tensor argument unchanged (x + 0, x * 1, x ** 1, ...)."""

SQUEEZABLE = frozenset({"unsqueeze", "view", "_unsafe_view", "reshape"})
"""aten ops whose size-1 dims a ``sum`` over those dims undoes."""

RANDOM_OPS = ("rand", "normal", "bernoulli", "multinomial", "poisson", "dropout", "exponential", "uniform")
"""Parts of the names of aten ops that draw random numbers (never merged: two draws differ)."""


def _copy(module: torch.fx.GraphModule) -> torch.fx.GraphModule:
    graph = torch.fx.Graph()
    graph.output(graph.graph_copy(module.graph, {}))
    return torch.fx.GraphModule(module, graph)


def _same_tensor(a, b) -> bool:
    """Whether ``a`` could stand for ``b``: same shape, strides, dtype, device (values are checked by the caller)."""
    return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape
            and a.stride() == b.stride() and a.dtype == b.dtype and a.device == b.device)


def _op_name(node: torch.fx.Node) -> str:
    return getattr(getattr(node.target, "overloadpacket", None), "__name__", "")


def _returns_its_argument(node: torch.fx.Node, values: dict):
    """The node that ``node`` computes unchanged (same shape, strides, dtype, device, values), or None:
    ``detach``, a view (``IDENTITY_VIEWS``) to its argument's own layout, ``x + 0``, ``x - 0``, ``x * 1``,
    ``x / 1``, ``x ** 1``, and a ``sum`` over size-1 dims of ``unsqueeze(y)`` / ``view(y)`` with ``y``'s layout."""
    if node.op != "call_function" or node.kwargs or not node.args or not isinstance(node.args[0], torch.fx.Node):
        return None
    name, source, out = _op_name(node), node.args[0], values.get(node)
    if name == "sum" and len(node.args) == 2 and source.op == "call_function" and _op_name(source) in SQUEEZABLE:
        inner, dims = source.args[0], node.args[1]
        if (isinstance(inner, torch.fx.Node) and isinstance(dims, (list, tuple)) and dims
                and isinstance(values.get(source), torch.Tensor)
                and all(values[source].shape[d] == 1 for d in dims) and _same_tensor(out, values.get(inner))):
            return inner
        return None
    if not _same_tensor(out, values.get(source)):
        return None
    if name in IDENTITY_VIEWS:
        return source
    other = node.args[1] if len(node.args) == 2 else None
    if (name in NEUTRAL_SCALARS and isinstance(other, (int, float)) and not isinstance(other, bool)
            and other == NEUTRAL_SCALARS[name]):
        return source
    return None


def _deterministic(node: torch.fx.Node) -> bool:
    return not any(word in _op_name(node) for word in RANDOM_OPS)


def _merge_common(graph: torch.fx.Graph) -> int:
    """Merge the deterministic nodes with the same op and arguments (after earlier merges); how many merged."""
    seen: dict = {}
    merged = 0
    for node in list(graph.nodes):
        if node.op != "call_function" or not _deterministic(node):
            continue
        try:
            key = (node.target, node.args, tuple(sorted(node.kwargs.items())))
            hash(key)
        except TypeError:       # unhashable arguments (lists): compare them by their text
            key = (node.target, repr(node.args), repr(sorted(node.kwargs.items())))
        if key in seen:
            node.replace_all_uses_with(seen[key])
            merged += 1
        else:
            seen[key] = node
    return merged


def simplify(module: torch.fx.GraphModule, *examples: torch.Tensor, passes: int = 3) -> torch.fx.GraphModule:
    """A copy of ``module`` (a graph without in-place ops: ``mutates`` False) with fewer operations, for graphs run
    many times where each op costs its dispatch (microseconds) more than its arithmetic:

    - the ``SHAPE_ONLY`` creations become constants (so ``fold_constants`` folds what is computed from them);
    - an op that returns its argument unchanged is replaced by that argument (``_returns_its_argument``; layouts
      read off one run at ``examples``);
    - deterministic ops with the same target and arguments are merged (common subexpressions);

    repeated ``passes`` times (a replacement exposes others: a view of a view). Nodes that are outputs are kept.
    The caller checks that the copy gives the same outputs (``fold_and_simplify`` does)."""
    module = _copy(module)
    graph = module.graph
    values = _values_at(module, *examples)
    constants = 0
    for node in list(graph.nodes):
        if (node.op == "call_function" and _op_name(node) in SHAPE_ONLY and isinstance(values.get(node), torch.Tensor)
                and not any(user.op == "output" for user in node.users)):
            module.register_buffer(f"_shape_only_{constants}", values[node].detach().clone())
            with graph.inserting_before(node):
                node.replace_all_uses_with(graph.get_attr(f"_shape_only_{constants}"))
            constants += 1
    for _ in range(passes):
        changed = 0
        for node in list(graph.nodes):
            if any(user.op == "output" for user in node.users):
                continue
            source = _returns_its_argument(node, values)
            if source is not None:
                node.replace_all_uses_with(source)
                changed += 1
        changed += _merge_common(graph)
        graph.eliminate_dead_code()
        if not changed:  # a replacement or a merge computes the value it replaces: ``values`` stays valid
            break
    module.recompile()
    return module


def fold_and_simplify(module: torch.fx.GraphModule, *examples: torch.Tensor) -> torch.fx.GraphModule:
    """``simplify`` then ``fold_constants`` of ``module`` (a graph without in-place ops), kept when it gives exactly
    (``torch.equal``) the outputs of ``module`` at ``examples`` and the rewrites run; else ``module`` with its
    constants folded alone. ``module`` itself may be modified (``fold_constants`` folds it in place)."""
    reference = pytree.tree_leaves(module(*examples))
    try:
        simpler = fold_constants(simplify(module, *examples), *examples)
        same = all(torch.equal(a, b) for a, b in zip(pytree.tree_leaves(simpler(*examples)), reference))
    except Exception:  # noqa: BLE001 - a graph these rewrites cannot handle is only folded
        same = False
    return simpler if same else fold_constants(module, *examples)


class ValueDependentShape(Exception):
    """A recording read a shape off tensor values that depend on the input (``nonzero``, ``unique``, ...): no guard
    can check it."""


def make_graph(fn, *examples: torch.Tensor) -> torch.fx.GraphModule:
    """``make_fx(fn)(*examples)``: ``fn``'s aten operations on these inputs as one FX graph (real tensors, Python
    reads of tensor values baked in: see ``add_guards``). Every node's shape metadata is made under one fake-tensor
    mode for the whole recording (``make_fx`` otherwise creates a mode, with a Python stack trace, per node: half of
    the recording time of a small model)."""
    with tracing(TracingContext(FakeTensorMode(allow_fallback_kernels=True))):
        return make_fx(fn, _error_on_data_dependent_ops=False)(*examples)


def record_graph(fn, *examples: torch.Tensor, max_functionalized_nodes: float = float("inf")) -> tuple:
    """Record ``fn(*examples) -> (grads, value)`` as a graph to run in its place: ``(run, outputs)`` where
    ``run(*inputs) -> (grads, value, guards)`` and ``outputs`` is what it gave at ``examples``.

    Steps: ``make_graph``; recorded again through ``torch.func.functionalize`` when the graph writes in place and
    has at most ``max_functionalized_nodes`` nodes (so that its constants can be folded; slow per node);
    ``add_guards`` (``ValueDependentShape`` when a value-dependent shape makes the recording unsafe);
    ``fold_and_simplify`` when nothing writes in place; then ``torch.jit.trace`` of the graph when it gives exactly
    the graph's outputs (TorchScript runs a graph of a few hundred small ops ~2x faster than FX's Python), else the
    FX graph itself. Any other failure propagates: the callers keep their interpreter."""
    module = make_graph(fn, *examples)
    if mutates(module.graph) and len(module.graph.nodes) <= max_functionalized_nodes:
        module = make_graph(torch.func.functionalize(module), *examples)
    if not add_guards(module):
        raise ValueDependentShape("a shape in the model depends on latent values (nonzero, unique, ...)")
    if not mutates(module.graph):  # simplifying and folding assume no op writes into a tensor
        module = fold_and_simplify(module, *examples)
    outputs = module(*examples)
    run = module
    try:
        jitted = torch.jit.trace(module, tuple(examples), check_trace=False)
        if all(torch.equal(a, b) for a, b in zip(pytree.tree_leaves(jitted(*examples)), pytree.tree_leaves(outputs))):
            run = jitted
    except Exception:  # noqa: BLE001 - TorchScript cannot record every graph: run the FX graph itself
        pass
    return run, outputs
