"""invfx.planner: the memory model by hand, and plan_chain against exhaustive search of every plan."""

import dataclasses
import itertools
import re
from fractions import Fraction

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from invfx.errors import BudgetError
from invfx.planner import (
    MODES,
    SegmentCost,
    StashLevel,
    chain_extra_flops,
    chain_peak,
    exhaustive,
    plain_peak,
    plan_chain,
    timed,
)
from invfx.units import format_bytes

SETTINGS = settings(derandomize=True, deadline=None, database=None)
MAX_PLANS = 729  # the most plans a random chain may have (3**6), so exhaustive search stays fast


def segment(name, input_bytes, output_bytes, saved=0, transient=0, forward_transient=0, saves_input=False,
            saves_output=False, flops=1.0, inverse_flops=None, input_freeable=True, modes=MODES,
            invertible_bytes=None):
    return SegmentCost(name, input_bytes, output_bytes, saved, transient, forward_transient, saves_input,
                       saves_output, flops, inverse_flops, input_freeable, frozenset(modes),
                       invertible_bytes=invertible_bytes)


# A three-segment chain: boundary sizes B_0 = 10, B_1 = 20, B_2 = 40, B_3 = 10.
HAND = (
    segment("a", 10, 20, saved=30, transient=5, forward_transient=7, saves_input=True, saves_output=False,
            flops=2.0),
    segment("b", 20, 40, saved=25, transient=6, forward_transient=8, saves_input=True, saves_output=True,
            flops=3.0, inverse_flops=1.5),
    segment("c", 40, 10, saved=15, transient=60, forward_transient=3, saves_input=False, saves_output=True,
            flops=4.0, inverse_flops=0.5),
)


def test_chain_peak_by_hand_keep_invertible_checkpoint():
    modes = ("keep", "invertible", "checkpoint")
    # K = (30, 0, 0): only the kept segment a holds its saved activations.
    # kept(b_1): a keeps but does not save its output; b is invertible and its input is freeable -> freed: no.
    # kept(b_2): c checkpoints, so it needs its input b_2 (b invertible does not save it): yes, 40 B.
    end_of_forward = 10 + 10 + 30 + 40  # B_0 + B_3 + sum K + kept b_2 = 90
    forward = [10 + 20 + 30,  # a: B_0 + B_1 + saved_a (keep) = 60
               10 + 30 + 20 + 40 + 8,  # b: B_0 + K_a + B_1 + B_2 + forward_transient_b = 108
               10 + 30 + 0 + 40 + 10 + 3]  # c: B_0 + K_a + K_b + B_2 + B_3 + forward_transient_c = 93
    backward = [10 + 20 + 20 + 30 + 5,  # a: B_0 + b_1 (rebuilt by b's inverse) + grad B_1 + saved_a + transient_a
                10 + 30 + 20 + 40 + 40 + 25 + 6,  # b: B_0 + K_a + b_1 (own inverse) + b_2 (kept) + grad B_2 + saved
                # c: B_0 + K_a + b_2 (kept) + b_3 (output) + grad B_3 + saved + tr + b_3 recomputed beside the kept
                10 + 30 + 40 + 10 + 10 + 15 + 60 + 10]
    assert backward == [85, 171, 185]
    assert chain_peak(HAND, modes) == max([end_of_forward] + forward + backward) == 185
    assert chain_extra_flops(HAND, modes) == (3.0 + 1.5) + 4.0


def test_chain_peak_by_hand_with_a_selective_checkpoint():
    """Selective: holds its stash (K = stash_bytes) and its input, recomputes all but its kept ops."""
    costs = (dataclasses.replace(HAND[0], stash_bytes=12, stash_flops=1.5), *HAND[1:])
    modes = ("selective", "keep", "checkpoint")
    # K = (12, 25, 0). kept(b_1): b keeps and saves its input: yes. kept(b_2): b saves its output: yes.
    end_of_forward = 10 + 10 + 37 + 20 + 40  # 117
    forward = [10 + 20 + 7 + 12,  # a: B_0 + B_1 + forward_transient_a + its stash = 49
               10 + 12 + 20 + 40 + 25,  # b: B_0 + K_a + B_1 + B_2 + saved_b = 107
               10 + 12 + 25 + 20 + 40 + 10 + 3]  # c: B_0 + K_a + K_b + b_1 (kept) + B_2 + B_3 + ft_c = 120
    # a: B_0 + b_1 (kept) + grad B_1 + saved_a (recomputed) + transient_a + b_1 recomputed = 105
    backward = [10 + 20 + 20 + 30 + 5 + 20,
                10 + 12 + 20 + 40 + 40 + 25 + 6,  # b: 153
                10 + 12 + 25 + 20 + 40 + 10 + 10 + 15 + 60 + 10]  # c: 212, with b_3 recomputed
    assert chain_peak(costs, modes) == max([end_of_forward] + forward + backward) == 212
    assert chain_extra_flops(costs, modes) == (2.0 - 1.5) + 4.0
    assert "selective" in costs[0].allowed_modes and "selective" not in HAND[0].allowed_modes


