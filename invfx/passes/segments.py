"""Pass 3b: cut the graph into a chain of segments and find the ones that are invertible.

The graph's compute nodes, in their (topological) order, are cut at boundaries; the values *live* at a boundary
(made before it, read after it) are what flows from one segment to the next. A segment ``[p, q)`` is invertible
when the solver rebuilds every input that dies inside it from what is live at ``q``. Inputs that stay live after
the segment (``x`` in ``x + f(x)``) are kept, not rebuilt. Segments are found greedily, smallest first, and a
segment that rebuilds all its inputs is preferred to one that keeps some (kept inputs cost memory per segment).

Freeing is proven here: an input is freed by the segment it dies in, only if it is not the caller's input, a
parameter or buffer, a view (its base may be alive), a relu output (relu's backward masks on its saved output's
exact zeros, which an inverse rebuilds only up to rounding), or a tuple.
"""

from __future__ import annotations

import operator
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
import torch.fx as fx

from ..modes import Mode
from ..options import OptimizeOptions
from ..registry import rules_for
from .annotate import is_tensor_meta, numel, tuple_metas
from .solve import CallCache, Rebuild, solve
from .trace import MODE_SWITCHES

__all__ = ["Segment", "find_segments", "invertible_segment", "plain_segment", "live_values", "why_not_checkpoint",
           "switches_mode"]

COMPUTE = ("call_function", "call_method", "call_module")
MAX_NODES = OptimizeOptions.max_segment_nodes  # longest segment tried (the default; optimize passes its own)
MAX_ATTEMPTS = OptimizeOptions.max_solve_attempts  # failed solves from one start before giving up on it

# ops whose output may alias their input's storage (the runtime refuses to free views anyway)
_VIEW_METHODS = {"view", "view_as", "reshape", "reshape_as", "transpose", "permute", "t", "chunk", "split",
                 "unbind", "squeeze", "unsqueeze", "flatten", "unflatten", "expand", "expand_as", "narrow",
                 "select", "contiguous", "__getitem__", "detach", "swapaxes", "movedim", "unfold", "as_strided"}
_VIEW_FUNCTIONS = {torch.reshape, torch.transpose, torch.permute, torch.t, torch.chunk, torch.split, torch.unbind,
                   torch.squeeze, torch.unsqueeze, torch.flatten, torch.unflatten, torch.narrow, torch.select,
                   torch.movedim, torch.swapaxes, torch.detach}
# Ops whose backward reads their own output. A value they made, freed and rebuilt (exact only to rounding), feeds
# their gradient: relu masks on its exact zeros; tanh and sigmoid differentiate as 1 - t^2 and s (1 - s), which
# near saturation are far smaller than the rebuild's rounding. Their outputs are never freed.
_SAVES_OUTPUT = {torch.relu, torch.nn.functional.relu, "relu", "relu_", torch.nn.ReLU, torch.nn.functional.relu6,
                 torch.nn.ReLU6, torch.nn.functional.hardtanh, torch.nn.Hardtanh, torch.clamp, "clamp",
                 torch.tanh, "tanh", torch.nn.functional.tanh, torch.nn.Tanh, torch.sigmoid, "sigmoid",
                 torch.nn.functional.sigmoid, torch.nn.Sigmoid, torch.special.expit, torch.exp, "exp",
                 torch.softmax, "softmax", torch.nn.functional.softmax, torch.nn.Softmax, torch.log_softmax,
                 "log_softmax", torch.nn.functional.log_softmax, torch.nn.LogSoftmax, torch.nn.functional.elu,
                 torch.nn.ELU, torch.sqrt, "sqrt", torch.rsqrt, "rsqrt"}
