"""Regions built from segments, and the graph written once with them.

A segment becomes a region module (``invfx.regions``) named ``inv_<module path>`` (``inv_blocks_3``): its
forward is the segment's nodes as a GraphModule, its rebuild is generated code that undoes them (registry
inverses and recomputed sub-networks), both printable (``opt.inv_blocks_3.code``, ``.rebuild_code``). Building
one leaves the traced graph as it is, so the analysis measures regions beside the graph it found them in; the
model's graph is written once, at the end (:func:`write_graph`), calling each region and reading its outputs.
Random sub-networks, and those whose backward branches on their input (relu, clamp, max pooling: see
:mod:`invfx.runtime.branches`), are preceded by ``rng_mark`` in both bodies, so the rebuild draws the forward's
dropout masks and takes the forward's branches whatever order it runs them in.
"""

from __future__ import annotations

import copy
import operator
from collections.abc import Sequence

import torch
import torch.fx as fx
from torch import nn

from ..graphs import fetch_attr

# The region modules live in invfx.regions; they stay importable from here, where modules saved with torch.save
# before they moved (invfx 0.1.0) name them.
from ..regions.body import Inverse, RngMark, ShapeMeta
from ..regions.modules import BodyRegion, CheckpointRegion, InvertibleRegion, regions_run_plain, watch_registrations
from ..registry import Risk
from ..runtime.branches import BRANCH_FUNCTIONS, BRANCH_METHODS
from .segments import Segment, module_path

__all__ = ["BodyRegion", "CheckpointRegion", "InvertibleRegion", "Inverse", "RngMark", "ShapeMeta",
           "build_invertible_region", "build_checkpoint_region", "write_graph", "region_name", "unique_name",
           "bind_attributes", "regions_run_plain"]

_RANDOM_FUNCTIONS = {torch.nn.functional.dropout, torch.nn.functional.dropout1d, torch.nn.functional.dropout2d,
                     torch.nn.functional.dropout3d, torch.nn.functional.alpha_dropout,
                     torch.nn.functional.feature_alpha_dropout, torch.dropout, torch.bernoulli, torch.rand,
                     torch.randn, torch.rand_like, torch.randn_like, torch.randint, torch.randperm,
                     torch.multinomial, torch.normal}
_RANDOM_METHODS = {"bernoulli", "bernoulli_", "uniform_", "normal_", "random_", "exponential_", "geometric_"}



def _is_random(root: nn.Module, node: fx.Node) -> bool:
    if node.op == "call_module":
        module = root.get_submodule(node.target)
        return any(isinstance(m, (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
                                  nn.FeatureAlphaDropout, nn.MultiheadAttention, nn.TransformerEncoderLayer,
                                  nn.TransformerDecoderLayer))
                   or not _is_torch_module(m) for m in module.modules())
    if node.op == "call_function":
        # (an exported graph's ATen ops say so themselves: aten.dropout, aten.bernoulli, ...)
        return node.target in _RANDOM_FUNCTIONS or \
            torch.Tag.nondeterministic_seeded in getattr(node.target, "tags", ())
    if node.op == "call_method":
        return node.target in _RANDOM_METHODS
    return False


#: Modules whose backward branches on their input (their functions are in BRANCH_FUNCTIONS).
_BRANCH_MODULES = (nn.ReLU, nn.LeakyReLU, nn.Hardtanh, nn.MaxPool2d)


def _may_branch(root: nn.Module, node: fx.Node) -> bool:
    """Whether the node may run an op whose branches a region records (an op of BRANCH_FUNCTIONS, or code
    invfx cannot see into: a user's module or function)."""
    if node.op == "call_module":
        return any(isinstance(m, _BRANCH_MODULES) or not _is_torch_module(m)
                   for m in root.get_submodule(node.target).modules())
    if node.op == "call_function":
        module = getattr(node.target, "__module__", None) or ""
        return node.target in BRANCH_FUNCTIONS or not (
            module.startswith("torch") or module in ("_operator", "operator", "builtins", "math"))
    if node.op == "call_method":
        return node.target in BRANCH_METHODS
    return False


def _is_torch_module(module: nn.Module) -> bool:
    """A torch.nn layer (known not to draw random numbers unless listed above); user code may."""
    return type(module).__module__.startswith("torch.nn")


