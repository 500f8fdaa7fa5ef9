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
from torch.overrides import TorchFunctionMode
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


def _aliases(node: torch.fx.Node) -> bool:
    """Whether ``node``'s result may share memory with an argument (a view, an in-place op): its schema says so."""
    schema = getattr(node.target, "_schema", None)
    return schema is None or any(r.alias_info is not None for r in schema.returns)


def _out_of_place_twin(node: torch.fx.Node):
    """The out-of-place overload of ``node``'s in-place op (``aten.relu_.default`` -> ``aten.relu.default``) when
    it writes into its first argument alone and the twin takes the same arguments, else None."""
    schema = getattr(node.target, "_schema", None)
    if node.op != "call_function" or schema is None or not schema.name.endswith("_"):
        return None
    writes = [a.alias_info is not None and a.alias_info.is_write for a in schema.arguments]
    if not writes or not writes[0] or any(writes[1:]):
        return None
    packet = getattr(torch.ops.aten, schema.name.split("::")[-1][:-1], None)
    twin = getattr(packet, schema.overload_name or "default", None) if packet is not None else None
    twin_schema = getattr(twin, "_schema", None)
    if twin_schema is None or [a.name for a in twin_schema.arguments] != [a.name for a in schema.arguments]:
        return None
    return twin


def _twin_gives_the_same_tensor(twin, node: torch.fx.Node) -> bool:
    """Whether ``twin`` (an out-of-place op) on ``node``'s arguments gives a tensor of the shape and dtype ``node``
    wrote (no different type promotion), evaluated on the recording's fake tensors (``meta["val"]``)."""
    value = node.meta.get("val")
    mode = getattr(value, "fake_mode", None)
    if mode is None:
        return False
    fake = torch.fx.node.map_arg((node.args, node.kwargs), lambda arg: arg.meta.get("val"))
    try:
        with mode:
            out = twin(*fake[0], **fake[1])
    except Exception:  # noqa: BLE001 - a twin that cannot take these arguments is not used
        return False
    return isinstance(out, torch.Tensor) and out.dtype == value.dtype and out.shape == value.shape


