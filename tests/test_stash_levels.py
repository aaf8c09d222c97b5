"""The stash levels a selective checkpoint offers the planner: the exact Pareto frontier of which calls to keep."""

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from invfx.planner import StashLevel
from invfx.stash_levels import stash_frontier

CALLS = st.lists(st.tuples(st.integers(0, 50), st.sampled_from([0.0, 0.5, 1.0, 2.0, 3.5, 8.0])), max_size=7)


def _every_subset(items):
    for k in range(1, len(items) + 1):
        for subset in itertools.combinations(items, k):
            yield sum(i.nbytes for i in subset), sum(i.seconds for i in subset)


@settings(max_examples=200, deadline=None)
@given(calls=CALLS)
def test_frontier_is_every_best_subset(calls):
    """Each level is a subset; no subset saves more within a level's bytes; for every byte budget, the best
    subset that fits saves exactly what the best level that fits saves."""
    items = [StashLevel(b, 0.0, t, (f"c{i}",)) for i, (b, t) in enumerate(calls)]
    levels, whole = stash_frontier([[item] for item in items], by_seconds=True, limit=1000)
    assert whole
    subsets = list(_every_subset(items))
    for level in levels:
        assert len(set(level.calls)) == len(level.calls)
        chosen = [i for i in items if i.calls[0] in level.calls]
        assert level.nbytes == sum(i.nbytes for i in chosen)
        assert level.seconds == pytest.approx(sum(i.seconds for i in chosen))
    for before, after in zip(levels, levels[1:]):
        assert before.nbytes < after.nbytes and before.seconds < after.seconds
    for budget in sorted({b for b, _ in subsets} | {0, 10**6}):
        best = max((t for b, t in subsets if b <= budget and t > 0), default=0.0)
        offered = max((level.seconds for level in levels if level.nbytes <= budget), default=0.0)
        assert offered == pytest.approx(best), budget


def test_thinning_keeps_the_ends_and_says_so():
    items = [[StashLevel(2 ** i, float(i + 1), 0.0, (f"c{i}",))] for i in range(6)]  # 63 distinct subsets
    levels, whole = stash_frontier(items, by_seconds=False, limit=4)
    assert not whole and len(levels) == 4
    everything, _ = stash_frontier(items, by_seconds=False, limit=1000)
    assert levels[0] == everything[0] and levels[-1] == everything[-1]


def test_alternatives_take_one_of_each_part():
    """A group's members offer their own levels: one of each, or none."""
    a = [StashLevel(4, 1.0, 0.0, ("a1",)), StashLevel(10, 3.0, 0.0, ("a1", "a2"))]
    b = [StashLevel(6, 2.0, 0.0, ("b1",))]
    levels, whole = stash_frontier([a, b], by_seconds=False, limit=10)
    assert whole
    assert [(lv.nbytes, lv.flops) for lv in levels] == [(4, 1.0), (6, 2.0), (10, 3.0), (16, 5.0)]
    assert levels[2].calls == ("a1", "a2") or levels[2].calls == ("a1", "b1")


def test_nothing_worth_keeping():
    assert stash_frontier([], by_seconds=True) == ((), True)
    assert stash_frontier([[StashLevel(8, 0.0, 0.0, ("c",))]], by_seconds=True) == ((), True)
    with pytest.raises(ValueError):
        stash_frontier([], by_seconds=True, limit=0)
