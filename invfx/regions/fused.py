"""The fused replay of a rewritten region: each recomputed sub-network runs once in backward, and one
sub-network's graph is alive at a time.

The rebuild body undoes the segment, recomputing sub-networks (``F(x2)``) as it goes; it runs them with grad,
from *stand-in* leaves for their inputs, and everything else without. Between its steps a backward sweep
walks the forward body from its end: a node is recomputed from its known input values and differentiated
alone; a recomputed sub-network is differentiated through the rebuild's own graph, which is then dropped. For a
coupling ``y1 = x1 + F(x2); y2 = x2 + G(y1)`` this is revlib's order: G is rebuilt and backpropagated before F
is rebuilt. The replay hands the runtime the gradients itself (``ctx.gradients``), adding parameter gradients
into ``.grad`` at once where the engine would (``ctx.direct_params``).
"""

from __future__ import annotations

import heapq
import operator

import torch
import torch.fx as fx

from ..errors import RegionError
from ..graphs import fetch_attr, leaves, tuple_metas
from ..runtime import ReplayContext
from ..runtime.branches import close_scope
from ..runtime.graft import stand_in
from ..runtime.region import add_into_grads
from .body import is_rng_mark

__all__ = ["FusedReplay", "tensors_in"]


def _value(node: fx.Node) -> str | None:
    return node.meta.get("invfx_value")


class _Component:
    __slots__ = ("values", "frontier", "external")

    def __init__(self):
        self.values: set[str] = set()
        self.frontier: list[str] = []  # values read outside the sub-network (grafted in the forward body)
        self.external: list[str] = []  # values it reads from outside (stand-ins in the rebuild)


class _Analysis:
    """Which forward values the rebuild recomputes, grouped into connected sub-networks."""

    def __init__(self, forward_body: fx.GraphModule, rebuild_body: fx.GraphModule, rebuilt: tuple[int, ...],
                 kept: tuple[int, ...]):
        self.forward_body, self.rebuild_body = forward_body, rebuild_body
        self.rebuilt, self.kept = rebuilt, kept
        recomputed = {_value(n) for n in rebuild_body.graph.nodes if n.meta.get("invfx_recompute")}
        forward_nodes = {_value(n): n for n in forward_body.graph.nodes if _value(n) is not None}
        self.recomputed = {v for v in recomputed if v in forward_nodes}
        self.forward_nodes = forward_nodes
        self.recomputed -= self._joins(forward_nodes)
        self.components = self._components(forward_nodes)
        self.component_of = {v: c for c in self.components for v in c.values}
        # values only read inside their sub-network's graph (never published to the sweep)
        self.internal = {v for c in self.components for v in c.values if v not in c.frontier}
        # how many sub-networks read each value from outside (through a stand-in leaf shared by all of them)
        self.stand_in_readers: dict[str, int] = {}
        for component in self.components:
            for v in component.external:
                self.stand_in_readers[v] = self.stand_in_readers.get(v, 0) + 1

    def _joins(self, forward_nodes: dict[str, fx.Node]) -> set[str]:
        """Recomputed adds and subs of values of two different sub-networks (a coupling's log-det ``j1 + j2``,
        ``sum(s1)`` of ``F`` and ``sum(s2)`` of ``G``): rebuilt as plain values and differentiated as nodes of
        their own (their backward needs no values), so that the two sub-networks stay apart. Joined into one, the
        sub-network would both feed and read the ops between them (``y1 = exp(s2) * x1 + t2``, read by ``F``),
        and the region would have no fused backward at all."""
        candidates = {v for v in self.recomputed if _plumbing_kind(forward_nodes[v]) in ("add", "sub")}
        if not candidates:
            return set()
        parent = {v: v for v in self.recomputed - candidates}

        def find(v):
            while parent[v] != v:
                parent[v] = parent[parent[v]]
                v = parent[v]
            return v

        for value in parent:
            for arg in forward_nodes[value].all_input_nodes:
                if _value(arg) in parent:
                    parent[find(_value(arg))] = find(value)
        joins = set()
        for value in candidates:
            roots = {find(_value(a)) for a in forward_nodes[value].all_input_nodes if _value(a) in parent}
            if len(roots) > 1:
                joins.add(value)
        return joins

    def _components(self, forward_nodes: dict[str, fx.Node]) -> list[_Component]:
        parent = {v: v for v in self.recomputed}

        def find(v):
            while parent[v] != v:
                parent[v] = parent[parent[v]]
                v = parent[v]
            return v

        for value in self.recomputed:
            for arg in forward_nodes[value].all_input_nodes:
                if _value(arg) in self.recomputed:
                    parent[find(_value(arg))] = find(value)
        groups: dict[str, _Component] = {}
        for value in self.recomputed:
            groups.setdefault(find(value), _Component()).values.add(value)
        order = {n: i for i, n in enumerate(self.forward_body.graph.nodes)}
        for component in groups.values():
            nodes = sorted((forward_nodes[v] for v in component.values), key=order.get)
            external: dict[str, None] = {}
            for node in nodes:
                for arg in node.all_input_nodes:
                    if _value(arg) not in component.values and arg.op != "get_attr":
                        external[_value(arg)] = None
                if any(_value(user) not in component.values for user in node.users):
                    component.frontier.append(_value(node))
            component.external = list(external)
        return list(groups.values())