def inline_mutations(module: torch.fx.GraphModule) -> bool:
    r"""Rewrite the in-place ops of ``module`` that write into a temporary of the graph as their out-of-place twins
    (``x.logical_and_(y)`` -> ``x' = x.logical_and(y)``, later readers of ``x`` read ``x'``): what the backward
    formulas of autograd write (masks, ``relu_``, ``scatter_`` into a ``zeros_like``), without the second recording
    through ``torch.func.functionalize`` that costs as much as the first. An op is rewritten only when the tensor it
    writes into is computed by a node that does not alias (a fresh tensor, not an input, a constant or a view), no
    view of it is taken, and the twin gives a tensor of its shape and dtype (no other type promotion). True when
    no op of the graph writes in place afterwards (``mutates`` False); the caller checks the outputs
    (``without_mutations``)."""
    graph = module.graph
    order = {node: i for i, node in enumerate(graph.nodes)}
    changed = False
    for node in list(graph.nodes):
        twin = _out_of_place_twin(node)
        target = node.args[0] if twin is not None and node.args else None
        if (not isinstance(target, torch.fx.Node) or target.op != "call_function" or _aliases(target)
                or any(user is not node and _aliases(user) for user in target.users)
                or not _twin_gives_the_same_tensor(twin, node)):
            continue
        with graph.inserting_before(node):
            fresh = graph.call_function(twin, node.args, node.kwargs)
        fresh.meta = dict(node.meta)
        order[fresh] = order[node]
        later = [user for user in target.users if user is not node and order[user] > order[node]]
        for user in later:
            user.replace_input_with(target, fresh)
        node.replace_all_uses_with(fresh)
        graph.erase_node(node)
        changed = True
    if changed:
        module.recompile()
    return not mutates(graph)


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
        guards = (flat[0] if len(flat) == 1 else graph.call_function(aten.cat.default, (flat,)) if flat else
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


def _fresh_name(module: torch.fx.GraphModule, prefix: str) -> str:
    """``prefix_<n>`` with the smallest n that ``module`` has no attribute of (a graph simplified twice keeps the
    constants of the first pass)."""
    n = 0
    while hasattr(module, f"{prefix}_{n}"):
        n += 1
    return f"{prefix}_{n}"


SCALAR_DTYPES = (torch.float32, torch.float64)
"""Dtypes whose ops compute with a Python number exactly as with a 0-dim tensor of that dtype holding it (their
op math is the dtype itself: not half precision, whose kernels keep the number in float32)."""


def _tensor_twin(node: torch.fx.Node):
    """``(target, argument kinds)``: ``node``'s op itself, or its ``.Tensor`` overload with the same argument names
    when the op takes Python numbers (``mul.Scalar`` -> ``mul.Tensor``, ``ge.Scalar`` -> ``ge.Tensor``); the kinds
    are the TorchScript type kinds of the target's arguments."""
    schema = node.target._schema
    kinds = [a.type.kind() for a in schema.arguments]
    if "NumberType" in kinds[:len(node.args)]:
        packet = getattr(torch.ops.aten, schema.name.split("::")[-1], None)
        twin = getattr(packet, "Tensor", None) if packet is not None else None
        twin_schema = getattr(twin, "_schema", None)
        if twin_schema is not None and [a.name for a in twin_schema.arguments] == [a.name for a in schema.arguments]:
            return twin, [a.type.kind() for a in twin_schema.arguments]
    return node.target, kinds


def _scalars_as_tensors(module: torch.fx.GraphModule, values: dict) -> int:
    """Replace the Python numbers that ops of ``module`` take in place of a tensor by 0-dim constants of the op's
    dtype (``SCALAR_DTYPES``, read off ``values``), switching a ``.Scalar`` overload to its ``.Tensor`` twin:
    TorchScript records such a number as a float64 tensor that every call converts to the op's dtype (``aten::to``
    and a copy, ~2 us a number), and a number passed as ``Scalar`` is wrapped into a tensor at every call too.
    Only where the op's first argument is a tensor of that dtype and its result has that dtype or is boolean (no
    other type promotion); ``alpha`` and other number-only arguments stay. How many ops changed."""
    graph = module.graph
    constants: dict = {}
    changed = 0
    for node in list(graph.nodes):
        if node.op != "call_function" or not hasattr(node.target, "_schema") or not node.args:
            continue
        first, out = values.get(node.args[0]), values.get(node)
        if (not isinstance(first, torch.Tensor) or first.dtype not in SCALAR_DTYPES or not isinstance(out, torch.Tensor)
                or out.dtype not in (first.dtype, torch.bool)):
            continue
        target, kinds = _tensor_twin(node)
        args = list(node.args)
        numbered = [i for i, (a, kind) in enumerate(zip(args, kinds)) if kind == "TensorType"
                    and isinstance(a, (int, float)) and not isinstance(a, bool)]
        if not numbered:
            continue
        for i in numbered:
            key = (float(args[i]), first.dtype)
            if key not in constants:
                name = _fresh_name(module, "_scalar")
                module.register_buffer(name, torch.tensor(args[i], dtype=first.dtype, device=first.device))
                with graph.inserting_before(node):  # before its first use: every later use follows it
                    constants[key] = graph.get_attr(name)
            args[i] = constants[key]
        node.target, node.args = target, tuple(args)
        changed += 1
    return changed


def _cheaper_form(module: torch.fx.GraphModule, node: torch.fx.Node, values: dict, constant) -> tuple | None:
    """``(op, args)`` computing ``node``'s value exactly with one cheaper op, or None: a ``bmm`` over an inner
    dimension of size 1 (outer products: one multiplication each, no sum) is a broadcast ``mul`` (then made
    contiguous if it is not, as bmm's result: ~4 us instead of ~15); ``x ** 2`` is ``x * x`` (what the pow kernel
    computes for exponent 2, without its dispatch on the exponent); a
    ``constant_pad_nd`` along one dim (a composite of ~4 ops) is a ``cat`` with constant blocks (padding) or a
    ``narrow_copy`` (cropping). ``constant(tensor) -> node`` makes a constant of the graph."""
    aten = torch.ops.aten
    args = node.args
    if node.target is aten.bmm.default and isinstance(values.get(args[0]), torch.Tensor) \
            and values[args[0]].shape[-1] == 1:
        return aten.mul.Tensor, args  # made contiguous by the caller, as bmm's result
    if node.target is aten.pow.Tensor_Scalar and len(args) == 2 and args[1] == 2 and not isinstance(args[1], bool):
        return aten.mul.Tensor, (args[0], args[0])  # the kernel's own square (checked at the example)
    if node.target is not aten.constant_pad_nd.default or not isinstance(values.get(args[0]), torch.Tensor):
        return None
    x, pad, fill = values[args[0]], list(args[1]), (args[2] if len(args) > 2 else 0.0)
    padded = [i for i in range(0, len(pad), 2) if pad[i] or pad[i + 1]]
    if len(padded) != 1:
        return None
    left, right = pad[padded[0]], pad[padded[0] + 1]
    dim = x.dim() - 1 - padded[0] // 2
    if left <= 0 and right <= 0:
        return aten.narrow_copy.default, (args[0], dim, -left, x.shape[dim] + left + right)
    if left < 0 or right < 0 or fill is None:
        return None

    def block(size: int):
        shape = list(x.shape)
        shape[dim] = size
        return constant(torch.full(shape, fill, dtype=x.dtype, device=x.device))

    pieces = ([block(left)] if left else []) + [args[0]] + ([block(right)] if right else [])
    return aten.cat.default, (pieces, dim)


def _strides_of_long_dims(x: torch.Tensor) -> tuple:
    """The strides of ``x``'s dims longer than 1 (a size-1 dim's stride never addresses memory)."""
    return tuple(stride for size, stride in zip(x.shape, x.stride()) if size > 1)


def _use_cheaper_ops(module: torch.fx.GraphModule, values: dict) -> int:
    """Replace the ops of ``module`` that ``_cheaper_form`` covers, each kept only where the new op gives exactly
    (``torch.equal``, same strides along dims longer than 1) the old one's value at the example (``values``). How
    many replaced."""
    graph = module.graph
    replaced = 0

    def constant(tensor: torch.Tensor) -> torch.fx.Node:
        name = _fresh_name(module, "_block")
        module.register_buffer(name, tensor)
        with graph.inserting_before(node):
            return graph.get_attr(name)

    for node in list(graph.nodes):
        if node.op != "call_function" or any(user.op == "output" for user in node.users):
            continue
        form = _cheaper_form(module, node, values, constant)
        if form is None:
            continue
        op, args = form
        as_values = torch.fx.node.map_arg(args, lambda a: values[a] if a.op != "get_attr" else
                                          getattr(module, a.target))
        try:
            value, old = op(*as_values), values.get(node)
        except RuntimeError:  # a form these arguments do not fit is not used
            continue
        contiguous = not value.is_contiguous()
        if contiguous:  # bmm gives a contiguous result; a broadcast mul the layout of its arguments
            value = value.contiguous()
        if not (isinstance(old, torch.Tensor) and value.dtype == old.dtype and value.shape == old.shape
                and _strides_of_long_dims(value) == _strides_of_long_dims(old) and torch.equal(value, old)):
            continue
        with graph.inserting_before(node):
            cheaper = graph.call_function(op, args)
            if contiguous:
                cheaper = graph.call_function(torch.ops.aten.clone.default, (cheaper,),
                                              {"memory_format": torch.contiguous_format})
        _substitute(graph, values, node, cheaper, value)
        replaced += 1
    graph.eliminate_dead_code()
    return replaced



def _substitute(graph: torch.fx.Graph, values: dict, node: torch.fx.Node, new: torch.fx.Node,
                value: torch.Tensor) -> None:
    """Put ``new`` (whose example value is ``value``, recorded in ``values``) in the place of ``node`` for all its
    users and remove ``node``."""
    values[new] = value
    node.replace_all_uses_with(new)
    graph.erase_node(node)

CHAINED_VIEWS = frozenset({"view", "_unsafe_view", "permute", "transpose", "t", "unsqueeze", "squeeze", "expand",
                           "slice", "diagonal", "select", "alias", "as_strided"})
"""aten ops whose result is always a view of their first argument (same storage): a chain of them is one
``as_strided`` of the chain's first tensor."""


def _collapse_view_chains(module: torch.fx.GraphModule, values: dict) -> int:
    """Replace each view (``CHAINED_VIEWS``) of a view by one ``as_strided`` of the chain's first tensor, with the
    size, strides and storage offset it had at the example (``values``): a chain of k views costs one op instead
    of k. Only for chains that start at a tensor an op computes afresh at every call (a non-aliasing op: the
    same layout, storage offset 0, at every call), never at an input or a constant. How many replaced."""
    graph = module.graph
    replaced = 0
    for node in list(graph.nodes):
        if (node.op != "call_function" or _op_name(node) not in CHAINED_VIEWS or not node.args
                or not isinstance(node.args[0], torch.fx.Node) or _op_name(node.args[0]) not in CHAINED_VIEWS):
            continue
        root = node.args[0]
        while (root.op == "call_function" and _op_name(root) in CHAINED_VIEWS
               and isinstance(root.args[0], torch.fx.Node)):
            root = root.args[0]
        view, base = values.get(node), values.get(root)
        if (root.op != "call_function" or _aliases(root) or not isinstance(view, torch.Tensor)
                or not isinstance(base, torch.Tensor) or base.storage_offset() != 0
                or view.untyped_storage().data_ptr() != base.untyped_storage().data_ptr()):
            continue
        with graph.inserting_before(node):
            strided = graph.call_function(torch.ops.aten.as_strided.default,
                                          (root, list(view.shape), list(view.stride()), view.storage_offset()))
        _substitute(graph, values, node, strided, view)
        replaced += 1
    graph.eliminate_dead_code()
    return replaced


def simplify(module: torch.fx.GraphModule, *examples: torch.Tensor, passes: int = 3) -> torch.fx.GraphModule:
    """A copy of ``module`` (a graph without in-place ops: ``mutates`` False) with fewer operations, for graphs run
    many times where each op costs its dispatch (microseconds) more than its arithmetic:

    - the ``SHAPE_ONLY`` creations become constants (so ``fold_constants`` folds what is computed from them);
    - an op that returns its argument unchanged is replaced by that argument (``_returns_its_argument``; layouts
      read off one run at ``examples``);
    - deterministic ops with the same target and arguments are merged (common subexpressions);

    repeated ``passes`` times (a replacement exposes others: a view of a view); then ops with an exact cheaper
    form are replaced (``_use_cheaper_ops``: a ``bmm`` of outer products, ``constant_pad_nd``), chains of views
    become one ``as_strided`` (``_collapse_view_chains``), and the Python
    numbers that ops take in place of tensors become 0-dim constants of the op's dtype (``_scalars_as_tensors``:
    no conversion per call). Nodes that are outputs are kept.
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
    _use_cheaper_ops(module, values)
    _collapse_view_chains(module, values)
    _scalars_as_tensors(module, values)
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


class _CumprodEagerBackward(torch.autograd.Function):
    r"""``torch.cumprod(x, dim)`` whose backward is the formula eager autograd takes when ``x`` has no zero,
    :math:`\partial L / \partial x = \mathrm{revcumsum}(y \odot g) / x` (y the output, g its gradient; 5 ops),
    with the test for zeros a Python read of a tensor value (a guard of the recording, ``add_guards``), and
    ``aten.cumprod_backward`` (zeros handled) otherwise. Traced, autograd's own backward takes the branch-free
    form for zeros (~30 ops, a third of the step graph of a model with a simplex site)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, dim: int) -> torch.Tensor:
        out = torch.cumprod(x, dim)
        ctx.save_for_backward(x, out)
        ctx.dim = dim
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):
        x, out = ctx.saved_tensors
        dim = ctx.dim
        if x.numel() <= 1 or x.shape[dim] == 1:   # eager autograd's shortcut
            return grad, None
        if bool((x == 0).any()):
            return torch.ops.aten.cumprod_backward.default(grad, x, dim, out), None
        return (out * grad).flip(dim).cumsum(dim).flip(dim).div(x), None


