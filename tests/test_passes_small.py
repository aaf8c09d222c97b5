"""The passes on tiny graphs, one at a time (issue 16): segment finding, the solver and the fused backward's
schedule, each checked against what the graph says it must do."""

import pytest
import torch
import torch.fx as fx
from torch import nn

import invfx
from invfx.passes import annotate, find_segments, solve, trace
from invfx.passes.rewrite import build_invertible_region

W = 4


def traced(model, *inputs):
    module, _, _ = trace(model, num_inputs=len(inputs))
    annotate(module, inputs)
    return module


def by_name(module: fx.GraphModule) -> dict[str, fx.Node]:
    return {n.name: n for n in module.graph.nodes}


class Coupling(nn.Module):
    """stem, ``y1 = x1 + F(x2); y2 = x2 + G(y1)``, cat, head."""

    def __init__(self, log_det_first=False):
        super().__init__()
        self.stem, self.head = nn.Linear(2 * W, 2 * W), nn.Linear(2 * W, 2)
        self.f = nn.Sequential(nn.Linear(W, W), nn.Tanh())
        self.g = nn.Sequential(nn.Linear(W, W), nn.Tanh())
        self.log_det_first = log_det_first

    def forward(self, x):
        h = self.stem(x)
        x1, x2 = h.chunk(2, dim=1)
        y1 = x1 + self.f(x2)
        s = self.g(y1)
        if self.log_det_first:
            j = s.sum(dim=1)  # read from inside G before G's last use
        y2 = x2 * torch.exp(s)
        if not self.log_det_first:
            j = s.sum(dim=1)
        return self.head(torch.cat([y1, y2], dim=1)), j


def test_find_segments_makes_the_coupling_one_invertible_segment():
    module = traced(Coupling(), torch.randn(3, 2 * W))
    segments = find_segments(module, ("keep", "invertible"))
    invertible = [s for s in segments if s.mode == "invertible"]
    segment = invertible[0]
    names = [n.name for n in segment.nodes]
    assert names[:3] == ["chunk", "getitem", "getitem_1"] and "mul" in names  # the halving to both halves made
    assert [n.name for n in segment.freeable] == ["stem"]  # the block's input, rebuilt, never kept
    assert not segment.kept
    rules = {s.rule.name for s in segment.rebuild.steps if s.rule is not None}
    assert "add_solve_input" in rules
    # the cat after the block (ops outside any module) joins it, where one value is live instead of the two halves;
    # the segment undoes it with cat_inverse
    assert names[-1] == "cat" and "cat_inverse" in rules and [n.name for n in segment.outputs] == ["sum_1", "cat"]
    # every compute node belongs to exactly one segment, in graph order
    compute = [n for n in module.graph.nodes if n.op in ("call_function", "call_method", "call_module")]
    assert [n for s in segments for n in s.nodes] == compute