class _Ref:
    """A runtime value in a node's argument template: a rebuild node's result (``key``), or a forward value
    (``key`` its name). ``stand_in``: in a recomputed sub-network, a value from outside it, read through a
    stand-in leaf."""

    __slots__ = ("key", "stand_in")

    def __init__(self, key, stand_in: bool = False):
        self.key, self.stand_in = key, stand_in


def _holds_ref(value) -> bool:
    if type(value) is _Ref:
        return True
    if isinstance(value, (tuple, list)):
        return any(_holds_ref(v) for v in value)
    if isinstance(value, dict):
        return any(_holds_ref(v) for v in value.values())
    if isinstance(value, slice):
        return any(_holds_ref(v) for v in (value.start, value.stop, value.step))
    return False


class _Arguments:
    """A node's arguments resolved once: constants (attributes, literals) in place, runtime values as
    :class:`_Ref` read through a lookup at each call (``map_arg`` over the node at every step of every backward
    was a large share of the replay's Python)."""

    __slots__ = ("args", "kwargs", "flat")

    def __init__(self, node: fx.Node, resolve):
        self.args = fx.node.map_arg(node.args, resolve)
        self.kwargs = dict(fx.node.map_arg(node.kwargs, resolve))
        # the common case: every runtime value a top-level argument (nested ones: torch.cat's list)
        self.flat = not any(_holds_ref(a) and type(a) is not _Ref for a in (*self.args, *self.kwargs.values()))

    def __call__(self, lookup):
        if self.flat:
            args = tuple(lookup(a) if type(a) is _Ref else a for a in self.args)
            if not self.kwargs:
                return args, {}
            return args, {k: lookup(v) if type(v) is _Ref else v for k, v in self.kwargs.items()}

        def fetch(a):
            return lookup(a) if type(a) is _Ref else a

        return fx.node.map_aggregate(self.args, fetch), dict(fx.node.map_aggregate(self.kwargs, fetch))


def _target(body: fx.GraphModule, node: fx.Node):
    """What running ``node`` calls (a module goes through ``__call__``: its hooks fire, as in the forward)."""
    if node.op == "call_module":
        return body.get_submodule(node.target)
    if node.op == "call_function":
        return node.target
    if node.op == "call_method":
        name = node.target
        return lambda self, *args, **kwargs: getattr(self, name)(*args, **kwargs)
    raise RegionError(f"fused replay: cannot run node {node.name} ({node.op})")


class _RebuildStep:
    """One node of the rebuild body: under no_grad, but a recomputed sub-network's node with grad, from
    stand-in leaves for its inputs from outside the sub-network."""

    __slots__ = ("node", "kind", "index", "constant", "call", "arguments", "value", "publish", "graph_value",
                 "release", "into", "into_position")

    def __init__(self, replay: "FusedReplay", node: fx.Node, release: list[fx.Node]):
        body = replay.rebuild_body
        self.node, self.value, self.release = node, _value(node), tuple(release)
        # (a sub-network's inner values are only read inside its graph: holding them would keep the graph's
        # memory alive after its backward)
        self.publish = self.value is not None and self.value not in replay.internal
        self.into = self.into_position = None
        if node.op == "placeholder":
            self.kind, self.index = "placeholder", replay.rebuild_placeholders.index(node)
            return
        if node.op == "get_attr":
            self.kind, self.constant = "constant", fetch_attr(body, node.target)
            return
        recompute = bool(node.meta.get("invfx_recompute")) and self.value in replay.recomputed
        self.kind = "recompute" if recompute else "plain"
        self.call = _target(body, node)
        component = replay.component_of.get(self.value) if recompute else None

        def resolve(arg: fx.Node):
            if arg.op == "get_attr":
                return fetch_attr(body, arg.target)
            external = component is not None and _value(arg) not in component.values
            return _Ref(arg, stand_in=external)

        self.arguments = _Arguments(node, resolve)
        self.graph_value = recompute and self.value not in replay.internal
        if node in replay.write_into:
            self.into, self.into_position = self.call.function.into, replay.write_into[node]


class _SubnetworkStep:
    """Several rebuild steps of one recomputed sub-network run as one generated function (with grad, from
    stand-ins for its inputs from outside it)."""

    __slots__ = ("module", "inputs", "outputs", "release")

    def __init__(self, replay: "FusedReplay", steps: list[_RebuildStep]):
        nodes = {step.node: step for step in steps}
        component = replay.component_of[steps[0].value]
        graph = fx.Graph()
        env: dict[fx.Node, fx.Node] = {}
        self.inputs: list[_Ref] = []
        for step in steps:
            for arg in step.node.all_input_nodes:
                if arg in env or arg in nodes:
                    continue
                if arg.op == "get_attr":
                    env[arg] = graph.get_attr(arg.target)
                else:
                    env[arg] = graph.placeholder(arg.name)
                    self.inputs.append(_Ref(arg, stand_in=_value(arg) not in component.values))
            env[step.node] = graph.node_copy(step.node, lambda n: env[n])
        # what the rest of the replay reads: values read by later rebuild steps, published or kept with their graph
        self.outputs = []
        for step in steps:
            read_later = any(user not in nodes for user in step.node.users)
            if read_later or step.publish or step.graph_value:
                self.outputs.append((step.node, step.value, read_later, step.publish, step.graph_value))
        graph.output(tuple(env[node] for node, *_ in self.outputs))
        self.module = fx.GraphModule(replay.rebuild_body, graph, "subnetwork")
        self.release = tuple(used for step in steps for used in step.release if used not in nodes)