# The names of those ops, so that their in-place forms (``torch.relu_``, ``F.relu_``, ``torch.sigmoid_``), which save
# their output just the same, are caught too.
_SAVES_OUTPUT_NAMES = {p if isinstance(p, str) else p.__name__ for p in _SAVES_OUTPUT if not isinstance(p, type)}
# Ops that may hand back their input itself (dropout with p = 0 or in eval mode, identity): the value they make
# is the value they read, so the producer behind them is what counts.
_MAY_ALIAS = {torch.nn.Dropout, torch.nn.Dropout1d, torch.nn.Dropout2d, torch.nn.Dropout3d, torch.nn.AlphaDropout,
              torch.nn.FeatureAlphaDropout, torch.nn.Identity, torch.nn.functional.dropout,
              torch.nn.functional.alpha_dropout, torch.nn.functional.dropout1d, torch.nn.functional.dropout2d,
              torch.nn.functional.dropout3d, torch.nn.functional.feature_alpha_dropout, "to", "type", "float",
              "double", "half", "bfloat16", "contiguous"}


@dataclass
class Segment:
    nodes: list[fx.Node]
    inputs: list[fx.Node]  # values from before the segment that it reads
    outputs: list[fx.Node]  # values it makes that are read after it
    mode: Mode = Mode.KEEP  # KEEP (plain autograd) or INVERTIBLE
    rebuild: Rebuild | None = None
    kept: list[fx.Node] = field(default_factory=list)  # inputs still live after it (not rebuilt)
    freeable: list[fx.Node] = field(default_factory=list)  # rebuilt inputs it may free
    why: str = ""


def live_values(nodes: list[fx.Node]) -> list[set[fx.Node]]:
    """``live[p]``: values made by ``nodes[:p]`` (or before them) that ``nodes[p:]`` or the output read."""
    index = {n: i for i, n in enumerate(nodes)}
    last_use: dict[fx.Node, int] = {}
    for i, node in enumerate(nodes):
        for arg in node.all_input_nodes:
            last_use[arg] = i
    live: list[set[fx.Node]] = []
    current: set[fx.Node] = set()
    for p in range(len(nodes) + 1):
        if p > 0:
            made = nodes[p - 1]
            if last_use.get(made, -1) >= p:
                current.add(made)
        current = {v for v in current if last_use.get(v, -1) >= p}
        live.append(set(current))
    del index
    return live


def switches_mode(node: fx.Node) -> bool:
    """A ``torch.no_grad`` (or enable_grad, set_grad_enabled, inference_mode, autocast) entered or left
    (trace.py). No region holds one: a region runs its nodes in another grad mode than the model's (no grad in a
    checkpoint's forward, with grad in every replay), and its backward differentiates node by node. Such a node
    is a segment of its own, run as plain code, and the nodes between two switches run in the mode the model
    set (a region replays the autocast state it was called in)."""
    return node.op == "call_function" and node.target in MODE_SWITCHES


def stands_alone(node: fx.Node) -> bool:
    """A node that is a segment of its own, run as plain code: a grad-mode switch, or fx's check that a
    parameter traced as a constant kept its value (trace.py)."""
    return switches_mode(node) or "invfx_guard" in node.meta


def _has_any_rule(module: fx.GraphModule, node: fx.Node) -> bool:
    if node.op == "call_module":
        return bool(rules_for(type(module.get_submodule(node.target))))
    if node.op in ("call_function", "call_method"):
        return bool(rules_for(node.target)) or getattr(node.target, "__name__", "") == "getitem"
    return False


# functions taking an ``inplace`` flag
_IN_PLACE_FLAG_FUNCTIONS = {"relu", "relu6", "hardtanh", "leaky_relu", "elu", "selu", "celu", "rrelu", "threshold",
                            "hardsigmoid", "hardswish", "silu", "mish", "dropout", "alpha_dropout", "dropout1d",
                            "dropout2d", "dropout3d", "feature_alpha_dropout"}
_IN_PLACE_FUNCTIONS = {operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.ipow,
                       operator.iand, operator.ior, operator.ixor, operator.ilshift, operator.irshift}


def _mutates(module: fx.GraphModule, user: fx.Node, value: fx.Node) -> bool:
    """Whether ``user`` may write into ``value`` (an in-place method, operator or module)."""
    if not user.args or user.args[0] is not value:
        return user.kwargs.get("out") is value
    if user.op == "call_method":
        return user.target.endswith("_") and not user.target.endswith("__")
    if user.op == "call_function":
        if user.target in _IN_PLACE_FUNCTIONS or user.kwargs.get("inplace") is True or _in_place_function(user.target):
            return True
        # F.relu(x, True): an in-place flag given positionally (for dropout a True may be ``training``:
        # counted as in-place too, which only costs a region)
        return getattr(user.target, "__name__", "") in _IN_PLACE_FLAG_FUNCTIONS and \
            any(a is True for a in user.args[1:])
    if user.op == "call_module":
        return bool(getattr(module.get_submodule(user.target), "inplace", False))
    return False


