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

import operator

import torch
import torch.fx as fx

from ..runtime import ReplayContext
from ..runtime.graft import stand_in
from ..runtime.region import add_into_grad

__all__ = ["FusedReplay"]


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
        self.components = self._components(forward_nodes)
        self.component_of = {v: c for c in self.components for v in c.values}
        # values only read inside their sub-network's graph (never published to the sweep)
        self.internal = {v for c in self.components for v in c.values if v not in c.frontier}

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


class _Interpreter(fx.Interpreter):
    """An interpreter that looks each attribute up once: a body's modules and tensors are fixed when it is made
    (they are its own attributes), and walking ``blocks.3.F.0`` at every node of every backward adds up."""

    def fetch_attr(self, target: str):
        cache = self.__dict__.setdefault("_attributes", {})
        if target not in cache:
            cache[target] = super().fetch_attr(target)
        return cache[target]


class _Rebuild(_Interpreter):
    """Phase A: the rebuild body under no_grad, but recomputed sub-networks with grad from stand-ins."""

    def __init__(self, module, fused: _Analysis, garbage_collect: bool = False):
        super().__init__(module, garbage_collect_values=garbage_collect)
        self.fused = fused
        self.graph_values: dict[str, object] = {}  # a sub-network's frontier values, with their graph
        self.recomputed: set[str] = set()  # every sub-network value run so far (inner ones are not held)
        self.stand_ins: dict[str, torch.Tensor] = {}
        self.write_into: dict[fx.Node, int] = {}  # nodes making a freed input: its argument position
        self.ctx = None

    def _into_storage(self, n: fx.Node) -> torch.Tensor | None:
        """A rebuilt input made by a step that can write its result (``y - F(x2)``, a concatenation) is written
        straight into the freed input's own storage: no temporary the size of the input, and no copy into the
        storage afterwards. (Which nodes qualify is decided once, in the analysis: ``FusedReplay.write_into``;
        the step's ``into`` declines, returning None, when the result would not fit the buffer.)"""
        buffer = self.ctx.input_buffer(self.write_into[n])
        if buffer is None:
            return None
        args = fx.node.map_arg(n.args, lambda a: self.env[a])
        kwargs = fx.node.map_arg(n.kwargs, lambda a: self.env[a])
        with torch.no_grad():
            return self.fetch_attr(n.target).function.into(buffer, *args, **kwargs)

    def run_node(self, n: fx.Node):
        value = _value(n)
        if n in self.write_into:
            written = self._into_storage(n)
            if written is not None:
                return written
        if not (n.meta.get("invfx_recompute") and value in self.fused.recomputed):
            with torch.no_grad():
                return super().run_node(n)
        component = self.fused.component_of[value]

        def feed(arg: fx.Node):
            source = self.env[arg]
            name = _value(arg)
            if name in component.values or arg.op == "get_attr" or not isinstance(source, torch.Tensor):
                return source
            if name not in self.stand_ins:
                self.stand_ins[name] = stand_in(source)
            return self.stand_ins[name]

        args = fx.node.map_arg(n.args, feed)
        kwargs = fx.node.map_arg(n.kwargs, feed)
        with torch.enable_grad():
            result = getattr(self, n.op)(n.target, args, kwargs)
        self.recomputed.add(value)
        if value not in self.fused.internal:
            # an inner value lives on only where its graph saved it: holding it here would keep, say, a
            # hidden activation alive through the whole sub-network's backward
            self.graph_values[value] = result
        return result