class _NodeUnit:
    """The backward of one forward node: routed without values (add, sub, cat), or the node recomputed from
    leaves for its known inputs and differentiated alone."""

    __slots__ = ("node", "value", "getitem", "source", "item", "inputs", "arguments", "call", "mark", "params",
                 "output_index", "plumbing")

    def __init__(self, replay: "FusedReplay", node: fx.Node):
        body = replay.forward_body
        self.node, self.value = node, _value(node)
        # (an item of a tuple, routed by index; indexing a tensor, ``x[:, :2]``, is an ordinary node)
        self.getitem = node.op == "call_function" and node.target is operator.getitem and \
            isinstance(node.args[0], fx.Node) and tuple_metas(node.args[0]) is not None
        if self.getitem:
            self.source, self.item = _value(node.args[0]), node.args[1]
        self.inputs = [(arg, _value(arg)) for arg in dict.fromkeys(node.all_input_nodes) if arg.op != "get_attr"]
        self.arguments = _Arguments(node, lambda arg: fetch_attr(body, arg.target) if arg.op == "get_attr"
                                    else _Ref(_value(arg)))
        self.call = _target(body, node)
        previous = node.prev
        mark = body.get_submodule(previous.target) if is_rng_mark(body, previous) else None
        # (an end mark closing the node before's scope is no mark of this node's: the sweep closes scopes itself)
        self.mark = mark if mark is not None and mark.mark is not None else None
        self.params = replay.params_of(node)
        self.output_index = None
        self.plumbing = _plumbing_kind(node)

    def plumbing_routes(self, replay: "FusedReplay", known: set[str]):
        """How the gradient is routed without recomputing the node (what each operand's shape is read from), or
        None when it must be recomputed (an operand's shape is not known yet, or it broadcasts or promotes)."""
        node, body = self.node, replay.forward_body
        if self.plumbing is None:
            return None

        def shape_source(arg: fx.Node):
            if arg.op == "get_attr":
                value = fetch_attr(body, arg.target)
                return ("constant", value) if isinstance(value, torch.Tensor) else None
            return ("value", _value(arg)) if _value(arg) in known else None

        if self.plumbing == "cat":
            tensors, dim = node.args[0], node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
            sources = [shape_source(t) for t in tensors]
            if any(s is None for s in sources):
                return None
            return ("cat", dim, [(t, s) for t, s in zip(tensors, sources)])
        out_meta = node.meta.get("tensor_meta")
        routes = []
        for arg, sign in zip(node.args, (1, 1 if self.plumbing == "add" else -1)):
            if not isinstance(arg, fx.Node):
                continue
            source = shape_source(arg)
            if source is None:
                meta = arg.meta.get("tensor_meta")
                if not (hasattr(meta, "shape") and hasattr(out_meta, "shape") and meta.shape == out_meta.shape
                        and meta.dtype == out_meta.dtype):
                    return None  # broadcast or promoted: recompute instead
                source = ("gradient", None)  # an operand of the output's own shape keeps it
            routes.append((arg, sign, source))
        return ("add", None, routes)


def _plumbing_kind(node: fx.Node) -> str | None:
    """Whether the node's backward needs no values, only shapes: add, sub, cat."""
    if node.op == "call_function" and node.target in _CAT:
        tensors = node.args[0] if node.args else None
        if isinstance(tensors, (list, tuple)) and not set(node.kwargs) - {"dim"} and \
                all(isinstance(t, fx.Node) for t in tensors):
            return "cat"
        return None
    if node.op in ("call_function", "call_method") and not node.kwargs and len(node.args) == 2:
        if node.target in _ADD:
            return "add"
        if node.target in _SUB:
            return "sub"
    return None