def test_chain_peak_by_hand_all_keep():
    modes = ("keep",) * 3
    # K = (30, 25, 15). kept(b_1): b keeps and saves its input: yes. kept(b_2): b saves its output: yes.
    end_of_forward = 10 + 10 + 70 + 20 + 40  # 150
    forward = [10 + 20 + 30, 10 + 30 + 20 + 40 + 25, 10 + 55 + 20 + 40 + 10 + 15]  # 60, 125, 150
    backward = [10 + 20 + 20 + 30 + 5,  # a: b_1 kept = 85
                10 + 30 + 20 + 40 + 40 + 25 + 6,  # b: b_1 and b_2 kept = 171
                10 + 55 + 20 + 40 + 10 + 10 + 15 + 60]  # c: K_a + K_b, kept b_1, b_2, output, grad = 220
    assert chain_peak(HAND, modes) == max([end_of_forward] + forward + backward) == 220
    assert plain_peak(HAND) == 220
    assert chain_extra_flops(HAND, modes) == 0.0


def test_chain_peak_invertible_pair_frees_the_boundary_between_them():
    modes = ("keep", "invertible", "invertible")
    # kept(b_1): freed by b (invertible, freeable input). kept(b_2): b is invertible so it would keep its output,
    # but c is invertible with a freeable input and rebuilds it: no. K = (30, 0, 0).
    end_of_forward = 10 + 10 + 30  # 50
    forward = [10 + 20 + 30, 10 + 30 + 20 + 40 + 8, 10 + 30 + 40 + 10 + 3]  # 60, 108, 93
    backward = [10 + 20 + 20 + 30 + 5,  # a: b_1 rebuilt by b = 85
                10 + 30 + 20 + 40 + 40 + 25 + 6,  # b: b_1 by its own inverse, b_2 rebuilt by c = 171
                10 + 30 + 40 + 10 + 10 + 15 + 60]  # c: b_2 by its own inverse = 175
    assert chain_peak(HAND, modes) == max([end_of_forward] + forward + backward) == 175


def test_chain_peak_by_hand_with_invertible_bytes():
    """``invertible_bytes`` replaces ``saved_bytes`` in an invertible segment's backward (a fused backward
    recomputes one sub-network at a time); nothing else changes."""
    lighter = (HAND[0], dataclasses.replace(HAND[1], invertible_bytes=5),
               dataclasses.replace(HAND[2], invertible_bytes=0))
    modes = ("keep", "invertible", "invertible")
    # As in the invertible pair above, with b's backward holding 5 B instead of 25 and c's 0 instead of 15.
    backward = [10 + 20 + 20 + 30 + 5,  # 85, a is kept: unchanged
                10 + 30 + 20 + 40 + 40 + 5 + 6,  # 151
                10 + 30 + 40 + 10 + 10 + 0 + 60]  # 160
    assert chain_peak(lighter, modes) == max([50, 60, 108, 93] + backward) == 160
    # Kept or checkpointed, they still hold saved_bytes.
    assert chain_peak(lighter, ("keep",) * 3) == chain_peak(HAND, ("keep",) * 3) == 220


def test_plan_of_the_hand_chain_is_the_exhaustive_one():
    assert plan_chain(HAND) == exhaustive(HAND)
    least = plan_chain(HAND).peak
    for budget in range(least, 230, 7):
        assert plan_chain(HAND, budget) == exhaustive(HAND, budget)


# --- random chains against every plan -------------------------------------------------------------------------

FLOPS = st.sampled_from([0.0, 0.1, 0.25, 1.0, 1.5, 2.0, 3.0, 0.3, 7.0])