def test_a_value_read_after_the_segment_is_kept_never_freed():
    class Residual(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem, self.f = nn.Linear(W, W), nn.Linear(W, W)

        def forward(self, x):
            h = self.stem(x)
            return h + self.f(h * 2.0), h.sum()  # h read after everything that could rebuild it

    module = traced(Residual(), torch.randn(3, W))
    for segment in find_segments(module, ("keep", "invertible")):
        assert "stem" not in [n.name for n in segment.freeable]


def test_a_grad_mode_switch_is_a_segment_of_its_own():
    class Frozen(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(W, W), nn.Linear(W, W)

        def forward(self, x):
            h = self.a(x) * 2.0
            with torch.no_grad():
                h = self.b(h) + 1.0
            return h * 3.0

    module = traced(Frozen(), torch.randn(3, W))
    segments = find_segments(module, ("keep", "invertible"))
    switches = [s for s in segments if any("grad_mode" in str(n.target) for n in s.nodes)]
    assert len(switches) == 2 and all(len(s.nodes) == 1 for s in switches)
    assert all(invfx.passes.segments.why_not_checkpoint(module, s) is not None for s in switches)


def test_solve_undoes_the_coupling_from_its_outputs():
    module = traced(Coupling(), torch.randn(3, 2 * W))
    nodes = by_name(module)
    segment = [nodes[k] for k in ("chunk", "getitem", "getitem_1", "f_0", "f_1", "add", "g_0", "g_1", "exp",
                                  "mul", "cat")]
    rebuild = solve(module, segment, [nodes["stem"]], [nodes["cat"], nodes["g_1"]])
    assert not isinstance(rebuild, str), rebuild
    kinds = [(s.kind, s.node.name) for s in rebuild.steps]
    # the cat undone first, then F recomputed on the rebuilt x2 to take it off y1, then the chunk undone
    assert kinds[0] == ("invert", "cat")
    assert ("recompute", "f_0") in kinds and ("invert", "add") in kinds
    assert kinds.index(("recompute", "f_1")) < kinds.index(("invert", "add"))
    assert {n.name for n in rebuild.recomputed} >= {"f_0", "f_1"}


def test_solve_says_why_when_nothing_rebuilds_the_input():
    class Sums(nn.Module):
        def forward(self, x):
            h = x * 2.0
            return h.sum(dim=1)

    module = traced(Sums(), torch.randn(3, W))
    nodes = by_name(module)
    reason = solve(module, [nodes["sum_1"]], [nodes["mul"]], [nodes["sum_1"]])
    assert isinstance(reason, str) and reason


@pytest.mark.parametrize("log_det_first", [False, True])
def test_the_fused_schedule_differentiates_each_subnetwork_after_all_its_readers(log_det_first):
    """G is rebuilt and differentiated before F is rebuilt (revlib's order); the log-det's sum, which reads G's
    output, sends its gradient before G's sub-network is differentiated, wherever it stands in the forward."""
    torch.manual_seed(0)
    model = Coupling(log_det_first).double()
    x = torch.randn(3, 2 * W, dtype=torch.float64)
    module = traced(model, x)
    segment = next(s for s in find_segments(module, ("keep", "invertible")) if s.mode == "invertible")
    region = build_invertible_region(module, segment, "inv_block")
    schedule = [(kind, _values(kind, payload)) for kind, payload in region.fused_replay.schedule]
    g_at = next(i for i, (kind, values) in enumerate(schedule) if kind == "component" and "g_0" in values)
    f_at = next(i for i, (kind, values) in enumerate(schedule) if kind == "component" and "f_0" in values)
    f_rebuilt = next(i for i, (kind, values) in enumerate(schedule)
                     if kind in ("rebuild", "subnetwork") and "f_1" in values)
    sum_at = next(i for i, (kind, values) in enumerate(schedule) if kind == "node" and "sum_1" in values)
    assert sum_at < g_at < f_rebuilt < f_at  # (one sub-network's graph alive at a time)


def _values(kind, payload) -> set:
    """The forward values a schedule step makes or differentiates."""
    if kind == "component":
        return set(payload.values)
    if kind == "subnetwork":
        return {value for _, value, *_ in payload.outputs}
    if kind == "node":
        return {payload[0].value}
    if kind in ("rebuild", "verify", "getitem"):
        return {payload.value}
    return set()  # drop, restore


def test_modes_are_an_enum_that_reads_as_the_words_users_pass():
    import json

    from invfx.modes import Mode

    assert Mode.KEEP == "keep" and f"{Mode.INVERTIBLE}" == "invertible" and str(Mode.CHECKPOINT) == "checkpoint"
    torch.manual_seed(0)
    model = Coupling().double()
    x = torch.randn(3, 2 * W, dtype=torch.float64)
    optimized = invfx.optimize(model, x, modes=("keep", "invertible"))
    modes = {row["mode"] for row in optimized.plan.rows}
    assert modes <= set(Mode) and Mode.INVERTIBLE in modes
    dumped = json.loads(json.dumps(optimized.plan.to_dict(), default=str))
    assert dumped["segments"][0]["mode"] in {"keep", "invertible"}
    assert "| invertible |" in str(optimized.plan).replace("  ", " ").replace("  ", " ")


def test_options_are_checked_and_reach_the_passes():
    with pytest.raises(invfx.InvfxError, match="max_segment_nodes must be a positive whole number"):
        invfx.OptimizeOptions(max_segment_nodes=0)
    with pytest.raises(invfx.InvfxError, match="options must be an invfx.OptimizeOptions"):
        invfx.optimize(Coupling(), torch.randn(3, 2 * W), options={"chains": False})
    torch.manual_seed(0)
    model = Coupling().double()
    x = torch.randn(3, 2 * W, dtype=torch.float64)
    # a segment of at most 3 nodes cannot hold the coupling: nothing is invertible
    tight = invfx.optimize(model, x, options=invfx.OptimizeOptions(max_segment_nodes=3))
    assert all(r["mode"] != "invertible" or r["nodes"] <= 3 for r in tight.plan.rows)