def bind_attributes(root: nn.Module) -> None:
    """Record, for each region of ``root``, which of ``root``'s modules hold the attributes its bodies read, so
    that a region follows a parameter or buffer replaced there (see :meth:`BodyRegion._rebind`). Call it once
    ``root`` has its final module tree."""
    for region in root.children():
        if isinstance(region, BodyRegion):
            owners = _attribute_owners(root, region)
            object.__setattr__(region, "_owners", owners)
            watch_registrations(owner for owner, _ in owners.values())


def _attribute_owners(root: nn.Module, region: "BodyRegion") -> dict[tuple[str, str], tuple[nn.Module, str]]:
    """For each attribute a region's bodies read (get_attr), by (body, target): the model's module holding it,
    and its name there."""
    owners = {}
    for key in region._BODIES:
        for node in region.__dict__[key].graph.nodes:
            if node.op != "get_attr" or (key, node.target) in owners:
                continue
            path, _, field = node.target.rpartition(".")
            if not path:
                # (the root's own attributes, fx's tensor constants, are not replaced; and a region referring to
                # the root GraphModule would carry it into every copy of the region, which fx cannot unpickle)
                continue
            try:
                owner = root.get_submodule(path)
            except AttributeError:
                continue
            if hasattr(owner, field) and not isinstance(owner, fx.GraphModule):
                owners[key, node.target] = (owner, field)
    return owners


def _watched(root: fx.GraphModule, segment: Segment) -> tuple[nn.Module, ...]:
    """The modules called on a value that ``segment`` frees, or on anything sharing its memory (a view of it,
    the same tensor handed on), as they read or make it: their forward hooks would see it."""
    freed = frozenset().union(*(n.meta.get("storages") or frozenset() for n in segment.freeable))
    found: dict[int, nn.Module] = {}
    for node in root.graph.nodes:
        if node.op != "call_module" or not any(freed & (n.meta.get("storages") or frozenset())
                                               for n in [node, *node.all_input_nodes]):
            continue
        module = root.get_submodule(node.target)
        if not isinstance(module, BodyRegion):
            found[id(module)] = module
    return tuple(found.values())


def region_name(root: nn.Module, nodes: Sequence[fx.Node], index: int, taken: set[str], prefix: str = "inv_") -> str:
    """``prefix`` and the innermost module all ``nodes`` were traced in (``inv_blocks_3``), unique. Ops outside
    every module (a flow's ``logdet = j + logdet`` after its block) do not count where the others share one."""
    paths = [module_path(n) for n in nodes]
    if any(paths):
        paths = [path for path in paths if path]
    common = paths[0]
    for path in paths[1:]:
        n = 0
        while n < min(len(common), len(path)) and common[n] == path[n]:
            n += 1
        common = common[:n]
    return unique_name(root, prefix + (common[-1].replace(".", "_") if common else f"segment_{index}"), taken)


def unique_name(root: nn.Module, base: str, taken: set[str]) -> str:
    """``base``, or ``base_2``, ``base_3``, ...: the first that is neither an attribute of ``root`` nor in
    ``taken``; added to ``taken``."""
    name, k = base, 1
    while hasattr(root, name) or name in taken:
        k += 1
        name = f"{base}_{k}"
    taken.add(name)
    return name


def _attributes(root: nn.Module, graph: fx.Graph, helpers: dict[str, nn.Module]) -> dict:
    """What a body's call_module and get_attr nodes name: the model's own modules and tensors, and helpers."""
    found = {}
    for node in graph.nodes:
        if node.op in ("call_module", "get_attr"):
            found[node.target] = helpers[node.target] if node.target in helpers else fetch_attr(root, node.target)
    return found


def _tag(copy: fx.Node, original: fx.Node) -> fx.Node:
    """Record which value of the original graph ``copy`` computes (the fused replay matches the two bodies'
    nodes by it), and its shape."""
    copy.meta["invfx_value"] = original.name
    if "tensor_meta" in original.meta:
        copy.meta.setdefault("tensor_meta", original.meta["tensor_meta"])
    return copy


def _get_attr(graph: fx.Graph, env: dict, node: fx.Node) -> fx.Node:
    if node not in env:
        env[node] = graph.get_attr(node.target)
    return env[node]


def _map(graph: fx.Graph, env: dict, value):
    if isinstance(value, fx.Node):
        if value.op == "get_attr":
            return _get_attr(graph, env, value)
        return env[value]
    if isinstance(value, (list, tuple)):
        return type(value)(_map(graph, env, v) for v in value)
    if isinstance(value, dict):
        return {k: _map(graph, env, v) for k, v in value.items()}
    return value