@st.composite
def chains(draw, max_segments=12):
    n = draw(st.integers(1, max_segments))
    sizes = draw(st.lists(st.integers(0, 40), min_size=n + 1, max_size=n + 1))
    costs, plans = [], 1
    for i in range(n):
        inverse = draw(st.none() | FLOPS)
        stash = draw(st.none() | st.integers(0, 40))
        # selective chosen per call: up to three stash levels (kept calls) to choose from
        levels = draw(st.lists(st.builds(StashLevel, st.integers(0, 40), FLOPS), max_size=3)) if stash is not None \
            else []
        modes = draw(st.sets(st.sampled_from(MODES), min_size=1))
        allowed = [m for m in MODES if m in modes and (m != "invertible" or inverse is not None)
                   and (m != "selective" or stash is not None)]
        allowed += ["selective"] * (max(len(levels), 1) - 1) if "selective" in allowed else []
        if not allowed:
            modes = {"keep"}  # a segment that allows no mode is tested on its own
            allowed = ["keep"]
        if plans * len(allowed) > MAX_PLANS:
            modes = {allowed[0]}
            allowed = allowed[:1]
            levels = levels[:1]
        plans *= len(allowed)
        costs.append(SegmentCost(
            name=f"s{i}", input_bytes=sizes[i], output_bytes=sizes[i + 1],
            saved_bytes=draw(st.integers(0, 60)), transient_bytes=draw(st.integers(0, 30)),
            forward_transient_bytes=draw(st.integers(0, 30)), saves_input=draw(st.booleans()),
            saves_output=draw(st.booleans()), flops=draw(FLOPS), inverse_flops=inverse,
            input_freeable=draw(st.booleans()) if i else False, modes=frozenset(modes),
            invertible_bytes=draw(st.none() | st.integers(0, 60)), stash_bytes=stash, stash_flops=draw(FLOPS),
            stash_levels=tuple(levels), mask_bytes=draw(st.sampled_from([0, 0, 1, 5]))))
    return tuple(costs)


def every_plan(costs):
    """(peak, exact extra compute, option order, modes, stash levels) of every allowed plan, by the definitions
    alone. A segment's options are its modes in tie-break order, selective once per stash level (by bytes)."""
    plans = []
    options = [[(m, None) for m in cost.allowed_modes if m != "selective"]
               + [("selective", k) for k in range(len(cost.stash_levels)) if "selective" in cost.allowed_modes]
               for cost in costs]
    for choice in itertools.product(*(range(len(o)) for o in options)):
        picked = [o[k] for o, k in zip(options, choice)]
        modes, levels = tuple(m for m, _ in picked), tuple(k for _, k in picked)
        compute = sum(_compute(c, m, k) for c, (m, k) in zip(costs, picked))
        plans.append((chain_peak(costs, modes, levels), compute, choice, modes, levels))
    return plans


def _compute(cost, mode, level=None) -> Fraction:
    """A segment's extra compute in ``mode``, by the definition (selective: its forward less what its kept ops
    took at that stash level, as a float)."""
    if mode == "keep":
        return Fraction(0)
    if mode == "selective":
        return Fraction(max(cost.flops - cost.stash_levels[level].flops, 0.0))
    return Fraction(cost.flops) + (Fraction(cost.inverse_flops) if mode == "invertible" else 0)


def best(plans, budget):
    """The plan the planner must return: least (peak, compute, order) without a budget, else least (compute,
    peak, order) among those that fit; None if none fits."""
    if budget is None:
        return min(plans, key=lambda plan: plan[:3])
    fitting = [plan for plan in plans if plan[0] <= budget]
    return min(fitting, key=lambda plan: (plan[1], plan[0], plan[2])) if fitting else None


def assert_is(plan, expected, costs):
    peak, compute, _, modes, levels = expected
    assert plan.modes == modes
    assert plan.levels == levels
    assert plan.peak == peak == chain_peak(costs, plan.modes, plan.levels)
    assert plan.extra_flops == float(compute) == chain_extra_flops(costs, plan.modes, plan.levels)
    assert plan.plain_peak == plain_peak(costs)
    assert plan.exact
    for cost, mode in zip(costs, plan.modes):
        assert mode in cost.allowed_modes


