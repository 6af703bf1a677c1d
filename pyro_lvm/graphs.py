"""Traced graphs made cheaper to replay: nothing that computes nothing, constants computed once, and a replay
function that calls each operation's kernel entry directly.

A graph traced by ``make_fx`` (:class:`~pyro_lvm.objectives.TracedLoss`) replays in Python at one dispatch per
operation, 2-7 µs each at these shapes, whatever the operation computes. The MNIST VAE's joint loss-and-gradient
graph holds 183 operations and a factor model's 200-350, and about a third of them compute nothing new: views
undone by later views (``t(t(W))``, the weight gradients' ``t`` pairs), ``expand`` and ``view`` to the shape a
tensor already has, ``x * 1``, ``x / 1``, ``x ** 1.0``, ``x + 0``, ``-(-x)``, and arithmetic on constants (a
standard normal prior's ``log 1`` and ``2 σ²``, the seed gradient ``1 / N``) redone at every step.

:func:`simplify` drops the first kind and computes the second once, and every operation that remains runs the same
kernel on operands of the same shape, dtype and strides as before: the numbers are the traced graph's, bit for bit
(but for the sign of a zero where ``x + 0`` is dropped). One rule changes shapes but not bits: a pointwise
operation on broadcast copies (``expand``) of smaller tensors -- a Normal's scale of one value per feature expanded
to particles × points × features, its ``log`` and its ``2 σ²`` -- runs once on the smaller tensors and is broadcast
after, where every element is one IEEE operation (``EXACT``) or the smaller tensor is one row of the copy
(``UNARY``), and where what reads the result reads it through such an operation. It leaves alone what could
change what a caller sees: an output never becomes a view of an input or a constant, or of another output (the
optimiser scales gradients in place), and no value is folded or forwarded past an in-place write to it (the random
draws' ``normal_(empty(...))``). :func:`replay` then writes the graph as one Python function whose calls go to each
operator's dispatcher entry (``OpOverload._op``) rather than through ``torch.ops.aten.<name>.<overload>``'s
attribute lookups and ``__call__``: about 0.6 µs less per operation.
"""

from __future__ import annotations

import functools
import logging
import math
import operator
from collections.abc import Callable
from typing import Any

import torch
from torch.fx import GraphModule, Node

aten = torch.ops.aten
#: where a rule could not reason about a graph and left it (debug level: the graph still runs, as traced)
_LOG = logging.getLogger(__name__)

#: ``op(x, c)`` is ``x`` when the constant ``c`` is 0 (``RIGHT_ZERO``) or 1 (``RIGHT_ONE``)
RIGHT_ZERO = {aten.add.Tensor, aten.sub.Tensor}
RIGHT_ONE = {aten.mul.Tensor, aten.mul.Scalar, aten.div.Tensor, aten.div.Scalar, aten.pow.Tensor_Scalar}
#: ``op(x, ...)`` whose value depends only on ``x``'s shape, dtype, strides and device, not its values
LIKE = {aten.ones_like.default, aten.zeros_like.default, aten.full_like.default}
#: pointwise operations each of whose elements, in float32 and float64, is one correctly rounded IEEE operation on
#: the same elements (or a copy), whether the kernel takes its vector loop or its scalar one: the same bits on a
#: broadcast view (stride 0) as on the tensor it stands for, and on the smaller tensor as on its broadcast copy (not
#: so for complex numbers, whose products the two loops round differently)
EXACT = {aten.add.Tensor, aten.sub.Tensor, aten.mul.Tensor, aten.mul.Scalar, aten.div.Tensor, aten.div.Scalar,
         aten.neg.default, aten.sqrt.default, aten.reciprocal.default}
#: ``pow(x, c)`` is exact for these ``c`` (ATen computes a copy, x·x, x·x·x, √x and 1/x in both loops, real dtypes)
EXACT_POWERS = (1, 2, 3, 0.5, -1)
#: transcendental functions of one tensor that ATen computes with one vector function for every element, a row's
#: tail included (its ``vml`` kernels): run on the smaller tensor where that is one row (of two or more elements,
#: in the output's dtype) of the broadcast copy. Not ``sigmoid`` or ``softplus``, whose vector and scalar loops
#: round differently: where a thread's share or a row ends moves an element from one loop to the other
UNARY = {aten.log.default, aten.exp.default, aten.log1p.default, aten.expm1.default, aten.tanh.default}
#: the dtypes the rule runs small in
REAL = (torch.float32, torch.float64)