def _in_place_function(target) -> bool:
    """``torch.relu_``, ``F.relu_``, ``torch.sigmoid_``: a function named like an in-place method writes into its
    first argument (missed before: a checkpoint region that wrote into its own input failed in autograd, and an
    invertible one freed a relu_ output and rebuilt its mask inexactly). ``operator.and_`` and the like are not."""
    name = getattr(target, "__name__", "")
    return name.endswith("_") and not name.endswith("__") and \
        getattr(target, "__module__", "") not in ("operator", "_operator")


def _aliases(value: fx.Node, follows) -> Iterator[fx.Node]:
    """``value`` and every node reached from it through users for which ``follows(user, node)`` holds (the
    nodes sharing its memory, for the rule given), each once."""
    pending, seen = [value], set()
    while pending:
        node = pending.pop()
        if node in seen:
            continue
        seen.add(node)
        yield node
        pending.extend(user for user in node.users if follows(user, node))


def _written(module: fx.GraphModule, value: fx.Node, by) -> bool:
    """Whether a user of ``value`` or of a view of it for which ``by(user)`` holds writes into it in place."""
    # (a write into a view writes into the value)
    views = _aliases(value, lambda user, node: _is_view(module, user))
    return any(by(user) and _mutates(module, user, node) for node in views for user in node.users)


def _is_view(module: fx.GraphModule, node: fx.Node) -> bool:
    if node.op == "call_method":
        return node.target in _VIEW_METHODS
    if node.op == "call_function":
        if getattr(node.target, "__name__", "") == "getitem":
            return not _advanced_index(node)
        return node.target in _VIEW_FUNCTIONS
    return False


def _advanced_index(node: fx.Node) -> bool:
    """``x[:, perm]``, ``x[mask]``: indexing a tensor with a tensor copies (basic indexing, ``x[:, :n]``, views)."""
    if len(node.args) < 2 or not isinstance(node.args[0], fx.Node) or tuple_metas(node.args[0]) is not None:
        return False
    index = node.args[1]
    items = index if isinstance(index, (tuple, list)) else (index,)
    return any(isinstance(item, fx.Node) and is_tensor_meta(item.meta.get("tensor_meta")) for item in items)


def _why_not_freeable(module: fx.GraphModule, node: fx.Node) -> str | None:
    if node.op == "placeholder":
        return "the caller's input"
    if node.op == "get_attr":
        return "a parameter or buffer"
    if _is_view(module, node):
        return "a view"
    source = node
    while True:
        producer = type(module.get_submodule(source.target)) if source.op == "call_module" else source.target
        if producer in _SAVES_OUTPUT or _saves_output_in_place(producer):
            name = getattr(producer, "__name__", producer)
            return f"the output of {name} (its backward reads it; a rebuilt value would change its gradient)"
        if producer in _MAY_ALIAS and source.args and isinstance(source.args[0], fx.Node):
            source = source.args[0]
            continue
        break
    if tuple_metas(node) is not None:
        return "a tuple"
    if not is_tensor_meta(node.meta.get("tensor_meta")):
        return "not a tensor"
    return None


def _saves_output_in_place(producer) -> bool:
    """``torch.relu_`` and ``"tanh_"``: the in-place form of an op in ``_SAVES_OUTPUT``."""
    name = producer if isinstance(producer, str) else getattr(producer, "__name__", "")
    in_place = name.endswith("_") and not name.endswith("__") and \
        (isinstance(producer, str) or _in_place_function(producer))
    return in_place and name[:-1] in _SAVES_OUTPUT_NAMES