class EagerBackwards(TorchFunctionMode):
    """Inside a recording, route the ops whose traced backward is much longer than eager autograd's
    (``torch.cumprod``: ``_CumprodEagerBackward``) through a function with eager's formula; the gradients are
    eager autograd's, bitwise. Not inside ``torch.func`` transforms (their tensors are wrapped: an autograd.Function
    there needs a vmap rule), which keep autograd's traced formulas."""

    CUMPROD = (torch.cumprod, torch.Tensor.cumprod)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in self.CUMPROD and kwargs.get("dtype") is None and args and isinstance(args[0], torch.Tensor):
            dim = args[1] if len(args) > 1 else kwargs.get("dim")
            x = args[0]
            if (isinstance(dim, int) and len(args) <= 2 and set(kwargs) <= {"dim", "dtype"} and x.requires_grad
                    and x.is_floating_point() and torch.is_grad_enabled()
                    and not torch._C._functorch.is_functorch_wrapped_tensor(x)):  # vmap, torch.func.grad: theirs
                return _CumprodEagerBackward.apply(x, dim)
        return func(*args, **kwargs)


class ValueDependentShape(Exception):
    """A recording read a shape off tensor values that depend on the input (``nonzero``, ``unique``, ...): no guard
    can check it."""


def make_graph(fn, *examples: torch.Tensor) -> torch.fx.GraphModule:
    """``make_fx(fn)(*examples)``: ``fn``'s aten operations on these inputs as one FX graph (real tensors, Python
    reads of tensor values baked in: see ``add_guards``). Every node's shape metadata is made under one fake-tensor
    mode for the whole recording (``make_fx`` otherwise creates a mode, with a Python stack trace, per node: half of
    the recording time of a small model). ``fn`` runs under ``EagerBackwards`` (eager autograd's backward formulas
    where the traced ones are longer)."""
    def eager_backwards(*inputs):
        with EagerBackwards():
            return fn(*inputs)

    with tracing(TracingContext(FakeTensorMode(allow_fallback_kernels=True))):
        return make_fx(eager_backwards, _error_on_data_dependent_ops=False)(*examples)