@settings(SETTINGS, max_examples=300)
@given(costs=chains(), data=st.data())
def test_plan_chain_equals_exhaustive_search(costs, data):
    plans = every_plan(costs)
    least = min(plan[0] for plan in plans)
    most = max(plan[0] for plan in plans)

    expected = best(plans, None)
    assert expected[0] == least
    assert_is(plan_chain(costs), expected, costs)
    assert_is(exhaustive(costs), expected, costs)

    budgets = data.draw(st.lists(st.integers(max(0, least - 3), most + 3), min_size=1, max_size=4))
    for budget in budgets + [least, most, plain_peak(costs)]:
        expected = best(plans, budget)
        if expected is None:
            stated = rf"least achievable peak is {re.escape(format_bytes(least, exact=True))},"
            with pytest.raises(BudgetError, match=stated):
                plan_chain(costs, budget)
            with pytest.raises(BudgetError, match=stated):
                exhaustive(costs, budget)
        else:
            assert_is(plan_chain(costs, budget), expected, costs)
    if best(plans, budgets[0]) is not None:
        assert_is(exhaustive(costs, budgets[0]), best(plans, budgets[0]), costs)


@SETTINGS
@given(costs=chains(max_segments=8), data=st.data())
def test_more_budget_never_costs_more_compute(costs, data):
    least = plan_chain(costs).peak
    top = max(plain_peak(costs), least)
    budgets = sorted(data.draw(st.lists(st.integers(least, top + 5), min_size=2, max_size=5)))
    plans = [plan_chain(costs, budget) for budget in budgets]
    for budget, plan in zip(budgets, plans):
        assert least <= plan.peak <= budget
    for smaller, larger in zip(plans, plans[1:]):
        assert larger.extra_flops <= smaller.extra_flops
    # With no budget: the least peak, and no plan within that peak computes less.
    assert plan_chain(costs, least).extra_flops == plan_chain(costs).extra_flops


@settings(SETTINGS, max_examples=300)
@given(costs=chains(max_segments=9), limit=st.integers(1, 64), data=st.data())
def test_thinned_frontiers_still_fit_the_budget(costs, limit, data):
    """With tiny frontiers the plan may lose compute, never the budget: it fits whenever some plan does, and a
    plan that says exact is optimal."""
    plans = every_plan(costs)
    least = min(plan[0] for plan in plans)
    budget = data.draw(st.integers(least, max(plan[0] for plan in plans)))
    expected = best(plans, budget)
    plan = plan_chain(costs, budget, frontier_limit=limit)
    assert plan.peak == chain_peak(costs, plan.modes, plan.levels) <= budget
    assert all(mode in cost.allowed_modes for cost, mode in zip(costs, plan.modes))
    assert plan.extra_flops >= float(expected[1])
    if plan.exact:
        assert (plan.modes, plan.levels) == expected[3:]
    assert plan_chain(costs, frontier_limit=limit).peak == least


@settings(SETTINGS, max_examples=200)
@given(costs=chains(max_segments=8), limit=st.sampled_from([2, 2048]), data=st.data())
def test_a_compute_bound_gives_the_same_plan_or_none(costs, limit, data):
    """compute_bound (pipeline: the best plan of another granularity) only prunes: the plan is the unbounded
    one where that one computes at most the bound, else None; with tiny frontiers too."""
    plans = every_plan(costs)
    least = min(plan[0] for plan in plans)
    budget = data.draw(st.integers(least, max(plan[0] for plan in plans)))
    expected = best(plans, budget)
    optimum = float(expected[1])
    for bound in (optimum, optimum + 0.5, max(optimum - 0.5, 0.0), data.draw(st.floats(0, 2 * optimum + 1))):
        plan = plan_chain(costs, budget, frontier_limit=limit, compute_bound=bound)
        if optimum > bound:
            assert plan is None
        elif limit == 2048:
            assert_is(plan, expected, costs)
        else:  # (thinned: some plan within the bound and the budget, or None)
            assert plan is None or (plan.peak <= budget and plan.extra_flops <= bound)
    with pytest.raises(ValueError, match="compute_bound"):
        plan_chain(costs, budget, compute_bound=-1.0)


# --- particular chains ----------------------------------------------------------------------------------------

def test_budget_error_states_the_least_peak_in_bytes():
    least = plan_chain(HAND).peak
    with pytest.raises(BudgetError) as error:
        plan_chain(HAND, least - 1)
    message = str(error.value)
    assert f"least achievable peak is {format_bytes(least, exact=True)}" in message
    assert f"memory budget {format_bytes(least - 1, exact=True)}" in message
    assert format_bytes(123) == "123 B" and format_bytes(8192, exact=True) == "8.0 KiB (8192 B)"