def _aliased_after(module: fx.GraphModule, value: fx.Node, live_after: set[fx.Node]) -> bool:
    """Whether a value read after the segment shares ``value``'s memory: a view of it (``v = h[:, :2]`` read at
    the end while ``h`` dies in the segment), the same tensor handed back (identity, ``.to`` of its own dtype),
    or anything that aliased it on the example run. Freeing ``value`` would free that too, and reading it would
    segfault (it did, before this check). The graph's view ops are followed, and the storages each value used on
    the example run (annotate) catch what the graph does not say (a leaf module returning a view)."""
    mine = value.meta.get("storages") or frozenset()
    if any(mine & (v.meta.get("storages") or frozenset()) for v in live_after if v is not value):
        return True

    def hands_on(user: fx.Node, node: fx.Node) -> bool:  # (an in-place op hands back the tensor it wrote into)
        target = type(module.get_submodule(user.target)) if user.op == "call_module" else user.target
        return bool(user.args) and user.args[0] is node and (
            _is_view(module, user) or target in _MAY_ALIAS or _mutates(module, user, node))

    return any(node is not value and node in live_after for node in _aliases(value, hands_on))


def find_segments(module: fx.GraphModule, modes=(Mode.KEEP, Mode.INVERTIBLE), max_nodes: int = MAX_NODES,
                  max_attempts: int = MAX_ATTEMPTS) -> list[Segment]:
    """The chain of segments covering every compute node, invertible where the solver succeeds."""
    compute, live = graph_boundaries(module)  # live[i]: the values live at the boundary before compute[i]
    invertible_allowed = Mode.INVERTIBLE in modes
    flowing = _differentiable(module.graph)  # (once: every run of plain nodes is cut by it)

    segments: list[Segment] = []
    plain: list[fx.Node] = []

    def flush_plain(end: int):
        if plain:
            start = end - len(plain)
            cuts = _plain_cuts(module, compute, live, start, end, flowing)
            for a, b in zip([start] + cuts, cuts + [end]):
                segments.append(_make(module, compute[a:b], live, compute, a, b, Mode.KEEP))
            plain.clear()

    cache = CallCache(module)
    p = 0
    while p < len(compute):
        if stands_alone(compute[p]):
            flush_plain(p)
            segments.append(_make(module, compute[p:p + 1], live, compute, p, p + 1, Mode.KEEP))
            p += 1
            continue
        found = _find_from(module, compute, live, p, cache, max_nodes, max_attempts) if invertible_allowed else None
        if found is None:
            plain.append(compute[p])
            p += 1
            continue
        q, segment = found
        flush_plain(p)
        segments.append(segment)
        p = q
    flush_plain(len(compute))
    return segments


def graph_boundaries(module: fx.GraphModule) -> tuple[list[fx.Node], list[set[fx.Node]]]:
    """The graph's compute nodes in order, and the values live at the boundary before each (and at the end)."""
    everything = list(module.graph.nodes)
    compute = [n for n in everything if n.op in COMPUTE]
    order = {n: i for i, n in enumerate(everything)}
    live_all = live_values(everything)
    live = [live_all[order[n]] for n in compute] + [live_all[len(everything) - 1]]
    return compute, [{v for v in s if v.op != "get_attr"} for s in live]


def invertible_segment(module: fx.GraphModule, nodes: Sequence[fx.Node], freeable: Sequence[fx.Node] = ()
                       ) -> Segment | str:
    """The invertible segment of exactly ``nodes`` (consecutive compute nodes of ``module``'s graph, solved
    as one: several segments found one by one, put back as plain code, become one), or why there is none.

    ``freeable``: inputs already proven freeable (by the region that read them first: read from an earlier
    region's call, they look like views here)."""
    compute, live = graph_boundaries(module)
    nodes = [n for n in nodes if n.op in COMPUTE]
    span = _span(compute, nodes)
    if isinstance(span, str):
        return span
    p, q = span
    inputs, outputs = _segment_io(nodes, live[p], live[q])
    dying = [v for v in inputs if v not in live[q]]
    kept = [v for v in inputs if v in live[q]]
    proven = set(freeable)
    freeable = [d for d in dying if (d in proven or _why_not_freeable(module, d) is None)
                and not _aliased_after(module, d, live[q])]
    if not dying or not outputs or not freeable:
        return "frees nothing"
    rebuild = solve(module, nodes, dying, list(outputs) + kept, CallCache(module))
    if isinstance(rebuild, str):
        return rebuild
    return _invertible(nodes, inputs, outputs, kept, freeable, rebuild)