def _source(segment: Segment) -> str:
    """The module a segment is exactly (``blocks.3``), or ""."""
    paths = [module_path(n) for n in segment.nodes]
    return paths[0][-1] if paths[0] and all(p[:len(paths[0])] == paths[0] for p in paths) else ""


def _mark(graph: fx.Graph, node: fx.Node, helpers: dict[str, nn.Module]) -> None:
    target = f"mark_{node.name}"
    helpers.setdefault(target, RngMark(node.name))
    graph.call_module(target, ())


def _end_mark(graph: fx.Graph, node: fx.Node, helpers: dict[str, nn.Module]) -> None:
    target = f"end_{node.name}"
    helpers.setdefault(target, RngMark(None))
    graph.call_module(target, ())


def _forward_graph(segment: Segment, marked: set[fx.Node], helpers: dict[str, nn.Module]) -> fx.Graph:
    """The segment's nodes as a graph of their own: its inputs become placeholders, its outputs the output.
    ``marked`` nodes are preceded by their mark and followed by its end (``end_<node>``): what runs between is
    the sub-network's (its RNG state, its recorded branches), and the branch records' torch-function mode is on
    only there."""
    forward_graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for node in segment.inputs:
        env[node] = _tag(forward_graph.placeholder(node.name), node)
    for node in segment.nodes:
        if node in marked:
            _mark(forward_graph, node, helpers)
        for arg in node.all_input_nodes:
            if arg.op == "get_attr":
                _get_attr(forward_graph, env, arg)
        env[node] = _tag(forward_graph.node_copy(node, lambda n: env[n]), node)
        if node in marked:
            _end_mark(forward_graph, node, helpers)
    forward_graph.output(tuple(env[o] for o in segment.outputs))
    return forward_graph


def build_checkpoint_region(root: fx.GraphModule, segment: Segment, name: str) -> CheckpointRegion:
    """The checkpoint region that runs ``segment`` of ``root`` (whose graph is left as it is)."""
    helpers: dict[str, nn.Module] = {}  # (none: a checkpoint replays the whole RNG state, no marks needed)
    forward_graph = _forward_graph(segment, set(), helpers)
    modules = sorted({n.target for n in segment.nodes if n.op == "call_module"})
    region = CheckpointRegion(
        name, fx.GraphModule(_attributes(root, forward_graph, helpers), forward_graph, f"{name}_forward"),
        len(segment.inputs), [root.get_submodule(m) for m in modules], _source(segment))
    return region