def test_one_segment():
    alone = (segment("only", 100, 50, saved=300, transient=20, forward_transient=10, flops=5.0,
                     inverse_flops=2.0),)
    plans = every_plan(alone)
    assert len(plans) == 3
    assert_is(plan_chain(alone), best(plans, None), alone)
    # Its backward holds B_0, B_1, the gradient of B_1, the saved activations (kept or recomputed) and the
    # working memory in every mode: 100 + 50 + 50 + 300 + 20 = 520 is the least peak, and keep reaches it.
    assert plan_chain(alone).peak == 520
    assert plan_chain(alone).modes == ("keep",)
    for budget in (520, 1000):
        assert_is(plan_chain(alone, budget), best(plans, budget), alone)
    with pytest.raises(BudgetError):
        plan_chain(alone, 519)


def test_segment_without_keep_is_never_kept():
    costs = list(HAND)
    costs[0] = segment("a", 10, 20, saved=0, transient=5, forward_transient=7, flops=2.0,
                       modes=("checkpoint", "invertible"))  # no inverse: checkpoint only
    costs = tuple(costs)
    for budget in (None, 10 ** 6):
        plan = plan_chain(costs, budget)
        assert plan.modes[0] == "checkpoint"
        assert plan == exhaustive(costs, budget)
    # plain_peak is the all-keep reference even where keep is not allowed.
    assert plan_chain(costs).plain_peak == chain_peak(costs, ("keep",) * 3)


def test_nothing_invertible():
    costs = tuple(segment(f"s{i}", 16, 16, saved=64, transient=32, forward_transient=16, saves_input=True,
                          saves_output=True, flops=float(i + 1)) for i in range(8))
    for budget in (None, plain_peak(costs) - 100, plain_peak(costs)):
        plan = plan_chain(costs, budget)
        assert "invertible" not in plan.modes
        assert plan == exhaustive(costs, budget)
    assert plan_chain(costs, plain_peak(costs)).modes == ("keep",) * 8  # no compute when all-keep fits


def test_invertible_allowed_but_no_inverse_is_not_used():
    costs = (segment("x", 8, 8, saved=100, flops=1.0, inverse_flops=None, modes=("invertible", "checkpoint")),
             segment("y", 8, 8, saved=100, flops=1.0, inverse_flops=1.0))
    assert plan_chain(costs).modes[0] == "checkpoint"


def test_segment_that_allows_no_mode():
    costs = (segment("x", 8, 8, inverse_flops=None, modes=("invertible",)),)
    with pytest.raises(ValueError, match="allows no mode"):
        plan_chain(costs)
    with pytest.raises(ValueError, match="allows no mode"):
        exhaustive(costs)


def test_bad_chains_are_refused():
    with pytest.raises(ValueError, match="at least one segment"):
        plan_chain([])
    with pytest.raises(ValueError, match="a boundary has one size"):
        plan_chain((segment("x", 8, 8), segment("y", 9, 8)))
    with pytest.raises(ValueError, match="unknown modes"):
        segment("x", 8, 8, modes=("keep", "offload"))
    with pytest.raises(ValueError, match="negative"):
        segment("x", -1, 8)
    with pytest.raises(ValueError, match="at most 14"):
        exhaustive([segment(f"s{i}", 8, 8) for i in range(15)])
    with pytest.raises(TypeError):
        plan_chain(HAND, 1.5)


def test_a_deep_chain_is_exact_and_monotone():
    """60 ResNet-like blocks in three sizes (identical within a size): planned exactly, and more budget never
    costs more compute."""
    costs, size = [], 64
    for i in range(60):
        out = 64 if i < 20 else 32 if i < 40 else 16
        costs.append(segment(f"b{i}", size, out, saved=3 * out, transient=2 * out, forward_transient=out,
                             saves_input=True, saves_output=True, flops=float(out * out),
                             inverse_flops=None if out != size else float(out * out), input_freeable=i > 0))
        size = out
    least = plan_chain(costs)
    assert least.exact
    plain = plain_peak(costs)
    previous = None
    for fraction in (0.0, 0.1, 0.3, 0.6, 1.0):
        budget = least.peak + int(fraction * (plain - least.peak))
        plan = plan_chain(costs, budget)
        assert plan.exact and plan.peak <= budget
        if previous is not None:
            assert plan.extra_flops <= previous.extra_flops
        previous = plan
    assert previous.modes == ("keep",) * 60


# --- planning by measured time ------------------------------------------------------------------------------

SECONDS = st.sampled_from([0.0, 0.5, 1.0, 2.0, 3.0, 0.125, 5.0])


