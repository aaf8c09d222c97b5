"""Pass 3a: can a segment's inputs be rebuilt from its outputs? Solve backwards with the registry.

Starting from what backward will have (the segment's outputs, the inputs it keeps, parameters and constants),
repeat until nothing changes: a node whose output is known and whose registry rule's other arguments are known
gives back one of its arguments (an *invert* step); a node whose arguments are all known is recomputed (a
*recompute* step: how ``y1 = x1 + F(x2)`` is undone for any ``F``: ``F(x2)`` is recomputed, never inverted); a
tuple is known once all its items are. The segment is invertible when every input it does not keep is known.
Steps no goal depends on are pruned. Pure function of the graph: nothing is evaluated.

A size read from a value not known yet (``ch = x2.shape[1]``, then ``a[:, :ch]`` to rebuild ``x2`` itself: FrEIA's
``AllInOneBlock``) is read from a known value of the same shape instead: one joined to it by elementwise ops
(``y2 = x2 * exp(s) + t``: ``y2`` has ``x2``'s shape wherever neither broadcasts, as on the example).
"""

from __future__ import annotations

import operator
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from ..graphs import leaves
from ..registry import NONZERO_PRODUCERS, InverseRule, OpCall, Risk, bind_arguments, rules_for
from .annotate import fetch_attr, is_tensor_meta, producer_of, tuple_metas

__all__ = ["Step", "Rebuild", "solve", "op_call", "CallCache"]

_RISK_ORDER = {Risk.EXACT: 0, Risk.WELL_CONDITIONED: 1, Risk.MAY_BLOW_UP: 2}


@dataclass
class Step:
    kind: str  # "invert", "recompute" or "assemble" (a tuple from its items)
    node: fx.Node  # the node undone (invert), rerun (recompute) or whose tuple is assembled
    produces: list[fx.Node]
    reads: list[fx.Node]
    rule: InverseRule | None = None
    call: OpCall | None = None  # the node's call with fx Nodes as values (for code generation)
    # a recomputed size query reads a known value of the same shape in place of the one not known (see above)
    substitute: dict[fx.Node, fx.Node] = field(default_factory=dict)


@dataclass
class Rebuild:
    steps: list[Step]
    goals: list[fx.Node]
    risk: Risk = Risk.EXACT
    inverse_flops: float = 0.0
    recomputed: list[fx.Node] = field(default_factory=list)


def _target(module: fx.GraphModule, node: fx.Node):
    return type(module.get_submodule(node.target)) if node.op == "call_module" else node.target


def op_call(module: fx.GraphModule, node: fx.Node, rule: InverseRule, values: bool) -> OpCall:
    """The call of ``node`` as a rule sees it. ``values``: parameters and buffers (get_attr) as their tensors
    (for conditions); else every argument as its fx Node (for code generation)."""
    submodule = module.get_submodule(node.target) if node.op == "call_module" else None

    def resolve(arg):
        if isinstance(arg, fx.Node) and values and arg.op == "get_attr":
            return fetch_attr(module, arg.target)
        if isinstance(arg, (list, tuple)):
            return type(arg)(resolve(a) for a in arg)
        return arg

    bound = bind_arguments(rule.params, [resolve(a) for a in node.args],
                           {k: resolve(v) for k, v in node.kwargs.items()}, rule.target)
    metas, producers, nonzero = {}, {}, []
    for name, arg in zip([p.name for p in rule.params], _args_by_name(rule, node)):
        if isinstance(arg, fx.Node):
            meta = arg.meta.get("tensor_meta")
            if is_tensor_meta(meta):
                metas[name] = (tuple(meta.shape), meta.dtype)
            producers[name] = producer_of(module, arg)
            if nonzero_value(module, arg):
                nonzero.append(name)
        elif isinstance(arg, (list, tuple)) and arg and all(isinstance(a, fx.Node) for a in arg):
            item_metas = [a.meta.get("tensor_meta") for a in arg]
            if all(is_tensor_meta(m) for m in item_metas):
                metas[name] = ([tuple(m.shape) for m in item_metas], item_metas[0].dtype)
    out = node.meta.get("tensor_meta")
    out_meta = None
    if is_tensor_meta(out):
        out_meta = (tuple(out.shape), out.dtype)
    elif isinstance(out, (tuple, list)) and out and all(is_tensor_meta(m) for m in out):
        out_meta = ([tuple(m.shape) for m in out], out[0].dtype)
    return OpCall(rule.target, bound, module=submodule, out_meta=out_meta, metas=metas, producers=producers,
                  nonzero=nonzero)