def without_mutations(module: torch.fx.GraphModule, *examples: torch.Tensor,
                      max_functionalized_nodes: float = float("inf")) -> torch.fx.GraphModule:
    """``module`` (a graph with in-place ops) as a graph without them where it can be, giving exactly
    (``torch.equal``) its outputs at ``examples``: a copy with the writes into temporaries rewritten
    (``inline_mutations``: no second recording); else ``module`` recorded again through ``torch.func.functionalize``
    when it has at most ``max_functionalized_nodes`` nodes (slow per node); else ``module`` itself."""
    reference = pytree.tree_leaves(module(*examples))
    rewritten = _copy(module)
    if inline_mutations(rewritten) and _same_leaves(rewritten(*examples), reference):
        return rewritten
    if len(module.graph.nodes) <= max_functionalized_nodes:
        return make_graph(torch.func.functionalize(module), *examples)
    return module


def _same_leaves(outputs, reference: list) -> bool:
    leaves = pytree.tree_leaves(outputs)
    return len(leaves) == len(reference) and all(
        torch.equal(a, b) if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) else a == b
        for a, b in zip(leaves, reference))


def record_graph(fn, *examples: torch.Tensor, max_functionalized_nodes: float = float("inf")) -> tuple:
    """Record ``fn(*examples) -> (grads, value)`` as a graph to run in its place: ``(run, outputs)`` where
    ``run(*inputs) -> (grads, value, guards)`` and ``outputs`` is what it gave at ``examples``.

    Steps: ``make_graph``; when the graph writes in place, ``without_mutations`` (the writes into temporaries
    rewritten out of place, else recorded again through ``torch.func.functionalize`` when it has at most
    ``max_functionalized_nodes`` nodes), so that its constants can be folded;
    ``add_guards`` (``ValueDependentShape`` when a value-dependent shape makes the recording unsafe);
    ``fold_and_simplify`` when nothing writes in place; then ``torch.jit.trace`` of the graph when it gives exactly
    the graph's outputs (TorchScript runs a graph of a few hundred small ops ~2x faster than FX's Python), else the
    FX graph itself. Any other failure propagates: the callers keep their interpreter.

    The graph is recorded at contiguous copies of non-contiguous examples and ``run`` makes its inputs contiguous
    (a no-op for contiguous ones): the layouts ``simplify`` reads off the example (which views return their
    argument, the strides of a chain of views) are then those of every call."""
    examples = tuple(x.contiguous() if isinstance(x, torch.Tensor) else x for x in examples)
    module = make_graph(fn, *examples)
    if mutates(module.graph):
        module = without_mutations(module, *examples, max_functionalized_nodes=max_functionalized_nodes)
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
    return _on_contiguous_inputs(run), outputs


def _on_contiguous_inputs(run):
    """``run`` called with its tensor inputs made contiguous (the layouts it was recorded at)."""
    def run_on_contiguous(*inputs):
        return run(*(x.contiguous() if isinstance(x, torch.Tensor) and not x.is_contiguous() else x
                     for x in inputs))

    return run_on_contiguous