def plain_segment(module: fx.GraphModule, nodes: Sequence[fx.Node], boundaries=None) -> Segment | None:
    """The segment of exactly ``nodes`` (consecutive compute nodes of the graph) run as plain code, with what
    it reads and hands on; None if they are not consecutive. ``boundaries``: ``graph_boundaries(module)``, if
    known already."""
    compute, live = boundaries or graph_boundaries(module)
    nodes = [n for n in nodes if n.op in COMPUTE]
    span = _span(compute, nodes)
    if isinstance(span, str):
        return None
    return _make(module, nodes, live, compute, *span, Mode.KEEP)


def _span(compute: list[fx.Node], nodes: list[fx.Node]) -> tuple[int, int] | str:
    """Where ``nodes`` stand among the graph's compute nodes (``compute[p:q] == nodes``), or why they do not
    stand together."""
    index = {n: i for i, n in enumerate(compute)}
    if not nodes or any(n not in index for n in nodes):
        return "not compute nodes of the graph"
    p, q = index[nodes[0]], index[nodes[-1]] + 1
    if compute[p:q] != nodes:
        return "not consecutive in the graph"
    return p, q


def _plain_cuts(module: fx.GraphModule, compute: list[fx.Node], live: list[set[fx.Node]], start: int, end: int,
                flowing: set[fx.Node]) -> list[int]:
    """Where a run of plain nodes may be cut into segments that the planner can checkpoint one by one: where
    a single tensor that carries gradient flows on, and nothing writes into it later (the output of a residual
    block, not its inside where the skip is live too), at a module's end or start (or after a layer the model's
    own forward calls) if there is any such place in the run, else anywhere. Values no
    gradient flows through (a transformer's attention mask, made once from the input ids and read by every
    block) may be live there too: each region takes them as one more input, which it neither frees nor
    recomputes. ``flowing``: the values gradient flows through (:func:`_differentiable`)."""
    single = []
    for p in range(start + 1, end):
        carried = [v for v in live[p] if v in flowing]
        # (not where the value is written in place after the cut, as ``bn1``'s output by ``relu(inplace=True)``:
        # no region could hand it on)
        if len(carried) == 1 and _cuttable(carried[0]) and not _written(module, carried[0], lambda user: True) and \
                all(tuple_metas(v) is None for v in live[p] if v not in flowing):
            single.append(p)
    ends = [p for p in single if _module_boundary(compute[p - 1], compute[p])]
    return ends or single


def _module_boundary(before: fx.Node, after: fx.Node) -> bool:
    """Whether a module ends or starts between the two nodes, or ``before`` is a layer the model's own forward
    calls (a ResNet's stem, ``conv1``, ``bn1``, ``relu``, ``maxpool``: the largest activations of the model,
    which must be cut to be recomputed one by one)."""
    top_level_layer = before.op == "call_module" and not _parent_path(before)
    return _ends_module(before, after) or _starts_module(before, after) or top_level_layer


def _differentiable(graph: fx.Graph) -> set[fx.Node]:
    """The values gradient may flow through: floating (or complex) tensors computed from a parameter or a
    floating input. An integer tensor, and a float made only from integers and constants (a mask of 0 and
    -inf built from ``attention_mask``), carry none."""
    flowing: set[fx.Node] = set()
    for node in graph.nodes:
        meta = node.meta.get("tensor_meta")
        floating = is_tensor_meta(meta) and (meta.dtype.is_floating_point or meta.dtype.is_complex)
        if node.op == "output" or not floating:
            continue
        if node.op in ("placeholder", "get_attr") or any(a in flowing for a in node.all_input_nodes) or \
                node.op == "call_module":
            flowing.add(node)
    return flowing


def _cuttable(value: fx.Node) -> bool:
    return value.op != "placeholder" and tuple_metas(value) is None and is_tensor_meta(value.meta.get("tensor_meta"))


def _parent_path(node: fx.Node) -> tuple[str, ...]:
    path = module_path(node)
    return path[:-1] if node.op == "call_module" and path and path[-1] == node.target else path