def _schema(node: Node) -> Any:
    return node.target._schema if node.op == "call_function" and isinstance(node.target, torch._ops.OpOverload) \
        else None


def _is_view(node: Node) -> bool:
    """An operation whose output aliases its first argument (``t``, ``view``, ``expand``, ``unbind``, ...), or an
    item taken from such an operation's list of outputs."""
    if node.op == "call_function" and node.target is operator.getitem:
        return isinstance(node.args[0], Node) and _is_view(node.args[0])
    s = _schema(node)
    return s is not None and not s.is_mutable and any(r.alias_info is not None for r in s.returns)


def _source(node: Node) -> Node | None:
    """What a view is a view of."""
    a = node.args[0]
    if node.target is operator.getitem:
        a = a.args[0] if isinstance(a, Node) else None
    return a if isinstance(a, Node) else None


def _written(node: Node) -> list[Node]:
    """The arguments an in-place or ``out=`` operation writes to (``add_``'s ``self``; the first is what it
    returns), else none."""
    s = _schema(node)
    if s is None or not s.is_mutable:
        return []
    out = []
    for i, a in enumerate(s.arguments):
        if a.alias_info is not None and a.alias_info.is_write:
            v = node.args[i] if i < len(node.args) else node.kwargs.get(a.name)
            if isinstance(v, Node):
                out.append(v)
    return out


def _root(node: Node) -> Node:
    """The node that owns the memory ``node``'s value lives in: itself, unless it is a view, or the result of an
    in-place or ``out=`` operation (which is the tensor it wrote to)."""
    while True:
        src = _source(node) if _is_view(node) else next(iter(_written(node)), None)
        if src is None:
            return node
        node = src


def _layout(node: Node) -> tuple[Any, ...] | None:
    v = node.meta.get("val")
    if not isinstance(v, torch.Tensor):
        return None
    # the conjugate and negative bits: a lazy conj() or _neg_view() has the layout of its input, not its values
    return tuple(v.shape), v.dtype, v.device, v.stride(), v.storage_offset(), v.is_conj(), v.is_neg()


def _mutated_roots(graph: torch.fx.Graph) -> set[Node]:
    """The roots of every value an in-place operation of the graph writes to."""
    return {_root(v) for node in graph.nodes for v in _written(node)}


def _identity_of(node: Node, mutated: set[Node]) -> Node | None:
    """The earlier node whose value ``node`` repeats exactly (same values, shape, dtype and strides), or ``None``."""
    lay = _layout(node)
    if lay is None or node.target is aten.detach.default:  # a detach is a view that stops gradients: it stays
        return None
    if _is_view(node):  # a view whose layout is that of a tensor further up its chain of views: that tensor
        src = _source(node)
        while src is not None:
            if _layout(src) == lay:
                return src
            src = _source(src) if _is_view(src) else None
        return None
    args, cand = node.args, None
    if len(args) == 2 and type(args[1]) in (int, float) and not node.kwargs:
        if (node.target in RIGHT_ZERO and args[1] == 0) or (node.target in RIGHT_ONE and args[1] == 1):
            cand = args[0]
    elif node.target is aten.neg.default and isinstance(args[0], Node) and args[0].target is aten.neg.default:
        cand = args[0].args[0]
    # a copy replaced by its original: only where nothing writes to either (a write to the copy would reach the
    # original, an input perhaps; a write to the original would reach the copy's readers)
    if isinstance(cand, Node) and _layout(cand) == lay and _root(cand) not in mutated and _root(node) not in mutated:
        return cand
    return None


def _key(a: Any) -> Any:
    """A hashable stand-in for an operation's argument; a number keeps its type, and a float its sign of zero."""
    if isinstance(a, (list, tuple)):
        return type(a).__name__, tuple(_key(x) for x in a)
    if isinstance(a, dict):
        return "dict", tuple(sorted((k, _key(v)) for k, v in a.items()))
    if isinstance(a, float):
        return "float", a.hex()
    return type(a).__name__, a