class FusedReplay(_Analysis):
    """The fused replay of a region: backpropagate each sub-network as soon as it is rebuilt.

    The rebuild runs step by step; between steps the backward sweeps the forward body from its end, node by node
    (each one recomputed from its known input values and differentiated alone) and sub-network by sub-network
    (the rebuild's graph differentiated, then dropped), as far as the values known so far allow. For a coupling
    ``y1 = x1 + F(x2); y2 = x2 + G(y1)`` this is revlib's order: G is rebuilt and backpropagated before F is
    rebuilt, so one sub-network's graph is alive at a time. The replay hands the runtime the gradients itself.

    Which values are known after each rebuild step follows from the graphs alone, so the whole order (rebuild
    steps, checks, backward units, values dropped) is worked out once, on the first backward, into a flat
    schedule (:meth:`schedule`); each backward then runs it without searching for what can run next. Only a
    unit through which no gradient flows in this backward is skipped where it stands.
    """

    def __init__(self, forward_body, rebuild_body, rebuilt, kept):
        super().__init__(forward_body, rebuild_body, rebuilt, kept)
        nodes = [n for n in forward_body.graph.nodes]
        self.output_node = nodes[-1]
        self.placeholders = [n for n in nodes if n.op == "placeholder"]
        self.rebuild_placeholders = [n for n in rebuild_body.graph.nodes if n.op == "placeholder"]
        units = self._backward_order(nodes)
        output = next(n for n in rebuild_body.graph.nodes if n.op == "output")
        self.rebuild_output = output
        # the inverse steps that make a rebuilt input and can write their result: they write into its storage
        self.write_into = {node: position for position, node in zip(rebuilt, output.args[0])
                           if _writes_into(rebuild_body, node)}
        self.units = units  # reverse topological order, each sub-network one unit
        self.inverted = [n.meta["invfx_inverts"] for n in rebuild_body.graph.nodes if "invfx_inverts" in n.meta]
        # what checking each inverted value reads: the value and the op's arguments (kept until it is checked)
        self.check_reads = {name: frozenset([name, *(_value(a) for a in self.forward_nodes[name].all_input_nodes)])
                            for name in self.inverted if name in self.forward_nodes}
        self.readers: dict[str, int] = {}  # how many node units read each value (it is dropped after the last)
        for unit in units:
            if isinstance(unit, fx.Node):
                for arg in unit.all_input_nodes:
                    if arg.op != "get_attr":
                        self.readers[_value(arg)] = self.readers.get(_value(arg), 0) + 1
        self._output_slot = {_value(n): i for i, n in enumerate(self.output_node.args[0])}
        self._units: dict[fx.Node, _NodeUnit] = {}
        self._component_params: dict[int, list[torch.Tensor]] = {}
        self._schedule = None

    def __call__(self, ctx: ReplayContext):
        return _Sweep(self, ctx).run()

    def _backward_order(self, nodes: list[fx.Node]) -> list:
        """The backward units (a forward node, or a whole recomputed sub-network) in an order in which every
        unit comes after all the units that read what it makes: a sub-network is differentiated once, so each
        gradient into it must have arrived first. That is not always where its last node stands: a log-det
        ``j = sum(s)`` read from inside ``s, t = F(x2)`` before ``y = exp(s) * x + t``, or ``F``'s ``sum(s)``
        recomputed at the end of the block, read values of the sub-network after it (differentiating it there
        lost those gradients: Glow's parameter gradients were wrong by 300 %). Among the units that may go next
        the one made last in the forward goes first, so the order is the forward's reversed wherever it can be.

        Raises RegionError where no order exists (a node outside a sub-network both reads one of its values
        and feeds one of its nodes)."""
        forward_body = self.forward_body
        position = {n: i for i, n in enumerate(nodes)}
        unit_of: dict[fx.Node, object] = {}
        for node in nodes[:-1]:
            component = self.component_of.get(_value(node))
            if component is not None:
                unit_of[node] = component
            elif node.op not in ("placeholder", "get_attr") and not is_rng_mark(forward_body, node):
                unit_of[node] = node  # (a get_attr's gradient goes straight to its parameter: _send)
        members: dict[int, list[fx.Node]] = {}
        units: dict[int, object] = {}
        for node, unit in unit_of.items():
            members.setdefault(id(unit), []).append(node)
            units[id(unit)] = unit
        # waiting[u]: how many other units read what u makes (u's backward waits for all of theirs)
        readers = {key: {id(unit_of[user]) for node in group for user in node.users if user in unit_of} - {key}
                   for key, group in members.items()}
        waiting = {key: len(found) for key, found in readers.items()}
        feeds: dict[int, list[int]] = {key: [] for key in members}
        for key, found in readers.items():
            for reader in found:
                feeds[reader].append(key)
        last = {key: max(position[n] for n in group) for key, group in members.items()}
        ready = [(-last[key], key) for key, count in waiting.items() if not count]
        heapq.heapify(ready)
        order = []
        while ready:
            _, key = heapq.heappop(ready)
            order.append(units[key])
            for fed in feeds[key]:
                waiting[fed] -= 1
                if not waiting[fed]:
                    heapq.heappush(ready, (-last[fed], fed))
        if len(order) != len(units):
            stuck = [units[key] for key, count in waiting.items() if count and isinstance(units[key], _Component)]
            outside = sorted({user for component in stuck for value in component.frontier
                              for user in self.forward_nodes[value].users if unit_of.get(user) is user},
                             key=position.get)
            raise RegionError(f"no fused backward order: {', '.join(n.name for n in outside[:4])} both read and "
                              "feed a recomputed sub-network")
        return order

    def params_of(self, node: fx.Node) -> list[torch.Tensor]:
        """The parameters a forward node reads (its module's, or get_attr arguments)."""
        body = self.forward_body
        found = list(body.get_submodule(node.target).parameters()) if node.op == "call_module" else []
        for arg in node.all_input_nodes:
            if arg.op == "get_attr":
                value = fetch_attr(body, arg.target)
                if isinstance(value, torch.Tensor):
                    found.append(value)
        return found

    def unit_of(self, node: fx.Node) -> _NodeUnit:
        """A forward node, ready to be run alone (made once)."""
        unit = self._units.get(node)
        if unit is None:
            unit = self._units[node] = _NodeUnit(self, node)
            # (by output slot; the sweep maps it to the runtime's count of tensor outputs)
            unit.output_index = self._output_slot.get(unit.value)
        return unit

    def component_params(self, component: _Component) -> list[torch.Tensor]:
        """The parameters a sub-network reads (made once)."""
        found = self._component_params.get(id(component))
        if found is None:
            nodes = [self.forward_nodes[v] for v in component.values]
            found = list({id(p): p for node in nodes for p in self.params_of(node)}.values())
            self._component_params[id(component)] = found
        return found

    # -- the schedule ------------------------------------------------------------------------------------------

    @property
    def schedule(self) -> list[tuple]:
        """The replay's steps in order, each ``(kind, payload)``:

        * ``("rebuild", _RebuildStep)``: run one node of the rebuild body, then publish its value;
        * ``("verify", name)``: rerun the op an inverse step undid and compare (user rules, inverses that may
          blow up);
        * ``("component", _Component)``: differentiate a rebuilt sub-network's graph, then drop it;
        * ``("node", _NodeUnit)``: the backward of one forward node;
        * ``("drop", names)``: forget values nothing left reads;
        * ``("restore", None)``: put the rebuilt inputs back into their storage.

        Worked out by running the sweep on which values are known instead of on the values themselves.
        """
        if self._schedule is None:
            self._schedule = self._plan()
        return self._schedule

    def _plan(self) -> list[tuple]:
        steps: list[tuple] = []
        rebuild_nodes = list(self.rebuild_body.graph.nodes)
        last_use: dict[fx.Node, fx.Node] = {}
        for node in reversed(rebuild_nodes):
            for arg in node.all_input_nodes:
                last_use.setdefault(arg, node)
        releases: dict[fx.Node, list[fx.Node]] = {}
        for arg, node in last_use.items():
            releases.setdefault(node, []).append(arg)
        state = _PlanState(self)
        for node in rebuild_nodes:
            if node.op == "output":
                break
            steps.append(("rebuild", _RebuildStep(self, node, releases.get(node, []))))
            value = _value(node)
            if "invfx_inverts" in node.meta:
                state.checks.append(node.meta["invfx_inverts"])
                state.unchecked.remove(node.meta["invfx_inverts"])
            if node.meta.get("invfx_recompute") and value in self.recomputed:
                state.recomputed.add(value)
            if value is not None and value not in self.internal:
                state.known.add(value)
            state.verify(steps)
            state.sweep(steps)
            state.prune(steps)
        state.verify(steps, final=True)
        steps.append(("restore", None))
        state.sweep(steps, final=True)
        if state.pending:
            raise RegionError(f"fused replay: {len(state.pending)} backward units can never run")
        return self._join_subnetworks(steps)

    def _join_subnetworks(self, steps: list[tuple]) -> list[tuple]:
        """Consecutive rebuild steps of one sub-network (nothing else due between them) become one call of
        code generated for them, as the model's own forward would run them: between two big kernels every
        Python step of the replay is slow (its caches are cold), so fewer, straight-line steps pay."""
        joined: list[tuple] = []
        run: list[_RebuildStep] = []

        def flush():
            if len(run) > 1:
                joined.append(("subnetwork", _SubnetworkStep(self, list(run))))
            else:
                joined.extend(("rebuild", step) for step in run)
            run.clear()

        for kind, payload in steps:
            if kind == "rebuild" and payload.kind == "recompute":
                component = self.component_of[payload.value]
                if run and self.component_of[run[0].value] is not component:
                    flush()
                run.append(payload)
                continue
            flush()
            joined.append((kind, payload))
        flush()
        return joined

    # the analysis refers to fx nodes; a pickled copy (torch.save) redoes it from the two bodies
    def __getstate__(self):  # (the schedule is worked out again)
        return {"bodies": (self.forward_body, self.rebuild_body, self.rebuilt, self.kept)}

    def __setstate__(self, state):
        self.__init__(*state["bodies"])


