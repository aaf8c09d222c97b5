"""Several segments checkpointed as one (issue 17: lower budgets than one checkpoint per block reaches)."""

import pytest
import torch
from torch.utils.checkpoint import checkpoint_sequential

import invfx
from invfx.examples import ResNet
from invfx.measure import cpu_peak_memory, measure
from invfx.modes import Mode
from invfx.passes import pipeline
from invfx.passes.groups import coarsen, group_cost
from invfx.planner import SegmentCost


def cost(name, saved=10, stash=None, saves_input=True, saves_output=False, modes=tuple(Mode), inverse=None):
    return SegmentCost(name, 4, 4, saved, 2, 3, saves_input, saves_output, 5.0, inverse, True, frozenset(modes),
                       stash_bytes=stash, stash_flops=4.0 if stash is not None else 0.0)


def test_a_group_costs_what_its_members_hold_together():
    a, b, c = cost("a", saved=10, stash=3), cost("b", saved=20, stash=5, saves_input=False), cost("c", stash=1)
    group = group_cost([a, b, c])
    # inner boundaries a plain run saves: not a -> b (a does not save its output, b not its input), but b -> c
    # (c saves its input): 4 B
    assert group.saved_bytes == 10 + 20 + 10 + 4 and group.flops == 15.0
    assert group.stash_bytes == 9 and group.stash_flops == 12.0
    assert (group.input_bytes, group.output_bytes, group.saves_input) == (4, 4, True)
    assert Mode.INVERTIBLE not in group.modes and Mode.SELECTIVE in group.allowed_modes
    assert group_cost([a]) is a
    # a member that keeps nothing is recomputed whole inside a selective group; one that does lends its levels
    assert group_cost([a, cost("d")]).stash_levels == a.stash_levels
    assert Mode.SELECTIVE not in group_cost([cost("d"), cost("e")]).allowed_modes  # (neither keeps a call)


def test_coarsen_takes_segments_size_at_a_time_where_they_may_join():
    costs = [cost(n) for n in "abcde"]
    assert [g for g, _ in coarsen(costs, 2, lambda group, name: True)] == [("a", "b"), ("c", "d"), ("e",)]
    apart = coarsen(costs, 3, lambda group, name: name != "c")  # (c may not join what is before it)
    assert [g for g, _ in apart] == [("a", "b"), ("c", "d", "e")]


def _checkpoint_sequential_least(model, x) -> float:
    """The least peak / plain of ``checkpoint_sequential(model.blocks, k)`` over k, measured here (it moves
    with the machine: oneDNN's convolutions take other temporaries with other instruction sets)."""
    def peak(step):
        step()
        model.zero_grad(set_to_none=True)
        step()
        return cpu_peak_memory(step)[0]

    def sequential(k):
        return lambda: model.head(checkpoint_sequential(model.blocks, k, model.stem(x), use_reentrant=False)).sum() \
            .backward()

    plain = peak(lambda: model(x).sum().backward())
    return min(peak(sequential(k)) for k in range(2, len(model.blocks) + 1)) / plain


@pytest.mark.slow
def test_grouped_checkpoints_meet_budgets_one_checkpoint_per_block_cannot():
    """ResNet depth 16: a checkpoint per block keeps 16 inputs and reaches 0.39 of plain at best, measured;
    checkpointing two or three blocks as one reaches what checkpoint_sequential reaches at best (0.29 to 0.32 of
    plain, by machine)."""
    torch.manual_seed(0)
    model, x = ResNet(depth=16, channels=8), torch.randn(8, 3, 16, 16)
    # (0.3 met on the hosts before this one, where checkpoint_sequential's least was lower)
    budget = max(round(_checkpoint_sequential_least(model, x), 3) + 0.005, 0.3)
    assert budget < 0.36
    sizes = pipeline.GROUP_SIZES
    try:
        pipeline.GROUP_SIZES = (1,)
        with pytest.raises(invfx.BudgetError):
            invfx.optimize(model, x, memory_budget=budget, check_gradients=False)
    finally:
        pipeline.GROUP_SIZES = sizes
    optimized = invfx.optimize(model, x, memory_budget=budget)  # (the gradient check compares in float64)
    calibration = optimized.plan.calibration
    assert measure(optimized, x, steps=1).peak_bytes == calibration["peak_bytes"] \
        <= budget * calibration["plain_bytes"]
    groups = {r.region for r in optimized.plan.rows if r.region and r.region != r.name}
    assert groups and any(g.startswith("ckpt_") and "_to_" in g for g in groups)
    assert "only its input is kept" in str(optimized.plan)
    assert optimized.plan.gradient_check is not None
    for group in groups:  # (a checkpointed group keeps its first member's input only)
        members = [r for r in optimized.plan.rows if r.region == group]
        assert len(members) >= 2
        if members[0].mode == Mode.CHECKPOINT:
            assert all(r.kept_bytes == 0 for r in members[1:])


def test_a_member_that_keeps_no_call_of_its_own_is_reported_in_a_selective_group():
    """A selective group keeps some members' calls; a member with none of its own (no stash level) is
    recomputed whole, and its row says so (was: ValueError 'has no selective mode' from the report,
    timm's mobilenetv3 at budget 0.5)."""
    plain = cost("d")
    assert plain.held_bytes(Mode.SELECTIVE) == 0 and plain.recompute_flops(Mode.SELECTIVE) == plain.flops


def test_a_budget_takes_the_granularity_of_least_compute():
    """ResNet depth 16 at budget 0.5 (FLOPs, deterministic): one checkpoint per block fits, but checkpointing
    blocks in groups keeps fewer boundaries for the same recomputation, so the grouped plan recomputes less
    (as checkpoint_sequential, 0.493 of plain at 1.24x, beat one region per block, 1.40x); the plan takes it,
    and trains as plain does."""
    torch.manual_seed(0)
    model, x = ResNet(depth=16, channels=8).to(torch.float64), torch.randn(8, 3, 16, 16, dtype=torch.float64)
    options = invfx.OptimizeOptions(compute="flops")
    sizes = pipeline.GROUP_SIZES
    try:
        pipeline.GROUP_SIZES = (1,)
        finest = invfx.optimize(model, x, memory_budget=0.5, options=options, check_gradients=False)
    finally:
        pipeline.GROUP_SIZES = sizes
    best = invfx.optimize(model, x, memory_budget=0.5, options=options)
    assert best.plan.extra_flops < finest.plan.extra_flops
    grouped = [r for r in best.plan.rows if r.region and r.region != r.name and r.mode != Mode.KEEP]
    assert grouped, best.plan
    calibration = best.plan.calibration
    assert calibration["peak_bytes"] <= 0.5 * calibration["plain_bytes"]
    assert best.plan.gradient_check is not None