def _seconds(cost, mode, level=None) -> Fraction:
    """A segment's extra time in ``mode`` (selective: at stash ``level``), by the definition (an inverse at the
    segment's own FLOP rate)."""
    # (saved inputs rebuilt in backward take rebuild_seconds in every mode but invertible)
    if mode == "keep":
        return Fraction(cost.rebuild_seconds)
    # (a checkpoint's recorded dropout masks save its recomputation replay_seconds)
    if mode == "selective":
        return Fraction(max(cost.seconds - cost.stash_levels[level].seconds - cost.replay_seconds, 0.0)
                        + cost.rebuild_seconds)
    if mode == "checkpoint":
        return Fraction(max(cost.seconds - cost.replay_seconds, 0.0) + cost.rebuild_seconds)
    rate = cost.seconds / cost.flops if cost.flops else 0.0
    return Fraction(cost.seconds) + Fraction((cost.inverse_flops or 0.0) * rate)  # (each rounded once, as stated)


@settings(SETTINGS, max_examples=150)
@given(costs=chains(max_segments=8), data=st.data())
def test_timed_plans_are_the_least_time_plans(costs, data):
    costs = tuple(dataclasses.replace(
        c, seconds=data.draw(SECONDS), replay_seconds=data.draw(SECONDS), rebuild_seconds=data.draw(SECONDS),
        stash_levels=tuple(
            dataclasses.replace(level, seconds=data.draw(SECONDS)) for level in c.stash_levels)) for c in costs)
    assert timed(costs)
    plans = [(peak, sum(_seconds(c, m, k) for c, m, k in zip(costs, modes, levels)), order, modes, levels)
             for peak, _, order, modes, levels in every_plan(costs)]
    least, most = min(p[0] for p in plans), max(p[0] for p in plans)
    for budget in (None, data.draw(st.integers(least, most))):
        plan = plan_chain(costs, budget)
        expected = best(plans, budget)
        got = (plan.peak, sum(_seconds(c, m, k) for c, m, k in zip(costs, plan.modes, plan.levels)), plan.modes,
               plan.levels)
        assert got == (expected[0], expected[1], expected[3], expected[4]), (budget, got, expected)
        assert plan.extra_seconds == pytest.approx(float(got[1]))


def test_time_decides_where_flops_mislead():
    """A selective checkpoint recomputes few FLOPs (normalisation, activations) but, on a CPU, much of the time;
    a full checkpoint saves more per second. Timed, the planner takes one checkpoint; by FLOPs, two selectives."""
    def segment(name, **timing):
        return SegmentCost(name=name, input_bytes=10, output_bytes=10, saved_bytes=30, transient_bytes=0,
                           forward_transient_bytes=0, saves_input=True, saves_output=True, flops=100.0,
                           stash_bytes=10, stash_flops=99.0, **timing)

    by_flops = tuple(segment(name) for name in "abc")
    by_time = tuple(segment(name, seconds=1.0, stash_seconds=0.2) for name in "abc")
    budget = 110
    assert chain_peak(by_flops, ("keep", "checkpoint", "keep")) <= budget
    assert chain_peak(by_flops, ("selective", "selective", "keep")) <= budget
    assert plan_chain(by_flops, budget).modes == ("selective", "selective", "keep")  # 2 FLOPs against 100
    timed_plan = plan_chain(by_time, budget)
    assert timed_plan.modes == ("keep", "checkpoint", "keep")  # 1 s against 1.6
    assert timed_plan.extra_seconds == 1.0 and timed_plan.extra_flops == 100.0
    assert not timed(by_time[:1] + by_flops[1:])  # one unmeasured segment: FLOPs for the whole chain


def test_without_rebuild_keeps_the_inputs_for_their_time():
    cost = SegmentCost(name="a", input_bytes=10, output_bytes=10, saved_bytes=30, transient_bytes=0,
                       forward_transient_bytes=0, saves_input=True, saves_output=False, flops=1.0,
                       inverse_flops=None, input_freeable=False, modes=frozenset({"keep", "checkpoint"}),
                       seconds=2.0, rebuilt_bytes=12, rebuild_seconds=0.5)
    plain = cost.without_rebuild()
    assert (plain.saved_bytes, plain.rebuilt_bytes, plain.rebuild_seconds) == (42, 0, 0.0)
    assert (cost.recompute_seconds("keep"), plain.recompute_seconds("keep")) == (0.5, 0.0)
    assert (cost.recompute_seconds("checkpoint"), plain.recompute_seconds("checkpoint")) == (2.5, 2.0)
    assert plain.without_rebuild() is plain