class _PlanState:
    """The sweep run on which values are known (see :attr:`FusedReplay.schedule`)."""

    def __init__(self, replay: FusedReplay):
        self.replay = replay
        self.known: set[str] = set()
        self.recomputed: set[str] = set()
        self.readers = dict(replay.readers)
        self.pending = list(replay.units)
        self.checks: list[str] = []
        self.unchecked = list(replay.inverted)

    def verify(self, steps, final=False) -> None:
        remaining = []
        for name in self.checks:
            node = self.replay.forward_nodes.get(name)
            if node is None:
                continue
            if name not in self.known or any(a.op != "get_attr" and _value(a) not in self.known
                                             for a in node.all_input_nodes):
                remaining.append(name)
                continue
            steps.append(("verify", self.replay.unit_of(node)))
        self.checks = remaining if not final else []

    def sweep(self, steps, final=False) -> None:
        while self.pending:
            unit = self.pending[0]
            if isinstance(unit, _Component):
                if any(v not in self.recomputed for v in unit.values):
                    break  # not rebuilt yet
                steps.append(("component", unit))
            else:
                step = self.replay.unit_of(unit)
                if step.getitem:
                    steps.append(("getitem", step))
                else:
                    routes = step.plumbing_routes(self.replay, self.known)
                    known = all(name in self.known for _, name in step.inputs)
                    if routes is None and not known and not final:
                        break
                    steps.append(("node", (step, routes)))
                    if routes is None and not known:
                        # (final: the values are computed from the inputs up, with grad, at run time)
                        self.known.update(self._filled(unit))
                for arg in unit.all_input_nodes:
                    name = _value(arg)
                    if name in self.readers:
                        self.readers[name] -= 1
            self.pending.pop(0)

    def _filled(self, node: fx.Node) -> set[str]:
        found = set()
        for arg in node.all_input_nodes:
            if arg.op not in ("get_attr", "placeholder") and _value(arg) not in self.known:
                found.add(_value(arg))
                found |= self._filled(arg)
        return found

    def prune(self, steps) -> None:
        reads = self.replay.check_reads
        needed = set().union(*(reads.get(name, ()) for name in self.checks + self.unchecked))
        dropped = [n for n in self.known if not self.readers.get(n) and n not in needed]
        if dropped:
            self.known.difference_update(dropped)
            steps.append(("drop", tuple(dropped)))