def _deterministic(node: Node) -> bool:
    """An ATen operation whose output is a function of its inputs: it writes nothing, draws nothing, and does not
    hand back uninitialised memory (``empty``)."""
    s = _schema(node)
    return s is not None and not s.is_mutable and not s.name.startswith(("aten::empty", "aten::new_empty")) and \
        torch.Tag.nondeterministic_seeded not in node.target.tags


def _pure(node: Node, mutated: set[Node]) -> bool:
    """Whether ``node`` gives the same value wherever it stands, given the same inputs: deterministic (or an item of
    a multi-output operation), written to by nothing, and reads nothing an in-place operation writes to."""
    if node.op != "call_function" or not (node.target is operator.getitem or _deterministic(node)):
        return False
    return _root(node) not in mutated and not any(_root(i) in mutated for i in node.all_input_nodes)


def _common_subexpressions(graph: torch.fx.Graph, mutated: set[Node], pinned: set[Node]) -> None:
    """Each pure operation computed twice on the same inputs, computed once (``autograd.grad`` repeats some: the
    Normal log density's ``(x - μ)² / 2σ²`` forward and in its backward, a seed gradient's ``expand``)."""
    seen: dict[Any, Node] = {}
    for node in list(graph.nodes):
        if node in pinned or not _pure(node, mutated):  # an output stays its own memory
            continue
        try:
            key = (node.target, _key(node.args), _key(node.kwargs))
            first = seen.setdefault(key, node)
        except TypeError:  # an argument that cannot be hashed: left as it is
            continue
        if first is not node:
            node.replace_all_uses_with(first)


def _constant_nodes(graph: torch.fx.Graph, mutated: set[Node], pinned: set[Node]) -> set[Node]:
    """Nodes whose value is the same at every call: constants of the module, and deterministic operations on them
    (or, for ``ones_like`` and kin, on any tensor's shape)."""
    const: set[Node] = set()
    for node in graph.nodes:
        if node.op == "get_attr":
            if node not in mutated:
                const.add(node)
            continue
        if node in pinned or not _deterministic(node) or _root(node) in mutated or \
                not isinstance(node.meta.get("val"), torch.Tensor):
            continue
        if not node.all_input_nodes and any(a.name == "dtype" for a in _schema(node).arguments) and \
                node.kwargs.get("dtype") is None:
            continue  # a factory of the default dtype at each call (ones(3)): folding would fix today's
        inputs = node.all_input_nodes[1:] if node.target in LIKE else node.all_input_nodes
        if all(i in const for i in inputs):
            const.add(node)
    return const


def _attr(gm: GraphModule, target: str) -> Any:
    return functools.reduce(getattr, target.split("."), gm)


def _static(graph: torch.fx.Graph) -> bool:
    """Whether every value of the graph has a static shape: a data-dependent one (``nonzero``'s, say: ``make_fx``
    gives it an unbacked symbol) cannot be compared, so such a graph is left as traced."""
    def static(v: Any) -> bool:
        if isinstance(v, (list, tuple)):
            return all(static(x) for x in v)
        if isinstance(v, (torch.SymInt, torch.SymFloat, torch.SymBool)):
            return False
        if isinstance(v, torch.Tensor):
            return all(type(d) is int for d in (*v.shape, *v.stride(), v.storage_offset()))
        return True

    return all(n.op in ("placeholder", "get_attr", "call_function", "output") and static(n.meta.get("val"))
               for n in graph.nodes)


def simplify(gm: GraphModule) -> GraphModule:
    """A copy of ``gm`` with identities removed, repeated expressions merged and constants folded (see the module's
    docstring), whose outputs are the same values with the same aliasing; ``gm`` itself where its graph holds what
    these rules do not reason about (a module or method call, a data-dependent shape) or where they fail."""
    if not _static(gm.graph):
        return gm
    try:
        gm, constants = _simplify(_copy(gm)[0])
    except Exception as e:  # noqa: BLE001 - an optimisation: where it cannot reason, the graph runs as traced
        _LOG.debug("simplify: left the graph as traced (%s: %s)", type(e).__name__, e)
        return gm
    try:  # the one rule that changes shapes, on a copy: where it cannot reason, the graph runs as simplified so far
        small, nodes = _copy(gm)
        return _run_small(small, {nodes[n]: v for n, v in constants.items() if n in nodes and n.users})
    except Exception as e:  # noqa: BLE001
        _LOG.debug("simplify: no operation runs small (%s: %s)", type(e).__name__, e)
        return gm


