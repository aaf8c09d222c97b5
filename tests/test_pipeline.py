"""The pipeline's shape (issue 16): one compilation threaded through passes that state what they require and
ensure; the traced graph left as it is once segments are found; the module written once from it."""

import sys

import pytest
import torch
from torch import nn

import invfx
from invfx.errors import PassError
from invfx.examples import Glow, RevNetMLP
from invfx.measure import measure
from invfx.modes import Mode
from invfx.passes import pipeline
from invfx.passes.infra import Compilation, graph_signature, run_passes

DT = torch.float64


def compilation(model, x, budget=None, **options) -> Compilation:
    return Compilation(model=model, inputs=(x,), modes=frozenset(Mode), budget=budget,
                       options=invfx.OptimizeOptions(**options))


def up_to(name: str) -> list:
    """The pipeline's passes up to and with the one named ``name``."""
    passes = [p() for p in pipeline.PIPELINE]
    return passes[:[p.name for p in passes].index(name) + 1]


def test_each_pass_says_what_it_needs_and_names_itself():
    model = RevNetMLP(depth=2, width=8, hidden=8).to(DT)
    state = compilation(model, torch.randn(4, 8, dtype=DT))
    with pytest.raises(PassError, match="pass 'measure_costs'.*needs the segments"):
        pipeline.MeasureCosts()(state)
    run_passes(state, up_to("find_segments"))
    with pytest.raises(PassError, match="pass 'check_reconstruction': needs the invertible regions"):
        pipeline.CheckReconstruction()(state)
    with pytest.raises(PassError, match="pass 'write_module': needs the regions"):
        pipeline.WriteModule()(state)


def test_the_traced_graph_is_left_as_it_is_once_segments_are_found():
    """Regions are built, checked and measured beside the graph; the module is written from it at the end. (Right
    after the segments are found, calls that save a recipe instead of their input are changed in place: no node
    is added, removed or moved.)"""
    torch.manual_seed(0)
    model = RevNetMLP(depth=6, width=16, hidden=32)
    x = torch.randn(8, 16)
    state = run_passes(compilation(model, x, budget=0.5), up_to("find_segments"))
    found = graph_signature(state.traced.graph)
    run_passes(state, [pipeline.RecomputeSavedInputs()])
    assert graph_signature(state.traced.graph) == found
    code = state.traced.code
    run_passes(state, [p() for p in pipeline.PIPELINE][len(up_to("recompute_saved_inputs")):])
    assert graph_signature(state.traced.graph) == found and state.traced.code == code
    assert state.optimized.graph is not state.traced.graph
    regions = ("inv_", "ckpt_", "sac_")
    assert [u.name for u in state.units] == [n.target for n in state.optimized.graph.nodes
                                             if n.op == "call_module" and n.target.startswith(regions)]


def test_a_pass_refuses_a_graph_changed_after_its_segments_were_found():
    model = RevNetMLP(depth=2, width=8, hidden=8).to(DT)
    state = run_passes(compilation(model, torch.randn(4, 8, dtype=DT)), up_to("find_segments"))
    graph = state.traced.graph
    last = next(n for n in reversed(graph.nodes) if n.op == "call_module")
    with graph.inserting_after(last):
        graph.call_function(torch.relu, (last,))  # (dead, but the segments' boundaries no longer describe it)
    with pytest.raises(PassError, match="pass 'build_regions': the traced graph changed after its segments"):
        pipeline.BuildRegions()(state)


@pytest.mark.skipif(sys.version_info < (3, 11), reason="exception notes are Python 3.11's")
def test_an_error_inside_a_pass_names_the_pass():
    class Fails(pipeline.CompilationPass):
        name = "fails"

        def call(self, state):
            raise ValueError("boom")

    with pytest.raises(ValueError, match="boom") as raised:
        Fails()(compilation(nn.Linear(2, 2), torch.randn(1, 2)))
    assert "(raised in invfx.optimize's pass 'fails')" in raised.value.__notes__