#: ops that hand on their (first) operand's values rearranged or as they are: non-zero in, non-zero out
_MOVES_VALUES = frozenset({operator.getitem, torch.reshape, torch.flatten, torch.squeeze, torch.unsqueeze,
                           torch.permute, torch.transpose, torch.clone, "reshape", "view", "flatten", "squeeze",
                           "unsqueeze", "permute", "transpose", "expand", "expand_as", "clone", "contiguous",
                           "float", "double", "repeat"})
_PRODUCTS = frozenset({operator.mul, torch.mul, "mul"})


def nonzero_value(module: fx.GraphModule, node: fx.Node, depth: int = 8) -> bool:
    """Whether ``node``'s value has no zero (in exact arithmetic; underflow is the risk class's business): the
    output of exp, sigmoid or softplus, a product of non-zero numbers and such values, its negation, or these
    rearranged (FrEIA's global scale ``0.1 * softplus(a)``, ``10 * sigmoid(a - 2)``)."""
    if depth == 0 or node.op not in ("call_function", "call_method", "call_module"):
        return False
    producer = producer_of(module, node)
    if producer in NONZERO_PRODUCERS or isinstance(producer, type) and issubclass(producer, (nn.Sigmoid,
                                                                                            nn.Softplus)):
        return True

    def operand(value) -> bool:
        if isinstance(value, fx.Node):
            return nonzero_value(module, value, depth - 1)
        return isinstance(value, (int, float)) and not isinstance(value, bool) and value != 0 and \
            abs(value) != float("inf") and value == value

    target = node.target
    if node.op == "call_module" or node.kwargs and target not in _MOVES_VALUES:
        return False
    if target in _PRODUCTS and len(node.args) == 2:
        return operand(node.args[0]) and operand(node.args[1])
    if target in (operator.neg, torch.neg, "neg") and len(node.args) == 1:
        return operand(node.args[0])
    if target in _MOVES_VALUES and node.args and isinstance(node.args[0], fx.Node):
        return operand(node.args[0])
    return False


def _args_by_name(rule: InverseRule, node: fx.Node):
    bound = bind_arguments(rule.params, node.args, node.kwargs, rule.target)
    return [bound[p.name] for p in rule.params]


def _nodes_in(value) -> list[fx.Node]:
    return leaves(value, lambda item: isinstance(item, fx.Node))


def _tuple_length(node: fx.Node) -> int | None:
    metas = tuple_metas(node)
    return len(metas) if metas is not None else None


# --- sizes ----------------------------------------------------------------------------------------------------

#: what a size query reads of a tensor: its shape, rank or number of elements (never its values, nor its dtype)
_SIZE_ATTRIBUTES = frozenset({"shape", "ndim"})
_SIZE_METHODS = frozenset({"size", "dim", "ndimension", "numel", "nelement"})
#: ops whose output has the shape of each operand of the output's own shape (elementwise; broadcast operands aside)
_ELEMENTWISE = frozenset({
    operator.add, operator.sub, operator.mul, operator.truediv, operator.neg, operator.pos, torch.add, torch.sub,
    torch.mul, torch.div, torch.neg, torch.exp, torch.log, torch.expm1, torch.log1p, torch.tanh, torch.sigmoid,
    torch.atan, torch.sqrt, torch.rsqrt, torch.abs, torch.relu, torch.clamp, torch.clone, torch.where,
    torch.special.expit, F.relu, F.leaky_relu, F.elu, F.gelu, F.silu, F.softplus, F.tanh, F.sigmoid, F.dropout,
    "add", "sub", "mul", "div", "neg", "exp", "log", "expm1", "log1p", "tanh", "sigmoid", "atan", "sqrt", "rsqrt",
    "abs", "relu", "clamp", "clone", "contiguous", "float", "double", "half", "to", "type_as"})