def _copy(gm: GraphModule) -> tuple[GraphModule, dict[Node, Node]]:
    """A copy of ``gm`` (its graph copied, its constants shared), and which node of the copy is which of ``gm``."""
    graph = torch.fx.Graph()
    graph._codegen = gm.graph._codegen
    nodes: dict[Node, Node] = {}
    graph.output(graph.graph_copy(gm.graph, nodes))
    return GraphModule(gm, graph), nodes


def _simplify(gm: GraphModule) -> tuple[GraphModule, dict[Node, torch.Tensor]]:
    """``gm`` simplified in place, and its folded constants (their nodes and values)."""
    graph = gm.graph
    mutated = _mutated_roots(graph)
    out = next(n for n in graph.nodes if n.op == "output")
    # nodes an output is (or is a view of): each must stay the memory it was, so none is forwarded or folded
    pinned: set[Node] = set()
    for v in out.all_input_nodes:
        while True:
            pinned.add(v)
            if v.target is operator.getitem and isinstance(v.args[0], Node):
                pinned.add(v.args[0])  # the operation whose outputs it picks (max's values): not merged either
            src = _source(v) if _is_view(v) else None
            if src is None:
                break
            v = src
    for node in list(graph.nodes):
        if node.op != "call_function" or (node in pinned and not _is_view(node)):
            continue
        same = _identity_of(node, mutated)
        if same is not None:
            node.replace_all_uses_with(same)
    _common_subexpressions(graph, mutated, pinned)
    graph.eliminate_dead_code()
    const = _constant_nodes(graph, mutated, pinned)
    values: dict[Node, Any] = {}
    compacts: dict[Node, torch.Tensor] = {}  # the folded constants, which _run_small may hold smaller
    folded = 0
    for node in list(graph.nodes):
        if node not in const:
            continue
        if node.op == "get_attr":
            values[node] = _attr(gm, node.target)
            continue

        args = list(node.args)
        if node.target in LIKE and args[0] not in values:  # shape only: an uninitialised tensor of its layout
            v = args[0].meta["val"]
            args[0] = torch.empty_strided(v.shape, v.stride(), dtype=v.dtype, device=v.device)
        value = values.__getitem__
        values[node] = node.target(*torch.fx.node.map_arg(args, value), **torch.fx.node.map_arg(node.kwargs, value))
        if all(u in const for u in node.users):
            continue
        name = f"_folded{folded}"
        folded += 1
        gm.register_buffer(name, values[node], persistent=False)
        with graph.inserting_before(node):
            new = graph.get_attr(name)
        new.meta.update(node.meta)
        const.add(new)
        values[new] = values[node]
        node.replace_all_uses_with(new)
        compacts[new] = values[node]
    graph.eliminate_dead_code()
    graph.lint()
    gm.recompile()
    return gm, compacts


def _exact(node: Node) -> bool:
    """Whether ``node`` is one of the ``EXACT`` operations (``pow`` with an ``EXACT_POWERS`` exponent; ``add`` and
    ``sub`` without a scale ``alpha``: with one, the vector loop fuses a multiply-add that the scalar loop need not),
    on float32 or float64 tensors alone."""
    if node.op != "call_function" or not all(v is not None and v.dtype in REAL for v in map(
            _val, [node, *node.all_input_nodes])):
        return False
    if node.target is aten.pow.Tensor_Scalar:
        return len(node.args) == 2 and type(node.args[1]) in (int, float) and node.args[1] in EXACT_POWERS
    return node.target in EXACT and node.kwargs.get("alpha", 1) == 1


def _val(node: Any) -> torch.Tensor | None:
    v = node.meta.get("val") if isinstance(node, Node) else None
    return v if isinstance(v, torch.Tensor) else None