def test_checks_and_costs_are_per_segment_of_the_traced_graph():
    """What the plan reads comes from the compilation, not from attributes written on region modules."""
    torch.manual_seed(0)
    model = RevNetMLP(depth=3, width=8, hidden=8).to(DT)
    state = run_passes(compilation(model, torch.randn(4, 8, dtype=DT)), up_to("measure_costs"))
    invertible = [n for n, s in zip(state.names, state.segments) if s.mode == Mode.INVERTIBLE]
    assert invertible and set(state.regions) == set(invertible) and not state.refused
    assert set(state.reconstruction_errors) == set(invertible)
    assert all(0 <= e < 1e-12 for e in state.reconstruction_errors.values())
    assert [c.name for c in state.costs.costs] == list(state.candidates())
    assert all(not hasattr(r, "reconstruction_error") for r in state.regions.values())
    assert all(Mode.INVERTIBLE in c.modes for c in state.costs.costs if c.name in invertible)


def test_a_budgeted_plan_is_measured_as_the_module_optimize_returns():
    """Calibration measured the module before its invertible regions were merged into chains, then returned the
    chained one: on this model it measured 17,664 B against a 17,812 B budget and returned a module peaking at
    17,920 B. It now measures what it returns."""
    torch.manual_seed(0)
    model = RevNetMLP(depth=6, width=16, hidden=32)
    x = torch.randn(8, 16)
    optimized = invfx.optimize(model, x, memory_budget=0.5)
    calibration = optimized.plan.calibration
    assert measure(optimized, x, steps=1).peak_bytes == calibration["peak_bytes"] <= calibration["target_bytes"]


def test_the_written_code_reads_no_attribute_it_does_not_use():
    """A parameter read by nodes a region runs now (Glow's actnorm ``loc``) is not fetched by the parent."""
    torch.manual_seed(0)
    optimized = invfx.optimize(Glow(levels=1, depth=2, hidden=8).double(),
                               torch.randn(2, 3, 8, 8, dtype=DT), check_gradients=False)
    unused = [n for n in optimized.graph.nodes if n.op == "get_attr" and not n.users]
    assert not unused and "_loc = self." not in optimized.code.replace("self.levels", "")


def test_passes_run_alone_on_a_small_graph():
    """The pipeline's functions are usable one by one: a GraphModule in, facts out."""
    torch.manual_seed(0)
    model = RevNetMLP(depth=2, width=8, hidden=8).to(DT)
    state = run_passes(compilation(model, torch.randn(4, 8, dtype=DT), chains=False), up_to("group_regions"))
    assert all(not u.is_chain for u in state.units)
    assert [u.parts[0] for u in state.units] == [n for n in state.names if state.chosen.get(n, "keep") != "keep"]


def test_chains_are_merged_in_the_segment_list():
    torch.manual_seed(0)
    model = RevNetMLP(depth=4, width=8, hidden=8).to(DT)
    state = run_passes(compilation(model, torch.randn(4, 8, dtype=DT)), up_to("group_regions"))
    chains = [u for u in state.units if u.is_chain]
    invertible = [n for n in state.names if state.chosen.get(n) == Mode.INVERTIBLE]
    assert len(chains) == 1 and list(chains[0].parts) == invertible and len(invertible) >= 3
    assert chains[0].segment.nodes == [n for name in invertible for n in state.segment(name).nodes]
    assert chains[0].links == tuple(invertible)  # (each link's own region name: inv_blocks_1, ...)


def test_steps_that_read_parameters_functionally_are_not_chained():
    """As measured (chain._may_link): Glow's steps read actnorm's parameters by get_attr, and chaining them
    measured a higher peak than running them apart."""
    torch.manual_seed(0)
    optimized = invfx.optimize(Glow(channels=3, levels=2, depth=2, hidden=8).double(),
                               torch.randn(2, 3, 16, 16, dtype=DT), check_gradients=False)
    invertible = [r for r in optimized.plan.rows if r.mode == Mode.INVERTIBLE]
    # (the last step of the first level and the squeeze after it, next to each other, would chain)
    assert [r.name for r in invertible][1:3] == ["inv_levels_0_1", "inv_segment_3"]
    assert len(invertible) == 5 and all(r.region == r.name for r in invertible)