_ELEMENTWISE_MODULES = (nn.ReLU, nn.LeakyReLU, nn.ELU, nn.GELU, nn.SiLU, nn.Softplus, nn.Tanh, nn.Sigmoid,
                        nn.Identity, nn.Dropout)


def size_query(node: fx.Node) -> fx.Node | None:
    """The tensor whose size ``node`` reads (``x.shape``, ``x.size(1)``, ``x.dim()``, ``x.numel()``), else None."""
    if not node.args or not isinstance(node.args[0], fx.Node):
        return None
    if node.op == "call_function" and node.target is getattr and node.args[1] in _SIZE_ATTRIBUTES:
        return node.args[0]
    if node.op == "call_method" and node.target in _SIZE_METHODS:
        return node.args[0]
    return None


def _shape_of(node: fx.Node):
    meta = node.meta.get("tensor_meta")
    return tuple(meta.shape) if is_tensor_meta(meta) else None


class CallCache:
    """The rules that apply to each node, with its calls, computed once per graph (solve runs many times)."""

    def __init__(self, module: fx.GraphModule):
        self.module = module
        self._entries: dict[fx.Node, list[tuple[InverseRule, OpCall, OpCall]]] = {}
        self._shapes: dict[fx.Node, fx.Node] | None = None  # union-find over values of one shape

    def _elementwise(self, node: fx.Node) -> bool:
        if node.op == "call_module":
            return isinstance(self.module.get_submodule(node.target), _ELEMENTWISE_MODULES)
        return node.op in ("call_function", "call_method") and node.target in _ELEMENTWISE

    def same_shape(self, node: fx.Node) -> fx.Node:
        """A representative of the values that have ``node``'s shape on any input, not only the example's: those
        joined to it by elementwise ops, each operand of its op's output shape on the example."""
        if self._shapes is None:
            parent: dict[fx.Node, fx.Node] = {}

            def find(n):
                parent.setdefault(n, n)
                while parent[n] is not n:
                    parent[n] = parent[parent[n]]
                    n = parent[n]
                return n

            for n in self.module.graph.nodes:
                shape = _shape_of(n)
                if shape is None or not self._elementwise(n):
                    continue
                for arg in n.all_input_nodes:
                    if arg.op != "get_attr" and _shape_of(arg) == shape:
                        parent[find(arg)] = find(n)
            self._shapes = {n: find(n) for n in parent}
        return self._shapes.get(node, node)

    def rules(self, node: fx.Node) -> list[tuple[InverseRule, OpCall, OpCall]]:
        entry = self._entries.get(node)
        if entry is None:
            entry = []
            for rule in rules_for(_target(self.module, node)):
                if rule.extra_outputs is not None:
                    continue  # needs the forward rewritten to return statistics (not done by the pass yet)
                try:
                    values = op_call(self.module, node, rule, values=True)
                    nodes = op_call(self.module, node, rule, values=False)
                except Exception:  # noqa: BLE001 - the rule's signature does not fit this call
                    continue
                entry.append((rule, values, nodes))
            self._entries[node] = entry
        return entry