def _ends_module(before: fx.Node, after: fx.Node) -> bool:
    """Whether the module ``before`` was called in ends between the two nodes."""
    left = _parent_path(before)
    return len(_common_prefix(left, _parent_path(after))) < len(left)


def _starts_module(before: fx.Node, after: fx.Node) -> bool:
    """Whether a module ``after`` is called in starts between the two nodes (a ResNet's ``layer1`` after its
    stem's ``maxpool``, which the model's own forward calls: no module of the stem ends there)."""
    right = _parent_path(after)
    return len(_common_prefix(_parent_path(before), right)) < len(right)


def _common_prefix(left: tuple[str, ...], right: tuple[str, ...]) -> tuple[str, ...]:
    n = 0
    while n < min(len(left), len(right)) and left[n] == right[n]:
        n += 1
    return left[:n]


def why_not_checkpoint(module: fx.GraphModule, segment: Segment) -> str | None:
    """Why ``segment`` cannot run as a checkpoint region (None if it can): a region keeps its inputs and hands on
    tensors, so nothing may write into them in place, and no tuple may cross its ends."""
    inside = set(segment.nodes)
    if any(switches_mode(n) for n in segment.nodes):
        return "it switches grad mode or autocast (torch.no_grad, enable_grad, set_grad_enabled, inference_mode " \
               "or autocast)"
    if any("invfx_guard" in n.meta for n in segment.nodes):
        return "it checks an argument traced as a constant"
    if not segment.outputs:
        return "it hands nothing on"
    if any(tuple_metas(v) is not None for v in list(segment.outputs) + list(segment.inputs)):
        return "a tuple crosses its boundary"
    if any(_written(module, v, lambda user: user not in inside) for v in list(segment.outputs) + segment.inputs):
        return "a value crossing its boundary is written in place after it"
    if any(_written(module, v, lambda user: user in inside) for v in segment.inputs):
        return "it writes into its own input in place"
    return None


def _segment_io(nodes_range: list[fx.Node], live_p: set[fx.Node], live_q: set[fx.Node]):
    inside = set(nodes_range)
    inputs = [v for v in _ordered(live_p) if any(u in inside for u in v.users)]
    outputs = [v for v in nodes_range if v in live_q]
    return inputs, outputs


def _ordered(values: set[fx.Node]) -> list[fx.Node]:
    return sorted(values, key=lambda n: n._sort_key if hasattr(n, "_sort_key") else 0) if values and \
        hasattr(next(iter(values)), "_sort_key") else sorted(values, key=lambda n: n.name)