class FusedReplay(_Analysis):
    """The fused replay of a region: backpropagate each sub-network as soon as it is rebuilt.

    The rebuild runs step by step; between steps the backward sweeps the forward body from its end, node by node
    (each one recomputed from its known input values and differentiated alone) and sub-network by sub-network
    (the rebuild's graph differentiated, then dropped), as far as the values known so far allow. For a coupling
    ``y1 = x1 + F(x2); y2 = x2 + G(y1)`` this is revlib's order: G is rebuilt and backpropagated before F is
    rebuilt, so one sub-network's graph is alive at a time. The replay hands the runtime the gradients itself.
    """

    def __init__(self, forward_body, rebuild_body, rebuilt, kept):
        super().__init__(forward_body, rebuild_body, rebuilt, kept)
        nodes = [n for n in forward_body.graph.nodes]
        self.output_node = nodes[-1]
        self.placeholders = [n for n in nodes if n.op == "placeholder"]
        units, seen = [], set()
        for node in reversed(nodes[:-1]):
            component = self.component_of.get(_value(node))
            if component is not None:
                if id(component) not in seen:
                    seen.add(id(component))
                    units.append(component)
            elif node.op != "placeholder" and not _is_mark(forward_body, node):
                units.append(node)
        output = next(n for n in rebuild_body.graph.nodes if n.op == "output")
        # the inverse steps that make a rebuilt input and can write their result: they write into its storage
        self.write_into = {node: position for position, node in zip(rebuilt, output.args[0])
                           if _writes_into(rebuild_body, node)}
        self.units = units  # reverse topological order; a sub-network where its last node is
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

    def __call__(self, ctx: ReplayContext):
        return _Sweep(self, ctx).run()

    @property
    def forward_interpreter(self) -> fx.Interpreter:
        """Runs single forward nodes (stateless here: made once; its set-up walks every submodule)."""
        if getattr(self, "_forward_interpreter", None) is None:
            self._forward_interpreter = _Interpreter(self.forward_body)
        return self._forward_interpreter

    def rebuild_interpreter(self) -> "_Rebuild":
        """A rebuild run's interpreter: made once, its per-run state reset each time."""
        if getattr(self, "_rebuild_interpreter", None) is None:
            self._rebuild_interpreter = _Rebuild(self.rebuild_body, self, garbage_collect=True)
        interpreter = self._rebuild_interpreter
        interpreter.graph_values, interpreter.recomputed, interpreter.stand_ins = {}, set(), {}
        return interpreter

    def params_of(self, node: fx.Node) -> list[torch.Tensor]:
        """The parameters a forward node reads (its module's, or get_attr arguments), found once."""
        cache = self.__dict__.setdefault("_params_of", {})
        if node not in cache:
            found = list(self.forward_body.get_submodule(node.target).parameters()) if node.op == "call_module" \
                else []
            for arg in node.all_input_nodes:
                if arg.op == "get_attr":
                    value = self.forward_interpreter.fetch_attr(arg.target)
                    if isinstance(value, torch.Tensor):
                        found.append(value)
            cache[node] = found
        return cache[node]

    # the analysis refers to fx nodes; a pickled copy (torch.save) redoes it from the two bodies
    def __getstate__(self):  # (interpreters and caches are made again)
        return {"bodies": (self.forward_body, self.rebuild_body, self.rebuilt, self.kept)}

    def __setstate__(self, state):
        self.__init__(*state["bodies"])


def _writes_into(body: fx.GraphModule, node) -> bool:
    """Whether ``node`` is an inverse step with an ``into`` form (``registry.writes_into``). Later steps may read
    what it wrote (``F(x2)`` after ``x2 = y2 - G(y1)``): the buffer is the input itself, restored, and nothing
    writes into a restored input again."""
    if not (isinstance(node, fx.Node) and node.op == "call_module"):
        return False
    return callable(getattr(getattr(body.get_submodule(node.target), "function", None), "into", None))


def _is_mark(body, node: fx.Node) -> bool:
    from .rewrite import is_rng_mark  # (rewrite imports this module)

    return is_rng_mark(body, node)


