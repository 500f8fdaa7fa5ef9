"""Shrink a recorded aten graph (``make_fx`` of a potential and its gradient) before it is run at every leapfrog
step: each op of a small model costs a few microseconds of dispatch whatever its size, and autograd's recorded
backward leaves many that compute nothing new.

``fold_and_simplify(module, example)`` folds constants and rewrites, on a graph without in-place ops, using the
shapes and dtypes the graph gives at ``example``:

- shape-only ops (``zeros_like``, ``ones_like``, ``full_like``, ``new_zeros``, ``new_ones``, ``new_full``), whose
  value depends on their input's shape alone (fixed in a recording), become constants; then every op computed
  from constants alone is folded (``graph_recording.fold_constants``, once: it names its buffers from 0);
- identities: ``x + 0``, ``x - 0``, ``x * 1``, ``x / 1``, ``x ** 1``, and ``view`` / ``expand`` / ``reshape`` /
  ``_unsafe_view`` to ``x``'s own shape, become ``x`` when the result has ``x``'s shape and dtype; a ``sum`` over
  dimensions of size 1 of ``unsqueeze(y)`` or ``view(y)`` whose result has ``y``'s shape becomes ``y``;
- common subexpressions: two nodes with the same op and the same arguments become one.

The rewritten graph is kept only when it gives the same outputs as the folded graph at ``example`` (bit for bit
on the guard output, 1e-12 relative on the others); else the folded graph alone is returned.
"""
from __future__ import annotations

import copy

import torch

from ..graph_recording import fold_constants

aten = torch.ops.aten

SHAPE_ONLY = frozenset({aten.zeros_like.default, aten.ones_like.default, aten.full_like.default,
                        aten.new_zeros.default, aten.new_ones.default, aten.new_full.default})
"""Ops whose value depends on the shape (and dtype) of their tensor argument only."""

IDENTITY = {aten.add.Tensor: 0, aten.sub.Tensor: 0, aten.mul.Tensor: 1, aten.div.Tensor: 1, aten.add.Scalar: 0,
            aten.sub.Scalar: 0, aten.mul.Scalar: 1, aten.div.Scalar: 1, aten.pow.Tensor_Scalar: 1}
"""Binary ops -> the Python number that, as their second argument, leaves the first unchanged."""

SAME_SHAPE_VIEWS = frozenset({aten.view.default, aten.expand.default, aten.reshape.default,
                              aten._unsafe_view.default})
"""Ops that return their input unchanged when asked for its own shape."""

SQUEEZABLE = frozenset({aten.unsqueeze.default, aten.view.default, aten._unsafe_view.default, aten.reshape.default})
"""Ops a ``sum`` over size-1 dimensions can undo."""


def _record(module: torch.fx.GraphModule, example: torch.Tensor) -> dict:
    """node -> its value at ``example`` (tensors only)."""
    values: dict = {}

    class Recorder(torch.fx.Interpreter):
        def run_node(self, node):
            out = super().run_node(node)
            if isinstance(out, torch.Tensor):
                values[node] = out
            return out

    Recorder(module).run(example)
    return values


def _same_meta(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    return a is not None and b is not None and a.shape == b.shape and a.dtype == b.dtype


def _replacement(node: torch.fx.Node, values: dict):
    """The node ``node`` can be replaced with (an identity, a same-shape view, a sum over size-1 dimensions), or
    None."""
    if node.op != "call_function" or node.kwargs or not node.args or not isinstance(node.args[0], torch.fx.Node):
        return None
    x, out = node.args[0], values.get(node)
    if node.target in IDENTITY and len(node.args) == 2:
        other = node.args[1]
        if (isinstance(other, (int, float)) and not isinstance(other, bool) and other == IDENTITY[node.target]
                and _same_meta(values.get(x), out)):
            return x
    if node.target in SAME_SHAPE_VIEWS and _same_meta(values.get(x), out):
        return x
    if node.target == aten.sum.dim_IntList and len(node.args) == 2 and x in values and out is not None:
        dims = node.args[1]
        if dims and all(values[x].shape[d] == 1 for d in dims) and x.op == "call_function" and x.target in SQUEEZABLE:
            source = x.args[0]
            if isinstance(source, torch.fx.Node) and _same_meta(values.get(source), out):
                return source
    return None


def _deterministic(node: torch.fx.Node) -> bool:
    name = getattr(getattr(node.target, "overloadpacket", None), "__name__", "")
    return not any(word in name for word in ("rand", "normal", "bernoulli", "multinomial", "poisson", "dropout",
                                             "exponential", "uniform"))


def _eliminate_common(graph: torch.fx.Graph) -> int:
    """Merge nodes with the same op and arguments (after earlier merges); returns how many were merged."""
    seen: dict = {}
    merged = 0
    for node in list(graph.nodes):
        if node.op != "call_function" or not _deterministic(node):
            continue
        try:
            key = (node.target, node.args, tuple(sorted(node.kwargs.items())))
            hash(key)
        except TypeError:       # unhashable arguments (lists): compare them as tuples
            key = (node.target, repr(node.args), repr(sorted(node.kwargs.items())))
        if key in seen:
            node.replace_all_uses_with(seen[key])
            merged += 1
        else:
            seen[key] = node
    return merged


def _same_outputs(a, b) -> bool:
    if len(a) != len(b):
        return False
    for x, y in zip(a, b):
        if x.shape != y.shape or x.dtype != y.dtype:
            return False
        if not torch.allclose(x, y, rtol=1e-12, atol=0.0, equal_nan=True):
            return False
    return True


def fold_and_simplify(module: torch.fx.GraphModule, example: torch.Tensor) -> torch.fx.GraphModule:
    """``module`` (a graph without in-place ops, recorded at ``example``, not yet folded) with its constants folded
    and the rewrites of the module docstring; ``fold_constants(module)`` alone when the rewritten graph's outputs at
    ``example`` differ or a rewrite fails. ``module`` itself may be modified (as ``fold_constants`` does)."""
    try:
        new = copy.deepcopy(module)
        graph = new.graph
        values = _record(new, example)
        constants = 0
        for node in list(graph.nodes):
            if node.op == "call_function" and node.target in SHAPE_ONLY and node in values:
                name = f"_shape_constant_{constants}"
                constants += 1
                new.register_buffer(name, values[node].detach().clone())
                with graph.inserting_before(node):
                    constant = graph.get_attr(name)
                node.replace_all_uses_with(constant)
        graph.eliminate_dead_code()
        new.recompile()
        new = fold_constants(new, example)
        for _ in range(3):      # replacements expose new ones (a view of a view); a few passes reach them
            values = _record(new, example)
            changed = 0
            for node in list(new.graph.nodes):
                target = _replacement(node, values)
                if target is not None:
                    node.replace_all_uses_with(target)
                    changed += 1
            changed += _eliminate_common(new.graph)
            new.graph.eliminate_dead_code()
            new.recompile()
            if not changed:
                break
        after = new(example)
    except Exception:  # noqa: BLE001 - a graph these rewrites cannot handle is only folded
        return fold_constants(module, example)
    folded = fold_constants(module, example)
    before = folded(example)
    if not torch.equal(before[-1], after[-1]) or not _same_outputs(before[:-1], after[:-1]):
        return folded
    return new