def _smaller(value: torch.Tensor) -> torch.Tensor | None:
    """The smallest tensor (``value``'s dimensions, some of its sizes cut to 1) whose broadcast copy is ``value``
    bit for bit, where that is smaller than ``value``; else ``None``."""
    if value.dim() == 0 or value.is_complex() or value.dtype == torch.bool or value.element_size() not in (2, 4, 8):
        return None
    bits = value.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[value.element_size()])
    small = value
    for d in range(value.dim()):
        if value.shape[d] > 1 and (value.stride(d) == 0 or torch.equal(bits, bits.narrow(d, 0, 1).expand_as(bits))):
            small, bits = small.narrow(d, 0, 1), bits.narrow(d, 0, 1)
    return small.contiguous() if small.numel() < value.numel() else None


def _fake_run(node: Node, mode: Any) -> Any:
    """What ``node``'s operation gives on its arguments' ``meta["val"]`` (fake tensors of ``mode``): the shape,
    dtype and strides of its value, computed from theirs alone."""
    args, kwargs = torch.fx.node.map_arg((node.args, node.kwargs), _val)
    with mode:
        return node.target(*args, **kwargs)


def _unexpand(a: Any) -> Any:
    """What an ``expand`` broadcasts (its input), for an argument that is one; the argument otherwise."""
    return a.args[0] if isinstance(a, Node) and a.target is aten.expand.default else a


def _run_small(gm: GraphModule, constants: dict[Node, torch.Tensor]) -> GraphModule:
    """``gm`` with its pointwise operations on broadcast copies run on the smaller tensors (see the module's
    docstring), and its folded constants held as the smaller tensors they are copies of; ``gm`` unchanged where
    there are none. Raises where what reads a rewritten value gets another layout (on fake tensors) than it had
    (``simplify`` then keeps the graph as simplified before this rule)."""
    graph = gm.graph
    small: dict[Node, torch.Tensor | None] = {}  # node -> its smaller constant (folded), or None (an operation)
    rank: dict[Node, int] = {}  # node in small -> the number of dimensions of its smaller value
    out = next(n for n in graph.nodes if n.op == "output")

    def form(a: Node) -> bool:  # an argument the smaller operation can take in its place
        v = _val(a)
        if v is None or v.dim() == 0:
            return v is not None
        # a 0-dim tensor under an expand promotes as a dimensioned one (s.expand(3, 4) * x in s's dtype) and alone
        # as a number (s * x in x's): it stays where it is
        if a.target is aten.expand.default:
            return _val(a.args[0]).dim() > 0
        return a in small and rank[a] > 0

    for node, value in constants.items():
        c = _smaller(value)
        if c is not None:
            small[node], rank[node] = c, c.dim()
    for node in graph.nodes:
        v = _val(node)
        if node.op != "call_function" or v is None or out in node.users:
            continue
        args = node.all_input_nodes
        if _exact(node):
            ok = bool(args) and all(form(a) for a in args) and any(_val(a).dim() for a in args)
        elif node.target in UNARY and len(args) == 1 and args[0] is node.args[0] and \
                args[0].target is aten.expand.default:
            b = _val(args[0].args[0])  # one contiguous row of the copy, of the output's dtype
            ok = b is not None and b.dim() >= 1 and b.stride(-1) == 1 and b.numel() == b.shape[-1] == v.shape[-1] \
                > 1 and b.dtype == v.dtype and v.dtype in REAL
        else:
            ok = False
        if ok:
            small[node] = None
            rank[node] = max(_val(_unexpand(a)).dim() if a not in small else rank[a] for a in args)
    changed = True
    while changed:  # what reads a smaller result reads it through an exact operation; what needs one has it
        changed = False
        for node in list(small):
            if not all(u in small or (_exact(u) and u is not out) for u in node.users) or \
                    (small[node] is None and node.target not in UNARY and
                     not all(form(a) for a in node.all_input_nodes)):
                del small[node]
                changed = True
    if not small:
        return gm
    from torch._subclasses.fake_tensor import FakeTensor

    modes = {v.fake_mode for v in map(_val, graph.nodes) if isinstance(v, FakeTensor)}
    if len(modes) != 1:  # values of no fake mode, or of several (make_fx's real tracing): left as it is
        return gm
    mode = modes.pop()
    readers: set[Node] = set()
    for i, node in enumerate([n for n in graph.nodes if n in small]):
        v = _val(node)
        held = small[node]
        with graph.inserting_before(node):
            if held is not None:  # a constant: the smaller tensor held, its copy a view of it
                name = f"_small{i}"
                gm.register_buffer(name, held, persistent=False)
                inner = graph.get_attr(name)
                inner.meta["val"] = mode.from_tensor(held)
            else:
                inner = graph.call_function(node.target, torch.fx.node.map_arg(node.args, _unexpand), node.kwargs)
                inner.meta["val"] = _fake_run(inner, mode)
                if inner.meta["val"].dtype != v.dtype:  # what form() rules out: checked, not assumed
                    raise RuntimeError(f"running {node.name} small would change its dtype")
            wide = graph.call_function(aten.expand.default, (inner, list(v.shape)))
            wide.meta["val"] = inner.meta["val"].expand(v.shape)
        node.replace_all_uses_with(wide)
        graph.erase_node(node)
        readers.update(wide.users)
    graph.eliminate_dead_code()
    read = {n.target for n in graph.nodes if n.op == "get_attr"}
    for node, held in small.items():
        if held is not None and node.target not in read:  # a folded constant now held small: the whole one goes
            delattr(gm, node.target)
    # what reads a broadcast view where it read a whole tensor: its output's layout (on fake tensors, from the
    # shapes and strides alone) must be what it was, or the strides of everything after it could differ
    for node in readers:
        if node._erased or node in small:
            continue
        lay = _layout(node)
        node.meta["val"] = _fake_run(node, mode)
        if _layout(node) != lay:
            raise RuntimeError(f"running operations small changed the layout of {node.name}")
    graph.lint()
    gm.recompile()
    return gm