class _Sweep:
    def __init__(self, staged: FusedReplay, ctx: ReplayContext):
        self.staged, self.ctx = staged, ctx
        self.values: dict[str, object] = {}
        self.grads: dict[str, object] = {}
        self.param_grads: dict[int, torch.Tensor] = {}
        self.params = {id(p): p for p in ctx.params}
        self.evaluated: dict[str, tuple] = {}  # filled values whose graph awaits their own backward
        # the region's tensor outputs by value, numbered as the runtime counts them (grad_outputs, check_output)
        outputs = ctx.outputs if isinstance(ctx.outputs, tuple) else (ctx.outputs,)
        self.tensor_outputs = [node for node, value in zip(staged.output_node.args[0], outputs)
                               if isinstance(value, torch.Tensor)]
        self.output_index = {_value(node): i for i, node in enumerate(self.tensor_outputs)}
        self.checks: list[str] = []  # inverted forward values whose inverse step awaits its check
        self.unchecked: list[str] = list(staged.inverted)  # ... and those whose inverse step is still to run
        self.readers = dict(staged.readers)
        self.forward = staged.forward_interpreter
        self.rebuild = staged.rebuild_interpreter()

    # -- driving -----------------------------------------------------------------------------------------------

    def run(self):
        try:
            return self._run()
        finally:
            # the interpreter is reused: it must not keep this run's values (a region's rebuilt inputs) alive
            rebuild = self.rebuild
            rebuild.env, rebuild.graph_values, rebuild.recomputed, rebuild.stand_ins = {}, {}, set(), {}
            rebuild.ctx, rebuild.write_into = None, {}
            rebuild.args_iter = iter(())

    def _run(self):
        staged, ctx = self.staged, self.ctx
        outputs = ctx.outputs if isinstance(ctx.outputs, tuple) else (ctx.outputs,)
        kept = {p: ctx.input(p) for p in staged.kept}
        # grad_outputs has one entry per *tensor* output (a region may also return sizes and other values)
        for node, grad in zip(self.tensor_outputs, ctx.grad_outputs):
            if grad is not None:
                self._add_grad(_value(node), grad)
        rebuild = self.rebuild
        rebuild.args_iter = iter([o.detach() if isinstance(o, torch.Tensor) else o for o in outputs] +
                                 [kept[p].detach() for p in staged.kept])
        rebuild.env = {}
        rebuild.ctx = ctx
        rebuild.write_into = staged.write_into
        pending = list(staged.units)
        rebuilt = None
        for node in staged.rebuild_body.graph.nodes:
            if node.op == "output":
                rebuilt = [rebuild.env[a] for a in node.args[0]]
                break
            result = rebuild.run_node(node)
            rebuild.env[node] = result
            for used in rebuild.user_to_last_uses.get(node, []):
                del rebuild.env[used]  # (a sub-network's graph lives on in graph_values until its backward)
            if "invfx_inverts" in node.meta:
                self.checks.append(node.meta["invfx_inverts"])
                self.unchecked.remove(node.meta["invfx_inverts"])
            value = _value(node)
            if value is not None and value not in self.staged.internal:
                # (a sub-network's inner values are only read inside its graph: holding them would keep the
                # graph's memory alive after its backward)
                self.values[value] = _detached(result)
            self._verify()
            pending = self._sweep(pending)
            self._prune()
        self._verify(final=True)
        for position, value in zip(staged.rebuilt, rebuilt or []):
            ctx.input(position, value.detach())  # back into the freed storage
        pending = self._sweep(pending, final=True)
        if pending:
            raise RuntimeError(f"staged replay stopped with {len(pending)} units left")
        input_grads = {p: self.grads.get(_value(node)) for p, node in enumerate(staged.placeholders)}
        ctx.gradients = (input_grads, self.param_grads)
        return None  # outputs were checked as they were recomputed (ctx.check_output)

    def _prune(self) -> None:
        """Drop the values no unit left and no pending check reads. A sub-network's output is often rebuilt
        after the node that read it was backpropagated (``y1 = x1 + F(x2)``: the add needs no values), and
        holding it would cost its size through the rest of the sweep."""
        reads = self.staged.check_reads
        needed = set().union(*(reads.get(name, ()) for name in self.checks + self.unchecked))
        for name in [n for n in self.values if not self.readers.get(n) and n not in needed]:
            del self.values[name]

    def _verify(self, final: bool = False) -> None:
        """Each inverse step, once the values it involves are known: rerun the op it undid on the rebuilt
        argument and the known ones, and compare with the op's output. A wrong or blown-up inverse is an error
        where it happens, at the cost of one forward op per inverse step (never a sub-network)."""
        remaining = []
        nodes = self.staged.forward_nodes
        for name in self.checks:
            node = nodes.get(name)
            if node is None:
                continue
            if name not in self.values or any(a.op != "get_attr" and _value(a) not in self.values
                                               for a in node.all_input_nodes):
                remaining.append(name)
                continue
            args = fx.node.map_arg(node.args, self._known)
            kwargs = fx.node.map_arg(node.kwargs, self._known)
            with torch.no_grad():
                redone = self._evaluate(node, args, kwargs)
            expected = self.values[name]
            target = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", node.target)
            for got, want in zip(tensors_in(redone), tensors_in(expected)):
                self.ctx.check_value(got, want, f"{name} (undone by {target})")
        self.checks = remaining if not final else []

    def _known(self, arg: fx.Node):
        return self.forward.fetch_attr(arg.target) if arg.op == "get_attr" else self.values[_value(arg)]

    def _sweep(self, pending, final=False):
        while pending:
            unit = pending[0]
            done = self._component(unit) if isinstance(unit, _Component) else self._node(unit, final)
            if not done:
                break
            pending = pending[1:]
            if isinstance(unit, fx.Node):
                for arg in unit.all_input_nodes:
                    name = _value(arg)
                    if name in self.readers:
                        self.readers[name] -= 1  # (at 0 ``_prune`` drops it, once no check needs it either)
        return pending

    # -- one unit ----------------------------------------------------------------------------------------------

    def _component(self, component: _Component) -> bool:
        graph_values = self.rebuild.graph_values
        if any(v not in self.rebuild.recomputed for v in component.values):
            return False  # not rebuilt yet
        roots = [(graph_values[v], self.grads.get(v)) for v in component.frontier]
        roots = [(o, g) for o, g in roots if isinstance(o, torch.Tensor) and g is not None and o.requires_grad]
        stand_ins = [(v, self.rebuild.stand_ins[v]) for v in component.external if v in self.rebuild.stand_ins]
        wrt_inputs = [(v, s) for v, s in stand_ins if s.requires_grad]
        params = [p for p in self.params.values() if p.requires_grad]
        if roots and (wrt_inputs or params):
            input_grads, param_grads = self.ctx.differentiate(
                [o for o, _ in roots], [g for _, g in roots], [s for _, s in wrt_inputs], params)
            for (v, _), grad in zip(wrt_inputs, input_grads):
                self._add_grad(v, grad)
            for p, grad in zip(params, param_grads):
                self._add_param_grad(p, grad)
        for v in component.values:  # its graph and gradients are done with
            graph_values.pop(v, None)
            self.grads.pop(v, None)
        return True

    def _node(self, node: fx.Node, final: bool) -> bool:
        name = _value(node)
        if node.op == "call_function" and node.target is operator.getitem and isinstance(node.args[0], fx.Node):
            grad = self.grads.get(name)
            if grad is not None:
                source = _value(node.args[0])
                items = self.grads.setdefault(source, {})
                items[node.args[1]] = grad if node.args[1] not in items else items[node.args[1]] + grad
            return True
        grad = self.grads.get(name)
        if grad is None:
            return True  # nothing flows back through it
        if self._plumbing(node, grad):
            self.grads.pop(name, None)
            return True
        if name in self.evaluated:  # run with grad already, to give a later node its input: not again
            out, leaves = self.evaluated.pop(name)
        else:
            if any(a.op != "get_attr" and _value(a) not in self.values for a in node.all_input_nodes):
                if not final:
                    return False
                for arg in node.all_input_nodes:
                    self._fill(arg)
            out, leaves = self._with_grad(node)
        self.grads.pop(name, None)  # consumed here
        if name in self.output_index and isinstance(out, torch.Tensor):
            self.ctx.check_output(self.output_index[name], out)  # now: keeping it would cost memory
        outs, grads = _pairs(out, grad)
        if not outs:
            return True
        params = [p for p in self._params_of(node) if p.requires_grad]
        wrt = [leaf for leaf in leaves.values()] + params
        if wrt:
            input_grads, param_grads = self.ctx.differentiate(outs, grads, list(leaves.values()), params)
            for arg, grad_in in zip(leaves, input_grads):
                self._add_grad(_value(arg), grad_in)
            for p, grad_p in zip(params, param_grads):
                self._add_param_grad(p, grad_p)
        return True

    def _plumbing(self, node: fx.Node, grad) -> bool:
        """The backward of add, sub and cat without recomputing them: it needs no values, only shapes, taken
        from the runtime values when known, else from the example run when they cannot have changed (an operand
        of the output's own shape keeps it). Outputs of the region are still recomputed: the reconstruction
        check compares them."""
        if not isinstance(grad, torch.Tensor) or node.op not in ("call_function", "call_method"):
            return False
        target = node.target
        if target in _CAT and node.op == "call_function":
            tensors, dim = node.args[0], node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
            if not isinstance(tensors, (list, tuple)) or set(node.kwargs) - {"dim"} or \
                    not all(isinstance(t, fx.Node) for t in tensors):
                return False
            sizes = [self._runtime_shape(t) for t in tensors]
            if any(size is None for size in sizes):
                return False
            sizes = [size[dim] for size in sizes]
            if sum(sizes) != grad.shape[dim]:
                return False
            for arg, piece in zip(tensors, grad.split(sizes, dim)):
                self._send(arg, piece)
            return True
        if (target in _ADD or target in _SUB) and not node.kwargs and len(node.args) == 2:
            out_meta = node.meta.get("tensor_meta")
            routes = []
            for arg, sign in zip(node.args, (1, 1 if target in _ADD else -1)):
                if not isinstance(arg, fx.Node):
                    continue
                shape = self._runtime_shape(arg)
                if shape is None:
                    meta = arg.meta.get("tensor_meta")
                    if not (hasattr(meta, "shape") and hasattr(out_meta, "shape") and meta.shape == out_meta.shape
                            and meta.dtype == out_meta.dtype):
                        return False  # broadcast or promoted: recompute instead
                    shape = tuple(grad.shape)
                routes.append((arg, sign, shape))
            for arg, sign, shape in routes:
                piece = grad if sign == 1 else -grad
                self._send(arg, piece if tuple(piece.shape) == shape else piece.sum_to_size(shape))
            return True
        return False

    def _runtime_shape(self, node: fx.Node):
        value = self.forward.fetch_attr(node.target) if node.op == "get_attr" else self.values.get(_value(node))
        return tuple(value.shape) if isinstance(value, torch.Tensor) else None

    def _send(self, arg: fx.Node, grad: torch.Tensor) -> None:
        if arg.op == "get_attr":
            param = self.forward.fetch_attr(arg.target)
            if isinstance(param, torch.Tensor) and id(param) in self.params and param.requires_grad:
                self._add_param_grad(param, grad.to(param.dtype))
        else:
            value = self.values.get(_value(arg))
            if isinstance(value, torch.Tensor) and value.dtype != grad.dtype:
                grad = grad.to(value.dtype)
            self._add_grad(_value(arg), grad)

    def _with_grad(self, node: fx.Node):
        """``node`` run with grad from leaves standing for its (known) input values."""
        leaves: dict[fx.Node, torch.Tensor] = {}

        def feed(arg: fx.Node):
            if arg.op == "get_attr":
                return self.forward.fetch_attr(arg.target)
            if arg in leaves:  # one leaf per value, however often the node reads it (attention(h, h, h))
                return leaves[arg]
            value = self.values[_value(arg)]
            if isinstance(value, torch.Tensor) and (value.is_floating_point() or value.is_complex()):
                leaves[arg] = value.detach().requires_grad_()
                return leaves[arg]
            return value

        args = fx.node.map_arg(node.args, feed)
        kwargs = fx.node.map_arg(node.kwargs, feed)
        with torch.enable_grad():
            out = self._evaluate(node, args, kwargs)
        return out, leaves

    def _fill(self, node: fx.Node) -> None:
        """A forward value the rebuild did not make, computed from the inputs up. It is computed with grad and
        its graph kept for the node's own backward, which comes later in the sweep: each node runs once."""
        if node.op in ("get_attr", "placeholder") or _value(node) in self.values:
            return
        for arg in node.all_input_nodes:
            self._fill(arg)
        out, leaves = self._with_grad(node)
        self.evaluated[_value(node)] = (out, leaves)
        self.values[_value(node)] = _detached(out)

    def _evaluate(self, node: fx.Node, args, kwargs):
        if _is_mark(self.staged.forward_body, node.prev):
            self.forward.fetch_attr(node.prev.target)()  # this node's dropout mask, as in the forward
        return getattr(self.forward, node.op)(node.target, args, kwargs)

    # -- bookkeeping -------------------------------------------------------------------------------------------

    def _params_of(self, node: fx.Node) -> list[torch.Tensor]:
        return [p for p in self.staged.params_of(node) if id(p) in self.params]

    def _add_grad(self, name, grad) -> None:
        if grad is None:
            return
        current = self.grads.get(name)
        self.grads[name] = grad if current is None else current + grad

    def _add_param_grad(self, param, grad) -> None:
        if grad is None:
            return
        if id(param) in self.ctx.direct_params:  # into .grad now: holding it would cost its size
            add_into_grad(param, grad)
            return
        current = self.param_grads.get(id(param))
        self.param_grads[id(param)] = grad if current is None else current + grad


_ADD = {operator.add, torch.add, "add"}
_SUB = {operator.sub, torch.sub, "sub"}
_CAT = {torch.cat, torch.concat, torch.concatenate}


def tensors_in(value) -> list:
    """The tensors in a value, nested tuples, lists and dicts included, in order."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (tuple, list)):
        return [v for item in value for v in tensors_in(item)]
    if isinstance(value, dict):
        return [v for item in value.values() for v in tensors_in(item)]
    return []


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