def _find_from(module, compute, live, p, cache, max_nodes: int = MAX_NODES, max_attempts: int = MAX_ATTEMPTS):
    """The first segment starting at ``p`` that is invertible, frees an input, keeps none and hands the next
    segment outputs it can free (not views); failing that, the first invertible one that frees something.

    Such a segment goes on through the glue after it (ops outside any module, where it started) to a later cut
    that is clean too and where fewer values are live: a flow's running log-det, ``logdet = j + logdet`` after
    each block, belongs to the block. Cut before it, the block would hand on both its output and ``j``, the add
    between two blocks would read the running sum beside them, and no two blocks would be consecutive links of
    one chain (the planner would see every block keep its output: the next segment, the add, does not free it)."""
    fallback = None
    found = None  # (q, segment): the first clean segment ending where a module does, or a later one past glue
    attempts = 0
    first = compute[p]
    if first.op == "call_function" and getattr(first.target, "__name__", "") == "getitem" and \
            first.args and isinstance(first.args[0], fx.Node) and tuple_metas(first.args[0]) is not None:
        return None  # never start inside a tuple
    scope = _scope(compute, p)
    for q in range(p + 1, min(len(compute), p + max_nodes) + 1):
        if stands_alone(compute[q - 1]) or found is not None and not _glue(compute[q - 1], scope):
            break
        nodes = compute[p:q]
        if module_path(nodes[-1])[:len(scope)] != scope:
            break  # a segment that starts inside a module ends in it (not half of one block, half of the next)
        inputs, outputs = _segment_io(nodes, live[p], live[q])
        dying = [v for v in inputs if v not in live[q]]
        kept = [v for v in inputs if v in live[q]]
        if not dying or not outputs:
            continue
        if any(tuple_metas(o) is not None for o in outputs):
            continue  # a tuple crossing the cut (chunk's result): regions hand on tensors, not tuples
        inside = set(nodes)
        if any(_written(module, v, lambda user, inside=inside: user not in inside) for v in list(outputs) + kept):
            continue  # the region saves it for backward: an in-place op after it would invalidate that
        if any(_written(module, v, lambda user, inside=inside: user in inside) for v in inputs):
            continue  # the region would write into its own input (a region must not mutate its inputs)
        freeable = [d for d in dying if _why_not_freeable(module, d) is None and
                    not _aliased_after(module, d, live[q])]
        if not freeable:
            continue  # frees nothing: no memory to gain
        numbers_in, numbers_out = sum(numel(d) for d in dying), sum(numel(o) for o in outputs)
        if numbers_out < numbers_in:
            continue  # fewer numbers out than in: no bijection
        if numbers_out > 2 * numbers_in:
            continue  # the cut is wide (intermediate values cross it): not where a chain link ends
        inside = set(nodes)
        if any(not any(_has_any_rule(module, u) for u in d.users if u in inside) for d in dying):
            continue  # some dying input has no consumer an inverse rule knows
        rebuild = solve(module, nodes, dying, list(outputs) + kept, cache)
        attempts += 1
        if isinstance(rebuild, str):
            if attempts >= max_attempts:
                break
            continue
        segment = _invertible(nodes, inputs, outputs, kept, freeable, rebuild)
        clean = not kept and not any(_why_not_freeable(module, o) for o in outputs)
        if clean and (q == len(compute) or not _inside(compute[q], nodes)):
            if found is None or len(live[q]) < len(live[found[0]]):
                found = (q, segment)
            continue
        if found is not None:
            continue
        # a clean cut inside a module (between a coupling and its cat) is second best: the whole module reads
        # better as one region, and costs nothing more if it is invertible too
        rank = 1 if clean else 2
        if fallback is None or rank < fallback[0]:
            fallback = (rank, q, segment)
    if found is not None:
        return found
    return fallback[1:] if fallback else None


def _glue(node: fx.Node, scope: tuple[str, ...]) -> bool:
    """An op between modules, at the level a segment started at (``logdet = j + logdet`` after a block)."""
    return node.op in ("call_function", "call_method") and _parent_path(node) == scope


def _scope(compute: list[fx.Node], p: int) -> tuple[str, ...]:
    """The module a segment starting at ``p`` starts inside of: the one the nodes on both sides of the cut
    were called in (empty at a module's start, or at the top level)."""
    return _common_prefix(_parent_path(compute[p - 1]), _parent_path(compute[p])) if p else ()


def module_path(node: fx.Node) -> tuple[str, ...]:
    """The module path a node was traced in (``("blocks", "blocks.3")``), its own for a module call."""
    stack = node.meta.get("nn_module_stack") or {}
    path = tuple(value[0] for value in stack.values())
    if node.op == "call_module" and (not path or path[-1] != node.target):
        path += (node.target,)
    return path


def _inside(node: fx.Node, nodes: list[fx.Node]) -> bool:
    """Whether ``node`` belongs to the innermost module that all of ``nodes`` share (the segment ends inside
    a module)."""
    common = _parent_path(nodes[0])  # (a module called as one node is not a module the segment is inside)
    for other in nodes[1:]:
        common = _common_prefix(common, _parent_path(other))
    if not common:
        return False
    return module_path(node)[:len(common)] == common


def _invertible(nodes, inputs, outputs, kept, freeable, rebuild) -> Segment:
    why = "rebuilt from its outputs by " + ", ".join(
        sorted({s.rule.name for s in rebuild.steps if s.rule is not None}) or ["recomputation"])
    return Segment(list(nodes), inputs, outputs, Mode.INVERTIBLE, rebuild, kept, freeable, why)


def _make(module, nodes, live, compute, start, end, mode) -> Segment:
    inputs, outputs = _segment_io(list(nodes), live[start], live[end])
    return Segment(list(nodes), inputs, outputs, mode, why="no inverse found")  # (frees nothing: not invertible)