def replay(gm: GraphModule) -> Callable[..., Any]:
    """A Python function of ``gm``'s placeholders that computes what ``gm`` does, calling each operator's
    dispatcher entry directly; its locals are released after their last use, as in ``gm``'s own code."""
    graph = gm.graph
    if any(n.op not in ("placeholder", "get_attr", "call_function", "output") for n in graph.nodes):
        return gm
    scope: dict[str, Any] = {}
    names: dict[Node, str] = {}

    def bind(value: Any) -> str:
        key = f"_g{len(scope)}"
        scope[key] = value
        return key

    def fmt(a: Any) -> str:
        if isinstance(a, Node):
            return names[a]
        if isinstance(a, (list, tuple)):
            inner = ", ".join(fmt(x) for x in a)
            return f"[{inner}]" if isinstance(a, list) else f"({inner}{',' if len(a) == 1 else ''})"
        if a is None or isinstance(a, (bool, int, str)) or (isinstance(a, float) and math.isfinite(a)):
            return repr(a)
        return bind(a)  # dtypes, devices, layouts, infinite floats: bound by name

    nodes = list(graph.nodes)
    last_use: dict[Node, int] = {}
    for i, node in enumerate(nodes):
        for a in node.all_input_nodes:
            last_use[a] = i
    params, body = [], []
    for i, node in enumerate(nodes):
        if node.op == "placeholder":
            names[node] = f"a{len(params)}"
            params.append(names[node])
            continue
        if node.op == "get_attr":
            names[node] = bind(_attr(gm, node.target))
            continue
        if node.op == "output":
            body.append(f"return {fmt(node.args[0])}")
            break
        fn = node.target._op if isinstance(node.target, torch._ops.OpOverload) else node.target
        operands = [*(fmt(a) for a in node.args), *(f"{k}={fmt(v)}" for k, v in node.kwargs.items())]
        call = f"{bind(fn)}({', '.join(operands)})"
        if node.users:
            names[node] = f"v{i}"
            body.append(f"{names[node]} = {call}")
        else:
            body.append(call)
        done = [names[a] for a in dict.fromkeys(node.all_input_nodes) if last_use.get(a) == i
                and not names[a].startswith("_g")]
        if done:
            body.append(f"del {', '.join(done)}")
    src = f"def replay({', '.join(params)}):\n" + "".join(f"    {line}\n" for line in body)
    exec(compile(src, "<pyro_lvm.graphs.replay>", "exec"), scope)  # noqa: S102 - code written here, from the graph
    fn = scope["replay"]
    fn.source = src
    return fn


__all__ = ["replay", "simplify"]
