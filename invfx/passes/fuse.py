"""The fused replay of a rewritten region: each recomputed sub-network runs once in backward.

The rebuild body recomputes sub-networks (``F(x2)``) to undo the segment; the forward body computes them again
for the gradient. The fused replay runs the rebuild with grad on the recomputed nodes only, from *stand-in*
leaves for their inputs, then runs the forward body on the rebuilt input leaves, and where the forward body
reaches a recomputed sub-network it *grafts* the rebuild's evaluation in (``invfx.runtime.graft``) instead of
running it again. Recomputed nodes are grouped into connected sub-networks; one that the forward body reaches
before all its inputs exist is simply run again (correct, not fused).
"""

from __future__ import annotations

import torch
import torch.fx as fx

from ..runtime import ReplayContext
from ..runtime.graft import graft, stand_in

__all__ = ["FusedReplay"]


def _value(node: fx.Node) -> str | None:
    return node.meta.get("invfx_value")


class _Component:
    __slots__ = ("values", "frontier", "external")

    def __init__(self):
        self.values: set[str] = set()
        self.frontier: list[str] = []  # values read outside the sub-network (grafted in the forward body)
        self.external: list[str] = []  # values it reads from outside (stand-ins in the rebuild)


class FusedReplay:
    """A replay for :class:`invfx.runtime.Region` built from a region's forward and rebuild bodies."""

    def __init__(self, forward_body: fx.GraphModule, rebuild_body: fx.GraphModule, rebuilt: tuple[int, ...],
                 kept: tuple[int, ...]):
        self.forward_body, self.rebuild_body = forward_body, rebuild_body
        self.rebuilt, self.kept = rebuilt, kept
        recomputed = {_value(n) for n in rebuild_body.graph.nodes if n.meta.get("invfx_recompute")}
        forward_nodes = {_value(n): n for n in forward_body.graph.nodes if _value(n) is not None}
        self.recomputed = {v for v in recomputed if v in forward_nodes}
        self.components = self._components(forward_nodes)
        self.component_of = {v: c for c in self.components for v in c.values}

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

    def __call__(self, ctx: ReplayContext):
        outputs = ctx.outputs if isinstance(ctx.outputs, tuple) else (ctx.outputs,)
        kept = {p: ctx.input(p) for p in self.kept}
        phase_a = _Rebuild(self.rebuild_body, self)
        rebuilt = phase_a.run(*[o.detach() if isinstance(o, torch.Tensor) else o for o in outputs],
                              *[kept[p].detach() for p in self.kept])
        for position, value in zip(self.rebuilt, rebuilt):
            ctx.input(position, value.detach())
        return _Forward(self.forward_body, self, phase_a, ctx).run(
            *[ctx.input(p) for p in range(len(self.rebuilt) + len(self.kept))])


class _Rebuild(fx.Interpreter):
    """Phase A: the rebuild body under no_grad, but recomputed sub-networks with grad from stand-ins."""

    def __init__(self, module, fused: FusedReplay):
        super().__init__(module, garbage_collect_values=False)
        self.fused = fused
        self.graph_values: dict[str, object] = {}
        self.stand_ins: dict[str, torch.Tensor] = {}

    def run_node(self, n: fx.Node):
        value = _value(n)
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
        self.graph_values[value] = result
        return result


class _Forward(fx.Interpreter):
    """Phase B: the forward body on the input leaves, grafting the rebuild's sub-network evaluations."""

    def __init__(self, module, fused: FusedReplay, rebuild: _Rebuild, ctx: ReplayContext):
        super().__init__(module, garbage_collect_values=False)
        self.fused, self.rebuild, self.ctx = fused, rebuild, ctx
        self.by_value: dict[str, object] = {}
        self.grafted: dict[str, torch.Tensor] = {}
        self.unfused: set[int] = set()
        self.done: set[int] = set()

    def run_node(self, n: fx.Node):
        value = _value(n)
        component = self.fused.component_of.get(value)
        if component is not None and id(component) not in self.unfused:
            if id(component) not in self.done and not self._graft(component):
                self.unfused.add(id(component))
            else:
                self.done.add(id(component))
                result = self.grafted.get(value)  # internal nodes are never read outside their sub-network
                self.by_value[value] = result
                return result
        result = super().run_node(n)
        if value is not None:
            self.by_value[value] = result
        return result

    def _graft(self, component: _Component) -> bool:
        if any(v not in self.by_value for v in component.external):
            return False  # an input of the sub-network is not computed yet here: run it again instead
        outputs = [self.rebuild.graph_values.get(v) for v in component.frontier]
        if any(not isinstance(o, torch.Tensor) for o in outputs):
            return False
        stand_ins = [self.rebuild.stand_ins.get(v) for v in component.external]
        attach = [self.by_value[v] for v in component.external]
        pairs = [(s, a) for s, a in zip(stand_ins, attach) if isinstance(s, torch.Tensor)]
        grafted = graft(outputs, [s for s, _ in pairs], [a for _, a in pairs], list(self.ctx.params))
        self.grafted.update(zip(component.frontier, grafted))
        return True