def _writes_into(body: fx.GraphModule, node) -> bool:
    """Whether ``node`` is an inverse step with an ``into`` form (``registry.writes_into``). Later steps may read
    what it wrote (``F(x2)`` after ``x2 = y2 - G(y1)``): the buffer is the input itself, restored, and nothing
    writes into a restored input again."""
    if not (isinstance(node, fx.Node) and node.op == "call_module"):
        return False
    return callable(getattr(getattr(body.get_submodule(node.target), "function", None), "into", None))


class _Sweep:
    """One backward of a region: runs :attr:`FusedReplay.schedule` on the region's values."""

    def __init__(self, staged: FusedReplay, ctx: ReplayContext):
        self.staged, self.ctx = staged, ctx
        self.env: dict[fx.Node, object] = {}  # the rebuild body's values, by node
        self.values: dict[str, object] = {}  # forward values known so far, detached, by name
        self.grads: dict[str, object] = {}
        self.param_grads: dict[int, torch.Tensor] = {}
        self.params = {id(p): p for p in ctx.params}
        self.direct = ctx.direct_params
        self.graph_values: dict[str, object] = {}  # a sub-network's frontier values, with their graph
        self.stand_ins: dict[str, torch.Tensor] = {}
        # sub-networks still to be differentiated that read each stand-in: the last one drops it (a stand-in
        # shares its value's memory, so holding it to the end of a region of many blocks held every block's input)
        self.stand_in_readers = dict(staged.stand_in_readers)
        self.evaluated: dict[str, tuple] = {}  # filled values whose graph awaits their own backward
        outputs = ctx.outputs if isinstance(ctx.outputs, tuple) else (ctx.outputs,)
        self.outputs = outputs
        # grad_outputs and check_output count the region's *tensor* outputs (it may also return sizes)
        self.tensor_index: dict[int, int] = {}
        for slot, value in enumerate(outputs):
            if isinstance(value, torch.Tensor):
                self.tensor_index[slot] = len(self.tensor_index)

    def run(self):
        staged, ctx = self.staged, self.ctx
        grad_outputs = ctx.grad_outputs
        for slot, node in enumerate(staged.output_node.args[0]):
            index = self.tensor_index.get(slot)
            if index is not None and grad_outputs[index] is not None:
                self._add_grad(_value(node), grad_outputs[index])
        ctx.grad_outputs = grad_outputs = None  # (from here only self.grads holds them, until used up)
        kept = [ctx.input(p).detach() for p in staged.kept]
        self.inputs = [o.detach() if isinstance(o, torch.Tensor) else o for o in self.outputs] + kept
        try:
            steps = _STEPS
            with torch.enable_grad():
                for kind, payload in staged.schedule:
                    steps[kind](self, payload)
        finally:
            self.env = self.inputs = None  # (nothing of this run may outlive it: the rebuilt inputs)
        input_grads = {p: self.grads.get(_value(node)) for p, node in enumerate(staged.placeholders)}
        ctx.gradients = (input_grads, self.param_grads)
        return None  # outputs were checked as they were recomputed (ctx.check_output)

    # -- the rebuild -------------------------------------------------------------------------------------------

    def _rebuild(self, step: _RebuildStep) -> None:
        env = self.env
        kind = step.kind
        if kind == "placeholder":
            result = self.inputs[step.index]
        elif kind == "constant":
            result = step.constant
        elif kind == "plain":
            args, kwargs = step.arguments(self._env_value)
            result = None
            if step.into is not None:
                result = self._into_storage(step, args, kwargs)
            if result is None:
                with torch.no_grad():
                    result = step.call(*args, **kwargs)
        else:  # recompute: with grad (the replay runs with grad on), from stand-ins
            args, kwargs = step.arguments(self._feed)
            result = step.call(*args, **kwargs)
            if step.graph_value:
                self.graph_values[step.value] = result
        env[step.node] = result
        for used in step.release:
            del env[used]  # (a sub-network's graph lives on in graph_values until its backward)
        if step.publish:
            self.values[step.value] = _detached(result)

    def _subnetwork(self, step: _SubnetworkStep) -> None:
        env = self.env
        results = step.module(*[self._feed(ref) for ref in step.inputs])
        for (node, value, read_later, publish, graph_value), result in zip(step.outputs, results):
            if read_later:
                env[node] = result
            if graph_value:
                self.graph_values[value] = result
            if publish:
                self.values[value] = _detached(result)
        for used in step.release:
            del env[used]

    def _env_value(self, ref: _Ref):
        return self.env[ref.key]

    def _feed(self, ref: _Ref):
        source = self.env[ref.key]
        if not ref.stand_in or not isinstance(source, torch.Tensor):
            return source
        name = _value(ref.key)
        found = self.stand_ins.get(name)
        if found is None:
            found = self.stand_ins[name] = stand_in(source)
        return found

    def _into_storage(self, step: _RebuildStep, args, kwargs) -> torch.Tensor | None:
        """A rebuilt input made by a step that can write its result (``y - F(x2)``, a concatenation) is written
        straight into the freed input's own storage: no temporary the size of the input, and no copy into the
        storage afterwards. (Which nodes qualify is decided once, in the analysis: ``FusedReplay.write_into``;
        the step's ``into`` declines, returning None, when the result would not fit the buffer.)"""
        buffer = self.ctx.input_buffer(step.into_position)
        if buffer is None:
            return None
        with torch.no_grad():
            return step.into(buffer, *args, **kwargs)

    def _restore(self, _) -> None:
        staged = self.staged
        for position, node in zip(staged.rebuilt, staged.rebuild_output.args[0]):
            self.ctx.input(position, self.env[node].detach())  # back into the freed storage

    def _drop(self, names) -> None:
        """Values no unit left and no pending check reads. A sub-network's output is often rebuilt after the
        node that read it was backpropagated (``y1 = x1 + F(x2)``: the add needs no values), and holding it
        would cost its size through the rest of the sweep."""
        values = self.values
        for name in names:
            values.pop(name, None)

    def _verify(self, unit: _NodeUnit) -> None:
        """Rerun the op an inverse step undid on the rebuilt argument and the known ones, and compare with the
        op's output. A wrong or blown-up inverse is an error where it happens, at the cost of one forward op per
        inverse step (never a sub-network)."""
        node = unit.node
        args, kwargs = unit.arguments(self._value_of)
        with torch.no_grad():
            redone = self._evaluate(unit, args, kwargs)
        expected = self.values[unit.value]
        target = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", node.target)
        for got, want in zip(tensors_in(redone), tensors_in(expected)):
            self.ctx.check_value(got, want, f"{unit.value} (undone by {target})")

    def _value_of(self, ref: _Ref):
        return self.values[ref.key]

    # -- backward units ----------------------------------------------------------------------------------------

    def _component(self, component: _Component) -> None:
        graph_values, grads = self.graph_values, self.grads
        roots, root_grads = [], []
        for v in component.frontier:
            # (a tuple it makes, ``chunk``, whose items are read outside it, has its gradient by item: _getitem)
            outs, out_grads = _pairs(graph_values.get(v), grads.get(v))
            roots += outs
            root_grads += out_grads
        if roots:
            stand_ins = self.stand_ins
            wrt_inputs = [(v, stand_ins[v]) for v in component.external
                          if v in stand_ins and stand_ins[v].requires_grad]
            params = [p for p in self._component_params(component) if p.requires_grad]
            if wrt_inputs or params:
                input_grads, param_grads = self.ctx.differentiate(roots, root_grads, [s for _, s in wrt_inputs],
                                                                  params)
                for (v, _), grad in zip(wrt_inputs, input_grads):
                    self._add_grad(v, grad)
                self._add_param_grads(params, param_grads)
        del roots, root_grads
        for v in component.values:  # its graph and gradients are done with
            graph_values.pop(v, None)
            grads.pop(v, None)
        readers = self.stand_in_readers
        for v in component.external:
            readers[v] -= 1
            if not readers[v]:
                self.stand_ins.pop(v, None)

    def _component_params(self, component: _Component) -> list[torch.Tensor]:
        """The region's parameters the sub-network reads (differentiating with respect to the region's others
        would cost a hook and an unused input each)."""
        found = self.staged.component_params(component)
        params = self.params
        return [p for p in found if id(p) in params]

    def _getitem(self, unit: _NodeUnit) -> None:
        grad = self.grads.get(unit.value)
        if grad is not None:
            items = self.grads.setdefault(unit.source, {})
            items[unit.item] = grad if unit.item not in items else items[unit.item] + grad

    def _node(self, payload) -> None:
        unit, routes = payload
        name = unit.value
        grad = self.grads.get(name)
        if grad is None:
            return  # nothing flows back through it
        if routes is not None and isinstance(grad, torch.Tensor):
            self._route(routes, grad)
            self.grads.pop(name, None)
            return
        if name in self.evaluated:  # run with grad already, to give a later node its input: not again
            out, leaves = self.evaluated.pop(name)
        else:
            values = self.values
            for arg, value in unit.inputs:
                if value not in values:
                    self._fill(arg)
            out, leaves = self._with_grad(unit)
        self.grads.pop(name, None)  # consumed here
        if unit.output_index is not None and isinstance(out, torch.Tensor):
            index = self.tensor_index.get(unit.output_index)
            if index is not None:
                self.ctx.check_output(index, out)  # now: keeping it would cost memory
        outs, grads = _pairs(out, grad)
        if not outs:
            return
        params = [p for p in unit.params if id(p) in self.params and p.requires_grad]
        if leaves or params:
            input_grads, param_grads = self.ctx.differentiate(outs, grads, list(leaves.values()), params)
            for name_in, grad_in in zip(leaves, input_grads):
                self._add_grad(name_in, grad_in)
            self._add_param_grads(params, param_grads)

    def _route(self, routes, grad: torch.Tensor) -> None:
        """The backward of add, sub and cat without recomputing them: it needs no values, only shapes (see
        :meth:`_NodeUnit.plumbing_routes`)."""
        kind, dim, pieces = routes
        if kind == "cat":
            sizes = [self._shape(source, grad)[dim] for _, source in pieces]
            if sum(sizes) != grad.shape[dim]:
                raise RegionError(f"fused replay: a gradient of shape {tuple(grad.shape)} does not split into "
                                  f"{sizes} along dim {dim}")
            for (arg, _), piece in zip(pieces, grad.split(sizes, dim)):
                self._send(arg, piece)
            return
        for arg, sign, source in pieces:
            if source[0] == "value" and not isinstance(self.values[source[1]], torch.Tensor):
                continue  # a number (``n_pixels * 0.0``): nothing to send it
            shape = self._shape(source, grad)
            piece = grad if sign == 1 else -grad
            self._send(arg, piece if tuple(piece.shape) == shape else piece.sum_to_size(shape))

    def _shape(self, source, grad) -> tuple:
        kind, payload = source
        if kind == "value":
            return tuple(self.values[payload].shape)
        if kind == "constant":
            return tuple(payload.shape)
        return tuple(grad.shape)

    def _send(self, arg: fx.Node, grad: torch.Tensor) -> None:
        if arg.op == "get_attr":
            param = fetch_attr(self.staged.forward_body, arg.target)
            if isinstance(param, torch.Tensor) and id(param) in self.params and param.requires_grad:
                self._add_param_grads([param], [grad.to(param.dtype)])
        else:
            value = self.values.get(_value(arg))
            if isinstance(value, torch.Tensor) and value.dtype != grad.dtype:
                grad = grad.to(value.dtype)
            self._add_grad(_value(arg), grad)

    def _with_grad(self, unit: _NodeUnit):
        """The unit's node run with grad from leaves standing for its (known) input values."""
        leaves: dict[str, torch.Tensor] = {}
        values = self.values
        for _, name in unit.inputs:  # one leaf per value, however often the node reads it (attention(h, h, h))
            value = values[name]
            if isinstance(value, torch.Tensor) and (value.is_floating_point() or value.is_complex()):
                leaves[name] = value.detach().requires_grad_()

        def feed(ref: _Ref):
            found = leaves.get(ref.key)
            return found if found is not None else values[ref.key]

        args, kwargs = unit.arguments(feed)
        out = self._evaluate(unit, args, kwargs)  # (with grad: the replay runs with grad on)
        return out, leaves

    def _fill(self, node: fx.Node) -> None:
        """A forward value the rebuild did not make, computed from the inputs up. It is computed with grad and
        its graph kept for the node's own backward, which comes later in the sweep: each node runs once."""
        if node.op in ("get_attr", "placeholder") or _value(node) in self.values:
            return
        for arg in node.all_input_nodes:
            self._fill(arg)
        unit = self.staged.unit_of(node)
        out, leaves = self._with_grad(unit)
        self.evaluated[unit.value] = (out, leaves)
        self.values[unit.value] = _detached(out)

    @staticmethod
    def _evaluate(unit: _NodeUnit, args, kwargs):
        if unit.mark is None:  # (no scope is open: each marked node's closes after it)
            return unit.call(*args, **kwargs)
        unit.mark()  # this node's dropout mask and recorded branches, as in the forward
        try:
            return unit.call(*args, **kwargs)
        finally:
            close_scope()  # (the replay's own checks that follow are no sub-network's)

    # -- bookkeeping -------------------------------------------------------------------------------------------

    def _add_grad(self, name, grad) -> None:
        if grad is None:
            return
        current = self.grads.get(name)
        self.grads[name] = grad if current is None else current + grad

    def _add_param_grads(self, params, grads) -> None:
        direct, direct_grads = [], []
        for param, grad in zip(params, grads):
            if grad is None:
                continue
            if id(param) in self.direct:  # into .grad now: holding it would cost its size
                direct.append(param)
                direct_grads.append(grad)
                continue
            current = self.param_grads.get(id(param))
            self.param_grads[id(param)] = grad if current is None else current + grad
        if direct:
            add_into_grads(direct, direct_grads)


_STEPS = {kind: getattr(_Sweep, "_" + kind)
          for kind in ("rebuild", "subnetwork", "verify", "component", "getitem", "node", "drop", "restore")}

_ADD = {operator.add, torch.add, "add"}
_SUB = {operator.sub, torch.sub, "sub"}
_CAT = {torch.cat, torch.concat, torch.concatenate}


def tensors_in(value) -> list:
    """The tensors in a value, nested tuples, lists and dicts included, in order."""
    return leaves(value, lambda item: isinstance(item, torch.Tensor))


def _detached(value):
    if isinstance(value, torch.Tensor):
        return value.detach()
    if isinstance(value, (tuple, list)):
        return type(value)(_detached(v) for v in value)
    return value


def _pairs(out, grad):
    """Outputs that require grad with their gradients (a tuple output's gradients come by item index)."""
    if isinstance(out, torch.Tensor):
        return ([out], [grad]) if grad is not None and out.requires_grad else ([], [])
    if isinstance(out, (tuple, list)) and isinstance(grad, dict):
        pairs = [(out[i], g) for i, g in grad.items() if isinstance(out[i], torch.Tensor) and out[i].requires_grad]
        return [o for o, _ in pairs], [g for _, g in pairs]
    return [], []