def build_invertible_region(root: fx.GraphModule, segment: Segment, name: str) -> InvertibleRegion:
    """The invertible region that runs ``segment`` of ``root`` (whose graph is left as it is): its forward body
    is the segment's nodes, its rebuild body the solver's steps."""
    source = _source(segment)
    inputs, outputs = segment.inputs, segment.outputs
    # (marked: a sub-network that draws random numbers, or a recomputed one that branches on its input, recorded
    # by the mark's name; an inverted op needs no record: its inverse rebuilds its input on the same side of
    # every threshold, as leaky_relu's does, and the end mark before it keeps it out of any sub-network's)
    recomputed = {step.node for step in segment.rebuild.steps if step.kind == "recompute"}
    marked = {n for n in segment.nodes if _is_random(root, n) or (n in recomputed and _may_branch(root, n))}
    helpers: dict[str, nn.Module] = {}

    def mark(graph: fx.Graph, node: fx.Node) -> None:
        _mark(graph, node, helpers)

    forward_graph = _forward_graph(segment, marked, helpers)

    # rebuild body: the solver's steps, from the outputs and the kept inputs
    rebuild_graph = fx.Graph()
    renv: dict[fx.Node, fx.Node] = {}
    for node in outputs:
        renv[node] = _tag(rebuild_graph.placeholder(node.name), node)
    for node in segment.kept:
        renv[node] = _tag(rebuild_graph.placeholder(node.name), node)
    for step in segment.rebuild.steps:
        if step.kind == "recompute":
            if step.node in marked:
                mark(rebuild_graph, step.node)
            for arg in step.node.all_input_nodes:
                if arg.op == "get_attr":
                    _get_attr(rebuild_graph, renv, arg)
            renv[step.node] = _tag(rebuild_graph.node_copy(
                step.node, lambda n, substitute=step.substitute: renv[substitute.get(n, n)]), step.node)
            renv[step.node].meta["invfx_recompute"] = True
            if step.node in marked:
                _end_mark(rebuild_graph, step.node, helpers)
        elif step.kind == "assemble":
            renv[step.node] = _tag(rebuild_graph.create_node(
                "call_function", tuple, ([renv[r] for r in step.reads],), name=step.node.name), step.node)
        else:
            rule, call = step.rule, step.call
            args, kwargs = rule.bind(call)
            head = (rebuild_graph.get_attr(step.node.target),) if rule.module else ()
            solved = call.bound[rule.solves]
            # named after the value it rebuilds, so the rebuild reads against the forward's code
            helper = rule.inverse.__name__
            if helpers.setdefault(helper, Inverse(rule.inverse)).function is not rule.inverse:
                helper = f"{helper}_{len(helpers)}"
                helpers[helper] = Inverse(rule.inverse)
            result = rebuild_graph.create_node(
                "call_module", helper, (*head, renv[step.node], *_map(rebuild_graph, renv, args)),
                _map(rebuild_graph, renv, kwargs), name=solved.name if isinstance(solved, fx.Node) else None)
            if rule.risk is Risk.MAY_BLOW_UP or not rule.inverse.__module__.startswith("invfx.inverses."):
                # The fused replay checks op(rebuilt, known) == out for user rules (they may be wrong) and
                # inverses that may blow up (a solve with a singular matrix). A built-in exact or
                # well-conditioned inverse passes that check by construction (fl(fl(y - f) + f) is y to an
                # ulp, whatever the cancellation in y - f), so checking it would cost passes over whole tensors
                # for nothing; drift along a chain is measured when planning (validate.py).
                result.meta["invfx_inverts"] = step.node.name
            if isinstance(solved, fx.Node):
                renv[solved] = _tag(result, solved)
            else:  # a list of tensors (cat's inputs): the inverse returns them in order
                for k, item in enumerate(solved):
                    if isinstance(item, fx.Node):
                        renv[item] = _tag(rebuild_graph.create_node(
                            "call_function", operator.getitem, (result, k), name=item.name), item)
    rebuilt = [i for i, node in enumerate(inputs) if node not in segment.kept]
    rebuild_graph.output(tuple(renv[inputs[i]] for i in rebuilt))

    kept = [i for i, node in enumerate(inputs) if node in segment.kept]
    free = [i for i, node in enumerate(inputs) if node in segment.freeable]
    modules = sorted({n.target for n in segment.nodes if n.op == "call_module"})
    region = InvertibleRegion(
        name, fx.GraphModule(_attributes(root, forward_graph, helpers), forward_graph, f"{name}_forward"),
        fx.GraphModule(_attributes(root, rebuild_graph, helpers), rebuild_graph, f"{name}_rebuild"), len(inputs),
        rebuilt, kept, free,
        [root.get_submodule(m) for m in modules], source)
    object.__setattr__(region, "_watched", _watched(root, segment))
    return region


def write_graph(graph: fx.Graph, calls: Sequence[tuple[str, Segment]]) -> fx.Graph:
    """A new graph computing what ``graph`` computes, in which each ``(name, segment)`` of ``calls`` is one call
    of the submodule ``name`` (its inputs in, its outputs read as ``call[k]``) in place of the segment's nodes.
    ``graph`` itself is left as it is: the analysis' graph, on which the segments were found."""
    written = fx.Graph(tracer_cls=graph._tracer_cls)
    written._codegen = copy.deepcopy(graph._codegen)
    starts = {segment.nodes[0]: (name, segment) for name, segment in calls}
    replaced = {node for _, segment in calls for node in segment.nodes}
    env: dict[fx.Node, fx.Node] = {}
    for node in graph.nodes:
        if node in starts:
            name, segment = starts[node]
            call = written.call_module(name, tuple(env[n] for n in segment.inputs))
            for k, output in enumerate(segment.outputs):
                read = written.call_function(operator.getitem, (call, k))
                read.meta.update(output.meta)
                env[output] = read
        if node in replaced:
            continue
        if node.op == "output":
            out = written.output(fx.map_arg(node.args[0], env.__getitem__), type_expr=node.type)
            out.meta = copy.copy(node.meta)
            break
        env[node] = written.node_copy(node, env.__getitem__)
    for node in reversed(list(written.nodes)):
        if node.op == "get_attr" and not node.users:  # (read only by nodes a region runs now)
            written.erase_node(node)
    written.lint()
    return written