def solve(module: fx.GraphModule, segment: Sequence[fx.Node], goals: Iterable[fx.Node],
          known: Iterable[fx.Node], cache: CallCache | None = None) -> Rebuild | str:
    """How to rebuild ``goals`` (inputs of ``segment``) from ``known`` values; or why it cannot be done."""
    cache = cache or CallCache(module)
    goals = list(goals)
    in_segment = set(segment)
    known_set = set(known)
    steps: list[Step] = []
    items: dict[fx.Node, set[int]] = {}

    def is_known(node: fx.Node) -> bool:
        return node in known_set or node.op == "get_attr"

    def learn(step: Step) -> None:
        steps.append(step)
        known_set.update(step.produces)

    progress = True
    while progress and not all(is_known(g) for g in goals):
        progress = False
        for node in reversed(segment):  # invert from the outputs back
            if not is_known(node):
                continue
            if node.op == "call_function" and node.target.__name__ == "getitem" and \
                    isinstance(node.args[0], fx.Node) and node.args[0] in in_segment | set(goals) and \
                    not is_known(node.args[0]) and isinstance(node.args[1], int):
                tup = node.args[0]
                length = _tuple_length(tup)
                seen = items.setdefault(tup, set())
                if node.args[1] not in seen and length:
                    seen.add(node.args[1] % length)
                    if len(seen) == length:
                        parts = sorted((u for u in tup.users if u.op == "call_function"
                                        and getattr(u.target, "__name__", "") == "getitem"
                                        and isinstance(u.args[1], int) and is_known(u)),
                                       key=lambda u: u.args[1] % length)
                        by_index = {u.args[1] % length: u for u in parts}
                        if len(by_index) == length:
                            learn(Step("assemble", tup, [tup], [by_index[i] for i in range(length)]))
                            progress = True
                continue
            if node.op not in ("call_function", "call_method", "call_module"):
                continue
            for rule, call, call_nodes in cache.rules(node):
                unknown = [n for n in _nodes_in(call.bound.get(rule.solves)) if not is_known(n)]
                if not unknown:
                    continue
                if any(not all(is_known(n) for n in _nodes_in(call.bound.get(name))) for name in rule.needs):
                    continue
                if rule.why_not(call) is not None:
                    continue
                reads = [node] + [n for name in rule.needs for n in _nodes_in(call.bound.get(name))]
                learn(Step("invert", node, _nodes_in(call.bound.get(rule.solves)), reads, rule, call_nodes))
                progress = True
                break
        for node in segment:  # recompute what the known values determine
            if is_known(node) or node.op not in ("call_function", "call_method", "call_module"):
                continue
            reads = list(node.all_input_nodes)
            if all(is_known(n) for n in reads):
                learn(Step("recompute", node, [node], reads))
                progress = True
                continue
            sized = size_query(node)
            if sized is not None and not is_known(sized) and all(is_known(n) for n in reads if n is not sized):
                twin = _known_twin(sized, known_set, cache)
                if twin is not None:
                    learn(Step("recompute", node, [node], [twin if n is sized else n for n in reads],
                               substitute={sized: twin}))
                    progress = True
    missing = [g for g in goals if not is_known(g)]
    if missing:
        return "cannot rebuild " + ", ".join(g.name for g in missing) + " from the outputs"
    return _prune(steps, goals)


def _known_twin(node: fx.Node, known: set[fx.Node], cache: CallCache) -> fx.Node | None:
    """A known value of ``node``'s shape (see :meth:`CallCache.same_shape`), the first made; or None."""
    shape = cache.same_shape(node)
    twins = [n for n in known if n is not node and _shape_of(n) is not None and cache.same_shape(n) is shape]
    return min(twins, key=lambda n: n._sort_key) if twins else None


def _prune(steps: list[Step], goals: list[fx.Node]) -> Rebuild:
    needed = set(goals)
    kept: list[Step] = []
    for step in reversed(steps):
        if any(p in needed for p in step.produces):
            kept.append(step)
            needed.update(step.reads)
    kept.reverse()
    risk, flops = Risk.EXACT, 0.0
    for step in kept:
        if step.rule is not None:
            if _RISK_ORDER[step.rule.risk] > _RISK_ORDER[risk]:
                risk = step.rule.risk
            try:
                flops += float(step.rule.cost(step.call))
            except Exception:  # noqa: BLE001 - a cost that cannot be computed counts as unknown (0)
                pass
    return Rebuild(kept, goals, risk, flops, [s.node for s in kept if s.kind == "recompute"])
