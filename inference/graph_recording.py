"""Tools for recording a tensor function as one straight-line graph (``torch.fx`` via ``make_fx``) that can be
trusted: the NUTS potential (``mcmc/potential.py``) and the compiled log density (``compiled.py``) both record
``z -> (gradient, value)`` once and run the graph afterwards.

A recording bakes in every Python value the traced code read off a tensor. ``add_guards`` turns the reads that
depend on the input into extra outputs (checked at each call by the caller); ``fold_constants`` evaluates what
depends on constants alone once; ``mutates`` says whether the graph writes in place (folding is then unsafe).
"""
from __future__ import annotations

import torch


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


def fold_constants(module: torch.fx.GraphModule, *examples: torch.Tensor) -> torch.fx.GraphModule:
    """``module`` with every tensor computed from constants only (the data, the priors' parameters, the
    validation of the observations) evaluated once and stored as an attribute; dead nodes removed. ``examples``:
    inputs to run it at (one per placeholder). Only for a graph without in-place ops (``mutates``), where a
    folded tensor is never written to."""
    graph = module.graph
    dependent = depends_on_input(graph)
    values: dict = {}

    class Recorder(torch.fx.Interpreter):
        def run_node(self, node):
            out = super().run_node(node)
            values[node] = out
            return out

    Recorder(module).run(*examples)
    folded = 0
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


def _copy(module: torch.fx.GraphModule) -> torch.fx.GraphModule:
    graph = torch.fx.Graph()
    graph.output(graph.graph_copy(module.graph, {}))
    return torch.fx.GraphModule(module, graph)


def _same_tensor(a, b) -> bool:
    """Whether ``a`` could stand for ``b``: same shape, strides, dtype, device (values are checked by the caller)."""
    return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape
            and a.stride() == b.stride() and a.dtype == b.dtype and a.device == b.device)


def simplify(module: torch.fx.GraphModule, *examples: torch.Tensor) -> torch.fx.GraphModule:
    """A copy of ``module`` (a graph without in-place ops: ``mutates`` False) with fewer operations, for graphs run
    many times where each op costs its dispatch (microseconds) more than its arithmetic: the ``SHAPE_ONLY``
    creations become constants (so ``fold_constants`` folds what is computed from them), and an op that returns
    its argument unchanged is replaced by that argument: ``detach``, a view (``IDENTITY_VIEWS``) whose result has
    the argument's shape and strides, ``x + 0``, ``x - 0``, ``x * 1``, ``x / 1``, ``x ** 1`` where the result has
    x's shape, strides and dtype (read off one run at ``examples``). Nodes that are outputs are kept. The caller
    checks that the copy gives the same outputs."""
    module = _copy(module)
    graph = module.graph
    values: dict = {}

    class Recorder(torch.fx.Interpreter):
        def run_node(self, node):
            out = super().run_node(node)
            values[node] = out
            return out

    Recorder(module).run(*examples)
    constants = 0
    for node in list(graph.nodes):
        if node.op != "call_function" or any(user.op == "output" for user in node.users):
            continue
        name = getattr(getattr(node.target, "overloadpacket", None), "__name__", "")
        source = node.args[0] if node.args and isinstance(node.args[0], torch.fx.Node) else None
        if name in SHAPE_ONLY and isinstance(values.get(node), torch.Tensor):
            module.register_buffer(f"_shape_only_{constants}", values[node].detach().clone())
            with graph.inserting_before(node):
                replacement = graph.get_attr(f"_shape_only_{constants}")
            constants += 1
        elif source is None or not _same_tensor(values.get(node), values.get(source)):
            continue
        elif name in IDENTITY_VIEWS:
            replacement = source
        elif (name in NEUTRAL_SCALARS and len(node.args) == 2 and not node.kwargs
              and isinstance(node.args[1], (int, float)) and not isinstance(node.args[1], bool)
              and node.args[1] == NEUTRAL_SCALARS[name]):
            replacement = source
        else:
            continue
        node.replace_all_uses_with(replacement)
    graph.eliminate_dead_code()
    module.recompile()
    return module
