"""Choose keep / checkpoint / invertible / selective for each segment of a chain, exactly, under a memory model.

A chain is a sequence of segments ``s_1 .. s_n``; segment ``i`` reads boundary value ``b_{i-1}`` and produces
``b_i`` (``b_0`` is the caller's input, ``b_n`` the chain's output). Each segment runs in one of four modes:

* ``"keep"``: plain autograd; the segment's ops keep what they save for backward (``saved_bytes``, and its
  input and/or output when ``saves_input`` / ``saves_output``);
* ``"checkpoint"``: the forward keeps nothing but the segment's input; backward recomputes the forward from it
  (extra compute: ``flops``);
* ``"invertible"``: the forward keeps nothing; backward rebuilds the segment's input from its output with the
  inverse, then recomputes (extra compute: ``flops + inverse_flops``). Only for a segment with an inverse;
* ``"selective"``: a checkpoint that also keeps the outputs of some of its expensive calls, so backward
  recomputes only the rest. Which calls is chosen too: the segment offers ``stash_levels`` (each a
  :class:`StashLevel`: bytes kept, compute skipped; :mod:`invfx.stash_levels` makes them, the Pareto frontier of
  its calls), and the plan picks one (extra compute: ``flops - level.flops``). Only for a segment with levels.

A segment's *options* are its allowed modes with selective once per stash level (``SegmentCost.options``); a plan
picks one option per segment, so choosing the calls is part of the same exact optimisation. Below, ``stash_bytes``
means the chosen level's bytes.

:func:`plan_chain` returns the modes of least peak memory (``budget=None``), or of least extra compute whose
peak fits ``budget`` bytes. The answer is optimal under the model below, which :func:`chain_peak` *defines*;
:func:`exhaustive` tries every plan and is the reference the tests hold :func:`plan_chain` to.

The memory model
----------------
Sizes: ``B_0 = costs[0].input_bytes`` and ``B_i = costs[i-1].output_bytes``; ``m_i`` is segment ``i``'s mode.

* ``K_i = saved_bytes_i`` if ``m_i`` is keep, ``stash_bytes_i + mask_bytes_i`` if selective, ``branch_bytes_i``
  if invertible (what its sub-networks' branches take, recorded so that their recomputation on rebuilt inputs
  takes the forward's), ``mask_bytes_i`` if checkpoint (its dropouts' masks, 1 bit per element, so that the
  recomputation need not draw them again): what the segment holds from forward to backward besides boundary
  values.
* For ``1 <= i <= n-1``, boundary ``b_i`` is kept from forward to backward iff it is *needed* and not *freed*:

  - ``self_saves = m_i == keep and saves_output_i``;
  - ``freed = m_{i+1} == invertible and input_freeable_{i+1} and not self_saves`` (the next segment rebuilds
    its input with its inverse, so nothing has to keep it);
  - ``needed = m_{i+1} in (checkpoint, selective) or (m_{i+1} == keep and saves_input_{i+1})
    or (m_{i+1} == invertible and not input_freeable_{i+1}) or self_saves or m_i == invertible``
    (an invertible segment keeps its own output, which its inverse starts from, unless the next one frees it).

  ``b_0`` and ``b_n`` are always kept. Write ``kept_j`` for ``kept(b_j) * B_j``.
* ``A_i = B_0 + sum_{j<i} K_j + sum_{1<=j<=i-2} kept_j``: what earlier segments hold while segment ``i`` runs,
  forward or backward, not counting ``b_{i-1}``.
* Peak = the largest of

  - the end of forward: ``F = B_0 + B_n + sum_i K_i + sum_{1<=j<=n-1} kept_j``;
  - segment ``i``'s forward: ``A_i + [i>=2] B_{i-1} + B_i + (saved_bytes_i if m_i == keep, else
    forward_transient_bytes_i, plus stash_bytes_i if selective)``;
  - segment ``i``'s backward: ``A_i + [i>=2 and (kept(b_{i-1}) or m_i == invertible)] B_{i-1}
    + [i == n or kept(b_i) or m_{i+1} == invertible] B_i + B_i + W_i`` with ``W_i = saved_bytes_i +
    transient_bytes_i``, or ``invertible_bytes_i + transient_bytes_i`` when invertible and that is given, plus
    ``B_i`` when checkpoint or selective (``b_{i-1}`` is there if kept or rebuilt by this segment's inverse; the
    value ``b_i`` if kept, the chain's output, or rebuilt by the next segment's inverse; then the gradient of
    ``b_i``, the recomputed or kept activations and the backward's working memory; a recomputation's own output
    is alive while it is differentiated, beside the forward's). ``b_0`` is inside ``A_i`` and is never counted
    twice.

Extra compute of a plan: ``flops_i`` per checkpointed segment, ``flops_i + inverse_flops_i`` per invertible one,
``max(flops_i - stash_flops_i, 0)`` per selective one (its chosen level's FLOPs). Where every segment of the
chain has a measured time (``seconds``), the plan minimizes extra *time* instead, by the same formulas in seconds
(``seconds_i``, ``stash_seconds_i``, less ``replay_seconds_i`` in checkpoint and selective modes: the time its
recorded dropout masks and BatchNorm statistics save the recomputation; an inverse's time is its FLOPs at the
segment's own measured rate), plus ``rebuild_seconds_i`` in every mode but invertible (saved inputs rebuilt in
backward, keep included): FLOPs count a convolution's arithmetic, not BatchNorm's and ReLU's memory traffic,
which on a CPU take as long.

Ties. With ``budget=None``: least peak, then least extra compute; with a budget: least extra compute, then least
peak. Remaining ties go to the plan whose options, read from the first segment, come first in the order keep <
checkpoint < invertible < selective, levels by ascending bytes (so keep is preferred, then checkpoint). Extra
compute is compared exactly (the floats are turned into exact integers), so the choice never depends on rounding
or on the order of a sum.

How it is solved
----------------
Peak memory is a maximum, not a sum, so a knapsack over per-segment costs is not enough. Every term above is
``A_i`` plus a part that depends only on segment ``i``, its neighbours' modes and whether ``b_{i-1}`` was kept;
and ``A_{i+1} = A_i + K_i + kept_{i-1}``. So, read from the back, the peak of a suffix *relative to* ``A_i``
obeys ``R_i = max(local terms of i, K_i + kept_{i-1} + R_{i+1})`` in a state ``(kept(b_{i-1}), option_i)`` (at
most twice the options: eight without stash levels), and the peak of a plan is ``B_0 + R_1``. The terms that
depend on the next segment's option (``kept(b_i)``, the backward of ``i``) are evaluated at the transition, when
that option is chosen.

1. The least achievable peak: a min-max dynamic programme over the states, from the back, linear in ``n``.
   With ``budget=None`` it is the budget of what follows (least compute among the least-peak plans).
2. Prefix bounds, forward, linear: for each state, the least ``A_i`` of a prefix whose terms fit the budget
   (exact: a smaller ``A_i`` is always better for what follows), an upper bound on the ``A_i`` of such a
   prefix, and Lagrangian lower bounds on its compute: for prices ``lam`` of memory in compute,
   ``phi = min(compute + lam * A_i)`` over prefixes, so a prefix with ``A_i <= room`` computes at least
   ``phi - lam * room``.
3. A backward pass keeps, for each state, the Pareto frontier of suffixes over (``R_i``, (extra compute, order
   of the modes)). Dominance is exact: a suffix no worse in ``R_i`` and in (compute, order) is no worse after any
   common prefix. Also dropped, exactly: suffixes that no prefix completes within the budget; of those that fit
   after every prefix, all but the least-compute ones; and, given the compute ``U`` of a plan known to fit,
   those whose compute plus the Lagrangian bound on the prefix that can precede them exceeds ``U``.
4. Frontiers are capped, in passes of growing caps: ``frontier_limit // 128``, ``// 16`` and ``frontier_limit``
   (16, 128, 2048 by default). A frontier over its cap keeps the points of least Lagrangian bound and the
   point of least ``R_i`` (so every pass finds a plan within the budget); each pass after the first is pruned
   with ``U`` = the best plan so far. The first pass in which no frontier reaches its cap is exact and ends the
   search.

If even the last pass had to cap a frontier, the best plan found is returned with ``exact=False``. It fits the
budget (capping only drops candidates and never changes a value; rounding the running sums up to a coarser grid
would be as safe, but loses more), but it may compute more than the least. In
``benchmarks/plan_speed.py`` that happens only for long chains of all-different segments (1000 ResNet blocks
with random jitter); 200 such segments, and long chains of repeated identical blocks, are planned exactly.
The peak a plan reports is always recomputed with :func:`chain_peak`.
"""

from __future__ import annotations

import bisect
import dataclasses
import itertools
import math
import operator
from collections.abc import Iterable
from dataclasses import dataclass
from operator import itemgetter
from typing import cast, overload

from .errors import BudgetError
from .units import format_bytes

__all__ = ["MODES", "SegmentCost", "StashLevel", "ChainPlan", "chain_peak", "chain_extra_flops", "plain_peak",
           "plan_chain",
           "timed", "chain_extra_seconds",
           "exhaustive"]

KEEP, CHECKPOINT, INVERTIBLE, SELECTIVE = "keep", "checkpoint", "invertible", "selective"
#: The modes, in the order ties are broken (earlier is preferred).
MODES = (KEEP, CHECKPOINT, INVERTIBLE, SELECTIVE)
_RANK = {mode: rank for rank, mode in enumerate(MODES)}
_K, _C, _I = 0, 1, 2  # the ranks of keep, checkpoint and invertible

#: Largest frontier a state keeps in the last pass; above it the plan may not be exact (see the module docstring).
FRONTIER_LIMIT = 2048
#: The planner's passes use frontier limits ``frontier_limit // shrink`` (16, 128, 2048 by default): each pass is
#: exact if no frontier reaches its limit; otherwise its plan bounds the compute of the next pass.
_PASS_SHRINK = (128, 16, 1)
#: Number of prices of memory in the Lagrangian bounds.
_MULTIPLIERS = 32
_relative_peak = itemgetter(0)  # of a frontier point
#: Largest chain :func:`exhaustive` accepts (3**14 plans is already millions).
EXHAUSTIVE_LIMIT = 14

# A state of the dynamic programme, (kept_before, mode rank); a frontier point, (R, compute, order, next mode,
# index of the point it extends), the last two None at the last segment (see _frontier_pass).
_State = tuple[bool, int]
_Point = tuple[int, int, int, int | None, int | None]


@dataclass(frozen=True)
class StashLevel:
    """One choice of what a selective checkpoint keeps: the outputs of ``calls`` (node names), ``nbytes`` in
    all, so that its recomputation skips those calls (``flops`` and ``seconds`` of forward compute)."""

    nbytes: int
    flops: float
    seconds: float = 0.0
    calls: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "nbytes", operator.index(self.nbytes))
        if self.nbytes < 0:
            raise ValueError(f"a stash level's nbytes is negative ({self.nbytes})")
        for value in (self.flops, self.seconds):
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ValueError(f"a stash level's flops and seconds must be finite numbers >= 0, not {value!r}")
        object.__setattr__(self, "calls", tuple(self.calls))


@dataclass(frozen=True)
class SegmentCost:
    """Memory and compute of one segment of a chain; see the module docstring for how each is used."""

    name: str
    input_bytes: int  # B_{i-1}: the boundary value entering the segment
    output_bytes: int  # B_i: the boundary value it produces (= the next segment's input_bytes)
    saved_bytes: int  # kept for backward in keep mode, besides its input and output storages
    transient_bytes: int  # working memory of its backward beyond saved_bytes (gradients in flight)
    forward_transient_bytes: int  # working memory of its forward when nothing is saved (checkpoint, invertible)
    saves_input: bool  # in keep mode its ops save its input value
    saves_output: bool  # in keep mode its ops save its output value
    flops: float  # forward compute
    inverse_flops: float | None = None  # extra compute of its inverse; None: it cannot be inverted
    input_freeable: bool = True  # its input may be freed (False for the caller's input, views, values read later)
    modes: frozenset[str] = frozenset(MODES)  # modes allowed for it
    # what an invertible backward holds instead of saved_bytes (a fused backward recomputes one sub-network at
    # a time); None: saved_bytes, as a checkpoint's recomputation
    invertible_bytes: int | None = None
    # selective mode: what it keeps besides its input (the outputs of its expensive ops), and the forward compute
    # those ops take, which its recomputation skips; None: no selective mode
    stash_bytes: int | None = None
    stash_flops: float = 0.0
    # invertible mode: the branches its sub-networks' relu / clamp / max pooling took, kept for their recomputation
    branch_bytes: int = 0
    # checkpoint and selective modes: its dropouts' masks, kept so that the recomputation multiplies by them instead
    # of drawing again (invfx.runtime.dropout_masks), and the time its records save the recomputation (those
    # dropouts' and its BatchNorms', invfx.runtime.norm_stats: their forward time less their replay's, less what
    # recording adds to the forward)
    mask_bytes: int = 0
    replay_seconds: float = 0.0
    # every mode but invertible: outputs of LayerNorm / GELU calls its Linear calls save as how to rebuild them
    # (invfx.runtime.recompute_saved), which saved_bytes leaves out, and the time rebuilding them takes its
    # backward (their forward again), charged in every mode; rebuilt_bytes is what turning it off adds back
    rebuilt_bytes: int = 0
    rebuild_seconds: float = 0.0
    # measured wall time of its forward, and of the ops a selective checkpoint keeps the outputs of; None: not
    # measured (the planner then weighs FLOPs)
    seconds: float | None = None
    stash_seconds: float = 0.0
    # selective mode, chosen per call: the choices of what to keep, by ascending bytes (each a StashLevel; the
    # planner picks one). Empty: the one level stash_bytes / stash_flops / stash_seconds. Given, those three
    # are its last level's (the most kept).
    stash_levels: tuple[StashLevel, ...] = ()
    stash_levels_whole: bool = True  # False: stash_levels were thinned from a larger frontier (stash_levels.py)

    def __post_init__(self) -> None:
        for field_name in ("input_bytes", "output_bytes", "saved_bytes", "transient_bytes",
                           "forward_transient_bytes", "branch_bytes", "mask_bytes", "rebuilt_bytes"):
            value = getattr(self, field_name)
            try:
                value = operator.index(value)
            except TypeError:
                raise TypeError(f"segment {self.name!r}: {field_name} must be an integer number of bytes, "
                                f"not {value!r}") from None
            if value < 0:
                raise ValueError(f"segment {self.name!r}: {field_name} is negative ({value})")
            object.__setattr__(self, field_name, value)
        for field_name in ("invertible_bytes", "stash_bytes"):
            if getattr(self, field_name) is not None:
                value = operator.index(getattr(self, field_name))
                if value < 0:
                    raise ValueError(f"segment {self.name!r}: {field_name} is negative ({value})")
                object.__setattr__(self, field_name, value)
        for field_name in ("flops", "inverse_flops", "stash_flops", "seconds", "stash_seconds", "replay_seconds",
                           "rebuild_seconds"):
            value = getattr(self, field_name)
            if value is None and field_name in ("inverse_flops", "seconds"):
                continue
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ValueError(f"segment {self.name!r}: {field_name} must be a finite number >= 0, not {value!r}")
        levels = tuple(sorted(self.stash_levels, key=lambda level: (level.nbytes, -level.seconds, -level.flops)))
        for level in levels:
            if not isinstance(level, StashLevel):
                raise TypeError(f"segment {self.name!r}: stash_levels holds a {type(level).__name__}, "
                                "not a StashLevel")
        if levels:
            object.__setattr__(self, "stash_levels", levels)
            object.__setattr__(self, "stash_bytes", levels[-1].nbytes)
            object.__setattr__(self, "stash_flops", float(levels[-1].flops))
            object.__setattr__(self, "stash_seconds", float(levels[-1].seconds))
        elif self.stash_bytes is not None:
            object.__setattr__(self, "stash_levels", (StashLevel(self.stash_bytes, self.stash_flops,
                                                                 self.stash_seconds),))
        modes = frozenset(self.modes)
        unknown = modes - set(MODES)
        if unknown:
            raise ValueError(f"segment {self.name!r}: unknown modes {sorted(unknown)}; the modes are {MODES}")
        object.__setattr__(self, "modes", modes)

    def backward_bytes(self, mode: str) -> int:
        """What its backward holds in ``mode`` besides boundary values: the saved (kept or recomputed)
        activations and the working memory, and a recomputation's own output (checkpoint, selective: the
        recomputed output is alive while it is differentiated, beside the forward's)."""
        held = self.invertible_bytes if mode == INVERTIBLE and self.invertible_bytes is not None \
            else self.saved_bytes
        recomputed_output = self.output_bytes if mode in (CHECKPOINT, SELECTIVE) else 0
        return held + self.transient_bytes + recomputed_output

    @property
    def allowed_modes(self) -> tuple[str, ...]:
        """The modes this segment may run in, in tie-break order: ``modes``, less invertible without an inverse."""
        return tuple(mode for mode in MODES
                     if mode in self.modes and (mode != INVERTIBLE or self.inverse_flops is not None)
                     and (mode != SELECTIVE or self.stash_bytes is not None))

    @property
    def options(self) -> tuple[tuple[str, int | None], ...]:
        """What the planner chooses from, in tie-break order: each allowed mode, selective once per stash level
        (``(mode, level index)``; the level is None for the other modes)."""
        return tuple((mode, level) for mode in self.allowed_modes
                     for level in (range(len(self.stash_levels)) if mode == SELECTIVE else (None,)))

    def _level(self, level: int | None) -> StashLevel:
        """A stash level by index; None: the last (the most kept). With none (a member of a selective group
        that keeps none of its own calls): nothing kept."""
        if not self.stash_levels:
            return StashLevel(0, 0.0)
        return self.stash_levels[-1 if level is None else level]

    def held_bytes(self, mode: str, level: int | None = None) -> int:
        """``K``: what it holds from its forward to its backward in ``mode`` (selective: at stash ``level``,
        None for the last), besides boundary values."""
        if mode == KEEP:
            return self.saved_bytes
        if mode == SELECTIVE:
            return self._level(level).nbytes + self.mask_bytes
        if mode == INVERTIBLE:
            return self.branch_bytes
        return self.mask_bytes

    def recompute_flops(self, mode: str, level: int | None = None) -> float:
        """Its extra compute in ``mode`` (selective: at stash ``level``, None for the last)."""
        if mode == CHECKPOINT:
            return self.flops
        if mode == INVERTIBLE:
            return self.flops + (self.inverse_flops or 0.0)
        if mode == SELECTIVE:
            return max(self.flops - self._level(level).flops, 0.0)
        return 0.0

    def inverse_seconds(self) -> float:
        """The time of its inverse: its FLOPs at the segment's measured FLOP rate (0 where not measured)."""
        if self.seconds is None or not self.flops:
            return 0.0
        return (self.inverse_flops or 0.0) * (self.seconds / self.flops)

    def recompute_seconds(self, mode: str, level: int | None = None) -> float | None:
        """Its extra time in ``mode`` (None: not measured). An inverse is charged its FLOPs at the segment's rate.
        Selective: at stash ``level`` (None for the last). Rebuilding saved inputs takes ``rebuild_seconds`` in
        every mode (an invertible segment has none)."""
        if self.seconds is None:
            return None
        if mode == CHECKPOINT:
            return max(self.seconds - self.replay_seconds, 0.0) + self.rebuild_seconds
        if mode == INVERTIBLE:
            return self.seconds + self.inverse_seconds()
        if mode == SELECTIVE:
            return max(self.seconds - self._level(level).seconds - self.replay_seconds, 0.0) + self.rebuild_seconds
        return self.rebuild_seconds

    def without_rebuild(self) -> SegmentCost:
        """The same segment with its saved inputs kept as they are (nothing rebuilt): more bytes, less time."""
        if not self.rebuilt_bytes and not self.rebuild_seconds:
            return self
        return dataclasses.replace(self, saved_bytes=self.saved_bytes + self.rebuilt_bytes, rebuilt_bytes=0,
                                   rebuild_seconds=0.0)


@dataclass(frozen=True)
class ChainPlan:
    """The chosen mode of each segment and what it costs under the memory model.

    ``peak``: peak bytes of the plan (:func:`chain_peak`); ``extra_flops``: its extra compute
    (:func:`chain_extra_flops`); ``plain_peak``: the peak with every segment in keep mode, for reference;
    ``exact``: False if a frontier was thinned, so the plan fits the budget but may not have the least compute.
    """

    modes: tuple[str, ...]
    peak: int
    extra_flops: float
    plain_peak: int
    exact: bool = True
    extra_seconds: float | None = None  # its extra time, where every segment's was measured
    # each segment's stash level (an index into its stash_levels) where selective, else None; () as all None
    levels: tuple[int | None, ...] = ()

    def level(self, index: int) -> int | None:
        """The stash level of segment ``index`` (None unless selective)."""
        return self.levels[index] if self.levels else None


def _check_chain(costs: Iterable[SegmentCost]) -> tuple[SegmentCost, ...]:
    costs = tuple(costs)
    if not costs:
        raise ValueError("a chain needs at least one segment")
    for i, cost in enumerate(costs):
        if not isinstance(cost, SegmentCost):
            raise TypeError(f"segment {i} is a {type(cost).__name__}, not a SegmentCost")
    for before, after in zip(costs, costs[1:]):
        if before.output_bytes != after.input_bytes:
            raise ValueError(f"segment {before.name!r} produces {before.output_bytes} B but the next segment "
                             f"{after.name!r} reads {after.input_bytes} B: a boundary has one size")
    return costs


def _kept(before: SegmentCost, mode_before: str, after: SegmentCost, mode_after: str) -> bool:
    """Whether the boundary between ``before`` and ``after`` is kept from forward to backward."""
    self_saves = mode_before == KEEP and before.saves_output
    freed = mode_after == INVERTIBLE and after.input_freeable and not self_saves
    needed = (mode_after in (CHECKPOINT, SELECTIVE) or (mode_after == KEEP and after.saves_input)
              or (mode_after == INVERTIBLE and not after.input_freeable) or self_saves or mode_before == INVERTIBLE)
    return needed and not freed


def _check_levels(costs: tuple[SegmentCost, ...], levels: Iterable[int | None] | None) -> tuple[int | None, ...]:
    levels = (None,) * len(costs) if levels is None else tuple(levels)
    if len(levels) != len(costs):
        raise ValueError(f"{len(levels)} stash levels for {len(costs)} segments")
    return levels


def chain_peak(costs: Iterable[SegmentCost], modes: Iterable[str],
               levels: Iterable[int | None] | None = None) -> int:
    """Peak bytes of running ``costs`` in ``modes`` (a selective segment at its stash level in ``levels``; None
    or no ``levels``: its last): the definition of the memory model (module docstring).

    It does not check that a mode is allowed for its segment (:func:`plain_peak` uses keep everywhere)."""
    costs = _check_chain(costs)
    modes = tuple(modes)
    n = len(costs)
    if len(modes) != n:
        raise ValueError(f"{len(modes)} modes for {n} segments")
    stash = _check_levels(costs, levels)
    for mode in modes:
        if mode not in _RANK:
            raise ValueError(f"unknown mode {mode!r}; the modes are {MODES}")
    sizes = [costs[0].input_bytes] + [cost.output_bytes for cost in costs]  # sizes[j] = B_j
    # kept[j] for boundaries 1..n-1 (kept[0] and kept[n] are unused: b_0 and b_n are always counted).
    kept = [True] + [_kept(costs[j - 1], modes[j - 1], costs[j], modes[j]) for j in range(1, n)] + [True]
    held = [cost.held_bytes(mode, level) for cost, mode, level in zip(costs, modes, stash)]  # K_i, 0-based

    terms = [sizes[0] + sizes[n] + sum(held) + sum(sizes[j] for j in range(1, n) if kept[j])]  # F
    earlier = sizes[0]  # A_i = B_0 + sum_{j<i} K_j + sum_{1<=j<=i-2} kept_j, for i = 1
    for i in range(1, n + 1):
        cost, mode = costs[i - 1], modes[i - 1]
        if i >= 3 and kept[i - 2]:
            earlier += sizes[i - 2]
        if i >= 2:
            earlier += held[i - 2]
        input_alive = sizes[i - 1] if i >= 2 else 0  # b_0 is inside `earlier` already
        terms.append(earlier + input_alive + sizes[i] + _forward_bytes(cost, mode, stash[i - 1]))
        input_present = i >= 2 and (kept[i - 1] or mode == INVERTIBLE)
        output_present = i == n or kept[i] or modes[i] == INVERTIBLE
        terms.append(earlier + (sizes[i - 1] if input_present else 0) + (sizes[i] if output_present else 0)
                     + sizes[i] + cost.backward_bytes(mode))
    return max(terms)


def chain_extra_flops(costs: Iterable[SegmentCost], modes: Iterable[str],
                      levels: Iterable[int | None] | None = None) -> float:
    """Extra compute of running ``costs`` in ``modes``: ``flops`` per checkpointed segment, ``flops +
    inverse_flops`` per invertible one, what a selective one's stash level does not keep. The sum is correctly
    rounded (math.fsum), so it is independent of order."""
    costs = _check_chain(costs)
    modes = tuple(modes)
    if len(modes) != len(costs):
        raise ValueError(f"{len(modes)} modes for {len(costs)} segments")
    stash = _check_levels(costs, levels)
    parts: list[float] = []
    for cost, mode, level in zip(costs, modes, stash):
        if mode == CHECKPOINT:
            parts.append(cost.flops)
        elif mode == INVERTIBLE:
            if cost.inverse_flops is None:
                raise ValueError(f"segment {cost.name!r} has no inverse, so it cannot be invertible")
            parts += [cost.flops, cost.inverse_flops]
        elif mode == SELECTIVE:
            parts.append(cost.recompute_flops(SELECTIVE, level))
        elif mode != KEEP:
            raise ValueError(f"unknown mode {mode!r}; the modes are {MODES}")
    return math.fsum(parts)


def chain_extra_seconds(costs: Iterable[SegmentCost], modes: Iterable[str],
                        levels: Iterable[int | None] | None = None) -> float | None:
    """Extra time of running ``costs`` in ``modes`` (None unless every segment's time was measured)."""
    costs = tuple(costs)
    if not timed(costs):
        return None
    stash = _check_levels(costs, levels)
    return math.fsum(cast(float, cost.recompute_seconds(mode, level))
                     for cost, mode, level in zip(costs, modes, stash))


def _forward_bytes(cost: SegmentCost, mode: str, level: int | None = None) -> int:
    """What a segment's forward holds besides its input and output: what plain autograd saves (keep), its
    working memory and what it keeps for its recomputation (selective), or its working memory."""
    if mode == KEEP:
        return cost.saved_bytes
    if mode == SELECTIVE:
        return cost.forward_transient_bytes + cost.held_bytes(SELECTIVE, level)
    return cost.forward_transient_bytes


def plain_peak(costs: Iterable[SegmentCost]) -> int:
    """Peak bytes with every segment in keep mode (whether or not keep is allowed for it)."""
    costs = _check_chain(costs)
    return chain_peak(costs, (KEEP,) * len(costs))


def timed(costs: Iterable[SegmentCost]) -> bool:
    """Whether the plan of ``costs`` weighs measured time (every segment has it) rather than FLOPs."""
    return all(cost.seconds is not None for cost in costs)


def _exact_compute(costs: tuple[SegmentCost, ...]) -> tuple[list[tuple[int, ...]], int]:
    """Extra compute of each segment in each of its options (``SegmentCost.options``; time where :func:`timed`,
    else FLOPs) as exact integers, on one common scale, and that scale (integers per second or per FLOP).

    Every finite float is p / 2**k; multiplying by the largest 2**k makes them all integers, so sums and
    comparisons are exact (two plans of equal compute tie, whatever order their floats would be added in)."""
    in_seconds = timed(costs)

    def value(cost: SegmentCost, mode: str, level: int | None) -> float:
        if in_seconds:
            return cast(float, cost.recompute_seconds(mode, level))
        return cost.recompute_flops(mode, level)

    table_values = [[value(cost, mode, level) for mode, level in cost.options] for cost in costs]
    ratios = [float(v).as_integer_ratio() for row in table_values for v in row]
    scale = max((denominator for _, denominator in ratios), default=1)

    def exact(v: float) -> int:
        numerator, denominator = float(v).as_integer_ratio()
        return numerator * (scale // denominator)

    return [tuple(exact(v) for v in row) for row in table_values], scale


def _budget_error(budget: int, least: int) -> BudgetError:
    return BudgetError(f"memory budget {format_bytes(budget, exact=True)} cannot be met: the least achievable "
                       f"peak is {format_bytes(least, exact=True)}, with checkpoint/invertible everywhere each "
                       "segment allows them")


def _check_budget(budget: int | None) -> int | None:
    if budget is None:
        return None
    try:
        budget = operator.index(budget)
    except TypeError:
        raise TypeError(f"budget must be None or an integer number of bytes, not {budget!r}") from None
    if budget < 0:
        raise ValueError(f"budget is negative ({budget} B)")
    return budget


class _Chain:
    """The chain's numbers as the dynamic programme uses them: options as indices, terms relative to ``A_i``.

    Indices are 0-based (``s = i - 1``). A segment's options are its modes, selective once per stash level
    (``SegmentCost.options``), in tie-break order; ``rank[s][o]`` is option ``o``'s mode as a rank. A state at
    segment ``s`` is ``(kept_before, option)``: whether the boundary entering it was kept, and its option.
    """

    def __init__(self, costs: tuple[SegmentCost, ...]) -> None:
        self.costs = costs
        self.n = n = len(costs)
        self.input_bytes = costs[0].input_bytes  # B_0, always held
        self.options = [cost.options for cost in costs]
        for cost, options in zip(costs, self.options):
            if not options:
                raise ValueError(f"segment {cost.name!r} allows no mode: modes={sorted(cost.modes)}, "
                                 f"inverse_flops={cost.inverse_flops}")
        self.allowed: list[tuple[int, ...]] = [tuple(range(len(options))) for options in self.options]
        self.rank = [tuple(_RANK[mode] for mode, _ in options) for options in self.options]
        self.compute, self.scale = _exact_compute(costs)
        # b_{i-1} as counted on top of A_i: 0 for the first segment, whose input B_0 is already inside A_i.
        self.before = [0] + [cost.output_bytes for cost in costs[:-1]]
        self.after = [cost.output_bytes for cost in costs]
        # Forward term of segment s relative to A_s, by option.
        self.forward = [tuple(b + c.output_bytes + _forward_bytes(c, mode, level) for mode, level in options)
                        for b, c, options in zip(self.before, costs, self.options)]
        # Backward term relative to A_s without its two conditional boundary values: the gradient of b_i,
        # the (kept or recomputed) saved activations and the backward's working memory.
        self.backward = [tuple(c.output_bytes + c.backward_bytes(mode) for mode, _ in options)
                         for c, options in zip(costs, self.options)]
        self.held = [tuple(c.held_bytes(mode, level) for mode, level in options)
                     for c, options in zip(costs, self.options)]  # K_s by option
        # kept[s][o][o2]: boundary after segment s kept, for options o of s and o2 of s + 1.
        self.kept = [[[_kept(costs[s], mode, costs[s + 1], mode2) for mode2, _ in self.options[s + 1]]
                      for mode, _ in self.options[s]] for s in range(n - 1)]
        self.states = [[(kb, m) for kb in ((False, True) if s else (False,)) for m in self.allowed[s]]
                       for s in range(n)]

    def growth(self, s: int, kept_before: bool, m: int) -> int:
        """``A_{s+1} - A_s``: what segment s holds (K) and the kept boundary before it, once s is done."""
        return self.held[s][m] + (self.before[s] if kept_before else 0)

    def local(self, s: int, kept_before: bool, m: int, m2: int | None) -> int:
        """The largest term of segment s relative to A_s, given the next segment's option m2 (None: s is last)."""
        forward = self.forward[s][m]
        backward = self.backward[s][m] + (self.before[s] if kept_before or self.rank[s][m] == _I else 0)
        if m2 is None:
            backward += self.after[s]
            ending = self.growth(s, kept_before, m) + self.after[s]  # F - A_n
            return max(forward, backward, ending)
        if self.kept[s][m][m2] or self.rank[s + 1][m2] == _I:
            backward += self.after[s]
        return max(forward, backward)

    def plan(self, choice: Iterable[int]) -> tuple[tuple[str, ...], tuple[int | None, ...]]:
        """The modes and stash levels of a choice of options."""
        picked = [self.options[s][o] for s, o in enumerate(choice)]
        return tuple(mode for mode, _ in picked), tuple(level for _, level in picked)


def _least_suffix_peaks(chain: _Chain) -> list[dict[_State, int]]:
    """``least[s][state]``: the least ``R_s`` (peak relative to ``A_s``) of any suffix from ``state`` on.

    A min-max recurrence from the back, exact because ``R_s`` grows with ``R_{s+1}``. The least peak of the
    chain is ``B_0 + min(least[0].values())``."""
    n = chain.n
    least = cast("list[dict[_State, int]]", [None] * n)  # (every entry is set below)
    least[n - 1] = {state: chain.local(n - 1, *state, None) for state in chain.states[n - 1]}
    for s in range(n - 2, -1, -1):
        here: dict[_State, int]
        following, here = least[s + 1], {}
        for kb, m in chain.states[s]:
            growth = chain.growth(s, kb, m)
            here[(kb, m)] = min(max(chain.local(s, kb, m, m2), growth + following[(chain.kept[s][m][m2], m2)])
                                for m2 in chain.allowed[s + 1])
        least[s] = here
    return least


def _multipliers(chain: _Chain) -> list[float]:
    """Prices of memory in compute (compute per byte) for the Lagrangian bounds: 0, and a geometric grid over
    what freeing a segment's memory by recomputing or inverting it costs."""
    ratios: list[float] = []
    for s, cost in enumerate(chain.costs):
        for m in chain.allowed[s]:
            if chain.rank[s][m] != _K and chain.compute[s][m] > 0:
                for freed in (cost.saved_bytes, cost.saved_bytes + cost.output_bytes,
                              cost.saved_bytes + cost.output_bytes + cost.input_bytes):
                    if freed > 0:
                        ratios.append(chain.compute[s][m] / freed)
    if not ratios:
        return [0.0]
    low, high = min(ratios), max(ratios)
    steps = _MULTIPLIERS - 1
    return [0.0] + [low * (high / low) ** (k / max(1, steps - 1)) for k in range(steps)]


class _PrefixBounds:
    """What the backward pass needs to know about the prefixes reaching each state, within a budget.

    ``least[s][state]`` / ``most[s][state]``: the least A_s of a prefix whose terms fit the budget, and an upper
    bound on the A_s of such a prefix that can still be completed. A state absent from ``least[s]`` is reached
    by no such prefix. ``hulls[s][state]``: Lagrangian lower bounds on the compute of those prefixes: for each
    price ``lam``, ``phi = min(compute + lam * A_s)``, so a prefix with ``A_s <= room`` computes at least
    ``phi - lam * room``; kept as the upper envelope of these lines, by ascending price.

    The smallest A_s is always the best prefix for feasibility (every later term grows with it), so ``least``
    is exact; ``most`` and ``hulls`` are relaxations (transitions are checked with the least prefix), which is
    all a bound needs."""

    def __init__(self, chain: _Chain, budget: int, suffix_peaks: list[dict[_State, int]], prices: list[float]) -> None:
        n = chain.n
        least: list[dict[_State, int]]
        most: list[dict[_State, int]]
        self.least = least = [dict() for _ in range(n)]
        self.most = most = [dict() for _ in range(n)]
        lines: list[dict[_State, list[float]]] = [dict() for _ in range(n)]
        start = chain.input_bytes
        for state in chain.states[0]:
            if start + suffix_peaks[0][state] <= budget:
                least[0][state] = most[0][state] = start
                lines[0][state] = [price * start for price in prices]
        for s in range(n - 1):
            for (kb, m), low in least[s].items():
                high, phi = most[s][(kb, m)], lines[s][(kb, m)]
                growth, compute = chain.growth(s, kb, m), chain.compute[s][m]
                for m2 in chain.allowed[s + 1]:
                    local = chain.local(s, kb, m, m2)
                    state = (chain.kept[s][m][m2], m2)
                    ceiling = budget - suffix_peaks[s + 1][state]  # the most A_{s+1} that can still be completed
                    if low + local > budget or low + growth > ceiling:
                        continue
                    grown_high = min(high, budget - local) + growth
                    if grown_high > ceiling:
                        grown_high = ceiling
                    if state not in least[s + 1]:
                        least[s + 1][state], most[s + 1][state] = low + growth, grown_high
                        lines[s + 1][state] = [value + compute + price * growth for value, price in zip(phi, prices)]
                        continue
                    if low + growth < least[s + 1][state]:
                        least[s + 1][state] = low + growth
                    if grown_high > most[s + 1][state]:
                        most[s + 1][state] = grown_high
                    lines[s + 1][state] = [min(old, value + compute + price * growth)
                                           for old, value, price in zip(lines[s + 1][state], phi, prices)]
        # Floats: each phi is lowered by far more than the rounding of its n additions (relative 1e-16 each) on
        # the scale of the numbers involved, so every line stays a lower bound.
        self.hulls = [{state: _upper_envelope([(price, value - 1e-9 * (abs(value) + price * budget) - 1.0)
                                               for price, value in zip(prices, phi)])
                       for state, phi in by_state.items()}
                      for by_state in lines]


def _upper_envelope(lines: list[tuple[float, float]]) -> tuple[list[float], list[float], list[float]]:
    """The lines ``y = phi - lam * x`` that are the maximum somewhere, by ascending ``lam``, as ``(lams, phis,
    breaks)``: line ``k`` is the maximum for ``breaks[k] <= x <= breaks[k - 1]`` (``breaks[-1]`` is -inf).

    Each line alone is a lower bound, so float rounding here can only weaken the pruning, never make it wrong."""
    best: dict[float, float] = {}
    for lam, phi in lines:
        if lam not in best or phi > best[lam]:
            best[lam] = phi
    hull: list[tuple[float, float]] = []
    for lam, phi in sorted(best.items()):
        while len(hull) >= 2:
            (lam1, phi1), (lam2, phi2) = hull[-2], hull[-1]
            # The middle line is on top only for x between its crossings with its neighbours.
            if (phi - phi2) * (lam2 - lam1) >= (phi2 - phi1) * (lam - lam2):
                hull.pop()
            else:
                break
        hull.append((lam, phi))
    lams = [lam for lam, _ in hull]
    phis = [phi for _, phi in hull]
    breaks = [(phi2 - phi1) / (lam2 - lam1) for lam1, phi1, lam2, phi2 in zip(lams, phis, lams[1:], phis[1:])]
    return lams, phis, breaks + [-math.inf]


def _frontier_pass(chain: _Chain, budget: int, prefixes: _PrefixBounds, frontier_limit: int,
                   upper: int | None) -> tuple[tuple[tuple[int, int, int], tuple[int, ...]] | None, bool]:
    """Backward pass: the plan of least (compute, peak, mode order) with peak <= budget, as ``((compute, peak,
    order), ranks)``, or None if every plan was pruned; and whether no frontier was thinned.

    ``upper``: the compute of a plan known to fit, or None. Suffixes whose least possible total (their compute
    plus a Lagrangian lower bound on any prefix that fits with them) exceeds it are dropped.

    A point at segment s is ``(R, compute, order, next mode, index of the point it extends)``: a suffix from s
    on, its peak relative to A_s, its exact extra compute, and the rank of its modes in lexicographic order
    among all points at s (within a state, the rank of the point it extends orders them)."""
    n = chain.n
    frontiers = cast("list[dict[_State, tuple[list[_Point], list[int]]]]", [None] * n)  # (every entry is set below)
    exact = True
    # The bounds are floats: the compute they add to (exact integers) may round, by far less than this.
    slack = None if upper is None else 1e-9 * abs(upper) + 1.0

    def ranked(candidates: dict[_State, list[_Point]]) -> dict[_State, tuple[list[_Point], list[int]]]:
        # The order of a point at s is that of its modes (m_s, m_{s+1}, ...): its state's mode, then the order of
        # the point it extends. Dense ranks keep the numbers small.
        by_mode: dict[int, set[int]] = {}
        for (_, m), points in candidates.items():
            by_mode.setdefault(m, set()).update(point[2] for point in points)
        rank_of, offset = {}, 0
        for m in sorted(by_mode):
            rank_of[m] = {parent: offset + rank for rank, parent in enumerate(sorted(by_mode[m]))}
            offset += len(by_mode[m])
        return {state: (points, [rank_of[state[1]][point[2]] for point in points])
                for state, points in candidates.items()}

    def pruned(s: int, state: _State, staircase: list[_Point]) -> list[_Point]:
        nonlocal exact
        # A suffix that fits after every prefix that reaches this state (R <= budget - most) needs nothing
        # from the prefix, so only the least-compute such suffixes matter: any other costs strictly more.
        universal = budget - prefixes.most[s][state]
        last = -1
        while last + 1 < len(staircase) and staircase[last + 1][0] <= universal:
            last += 1
        if last > 0:
            first = last
            while first > 0 and staircase[first - 1][1] == staircase[last][1]:
                first -= 1
            staircase = staircase[first:]
        # Lagrangian lower bound on the compute of a whole plan through each point: its own compute plus the
        # least any prefix reaching this state can compute within the room the point leaves it.
        lams, phis, breaks = prefixes.hulls[s][state]
        line, totals = 0, []
        for point in staircase:  # R ascending: the room left to the prefix descends
            room = budget - point[0]
            while room < breaks[line]:
                line += 1
            totals.append(point[1] + phis[line] - lams[line] * room)
        if upper is not None:  # (then slack is not None either)
            kept = [index for index, total in enumerate(totals) if total <= upper + slack]  # type: ignore[operator]
            if len(kept) < len(staircase):
                staircase, totals = [staircase[i] for i in kept], [totals[i] for i in kept]
        if len(staircase) > frontier_limit:
            # Keep the most promising points (least bound), and the least-peak one, which keeps every
            # state's least-peak suffix alive (so a plan within the budget is always found).
            best = sorted(range(1, len(staircase)), key=totals.__getitem__)[:frontier_limit - 1]
            staircase = [staircase[0]] + [staircase[i] for i in sorted(best)]
            exact = False
        return staircase

    last = n - 1
    candidates = {}
    for state, held in prefixes.least[last].items():
        relative = chain.local(last, *state, None)
        if held + relative <= budget:
            candidates[state] = pruned(last, state, [(relative, chain.compute[last][state[1]], 0, None, None)])
    frontiers[last] = ranked(candidates)

    for s in range(n - 2, -1, -1):
        following = frontiers[s + 1]
        candidates = {}
        for (kb, m), held in prefixes.least[s].items():
            room = budget - held  # the most R_s a suffix may have here
            growth = chain.growth(s, kb, m)
            compute = chain.compute[s][m]
            pool: list[_Point] = []
            for m2 in chain.allowed[s + 1]:
                points, orders = following.get((chain.kept[s][m][m2], m2), (None, None))
                if not points:
                    continue
                local = chain.local(s, kb, m, m2)
                if local > room:
                    continue
                # Points are sorted by R (and compute descends): those that fit the room are a prefix, and of
                # those whose R stays under this segment's own terms, all get R = local, so only the last
                # (least compute) can be on the staircase.
                fitting = bisect.bisect_right(points, room - growth, key=_relative_peak)
                start = max(0, bisect.bisect_right(points, local - growth, 0, fitting, key=_relative_peak) - 1)
                # (orders is None only where points is)
                pool += [(local if local > relative else relative, compute + point[1], order, m2, index)
                         for index, point, order in zip(range(start, fitting), points[start:fitting],
                                                        orders[start:fitting])  # type: ignore[index]
                         for relative in (growth + point[0],)]
            if not pool:
                continue
            pool.sort()
            staircase: list[_Point] = []
            best_compute, best_order = None, None
            for point in pool:  # keep the points no other beats in both R and (compute, order)
                # (best_order is set together with best_compute)
                if best_compute is None or point[1] < best_compute or \
                        (point[1] == best_compute and point[2] < best_order):  # type: ignore[operator]
                    staircase.append(point)
                    best_compute, best_order = point[1], point[2]
            staircase = pruned(s, (kb, m), staircase)
            if staircase:
                candidates[(kb, m)] = staircase
        frontiers[s] = ranked(candidates)

    # The first segment: A_1 = B_0, so the peak is B_0 + R; choose by (compute, peak, order).
    best_state, best_index, best_key = None, None, None
    for state, (points, orders) in frontiers[0].items():
        for index, ((r, c, _, _, _), order) in enumerate(zip(points, orders)):
            key = (c, chain.input_bytes + r, order)
            if best_key is None or key < best_key:
                best_state, best_index, best_key = state, index, key
    if best_state is None or best_index is None or best_key is None:  # (all three are set together)
        return None, exact
    ranks = [best_state[1]]
    state, index = best_state, best_index
    for s in range(n - 1):
        # (only the last segment's points have None for the next mode and the point they extend)
        _, _, _, m2, index = cast("tuple[int, int, int, int, int]", frontiers[s][state][0][index])
        ranks.append(m2)
        state = (chain.kept[s][state[1]][m2], m2)
    return (best_key, tuple(ranks)), exact


def _least_compute(chain: _Chain, budget: int, suffix_peaks: list[dict[_State, int]],
                   frontier_limit: int, bound: int | None = None) -> tuple[tuple[int, ...], bool] | None:
    """Modes of least (compute, peak, mode order) among plans of peak <= budget (one must exist), and whether
    the answer is exact; with ``bound`` (exact compute), None if no plan computes at most that.

    Passes with growing frontier limits, up to ``frontier_limit``: the first is exact when no frontier needs
    thinning (most chains); otherwise the best plan so far bounds the compute of the optimum, so the next pass
    drops every suffix that cannot beat it, and its frontiers are smaller. It stops at the first exact pass.
    A ``bound`` prunes the first pass so too."""
    prefixes = _PrefixBounds(chain, budget, suffix_peaks, _multipliers(chain))
    best = None
    limits = sorted({max(1, frontier_limit // shrink) for shrink in _PASS_SHRINK})
    for limit in limits:
        found, exact = _frontier_pass(chain, budget, prefixes, limit, bound if best is None else best[0])
        if exact and found is not None:
            return found[1], True
        if exact and bound is not None and best is None:
            return None  # (an exact pass found nothing within the bound)
        # A pass's order ranks are its own: across passes, compare the modes themselves.
        if found is not None and (best is None or (found[0][0], found[0][1], found[1]) < best):
            best = (found[0][0], found[0][1], found[1])
        if best is None and bound is None:
            raise AssertionError("no plan within a budget the least peak fits; the planner has a bug")
    if best is None:
        return None  # (only with a bound: every pass pruned every plan)
    return best[2], False


@overload
def plan_chain(costs: Iterable[SegmentCost], budget: int | None = None, *,
               frontier_limit: int = FRONTIER_LIMIT, compute_bound: None = None) -> ChainPlan: ...


@overload
def plan_chain(costs: Iterable[SegmentCost], budget: int | None = None, *,
               frontier_limit: int = FRONTIER_LIMIT, compute_bound: float) -> ChainPlan | None: ...


def plan_chain(costs: Iterable[SegmentCost], budget: int | None = None, *,
               frontier_limit: int = FRONTIER_LIMIT, compute_bound: float | None = None) -> ChainPlan | None:
    """The modes of a chain of segments: of least peak (``budget=None``), or of least extra compute with a peak
    of at most ``budget`` bytes. Ties and the model: see the module docstring.

    Each segment runs only in its allowed modes (``SegmentCost.allowed_modes``); a segment that allows none
    raises ValueError. Raises :class:`~invfx.errors.BudgetError` if no plan fits ``budget``, stating the least
    achievable peak. ``frontier_limit`` caps the planner's frontiers (see the module docstring); a plan made
    with a thinned frontier fits the budget but says ``exact=False``.

    ``compute_bound``: only a plan of at most this extra compute (seconds where :func:`timed`, else FLOPs) is
    wanted, as when another chain's plan is known: the search drops every suffix that cannot come within it
    (which can be much faster), and the result is None if no plan within the budget does. Never None without
    a bound.
    """
    costs = _check_chain(costs)
    budget = _check_budget(budget)
    if frontier_limit < 1:
        raise ValueError(f"frontier_limit must be >= 1, not {frontier_limit}")
    chain = _Chain(costs)
    suffix_peaks = _least_suffix_peaks(chain)
    least = chain.input_bytes + min(suffix_peaks[0].values())
    if budget is not None and least > budget:
        raise _budget_error(budget, least)
    # With no budget, the least peak is the budget: then least compute among the least-peak plans.
    limit = least if budget is None else budget
    bound = None
    if compute_bound is not None:
        if not (isinstance(compute_bound, (int, float)) and math.isfinite(compute_bound) and compute_bound >= 0):
            raise ValueError(f"compute_bound must be a finite number >= 0, not {compute_bound!r}")
        numerator, denominator = float(compute_bound).as_integer_ratio()
        # (exact compute is value * scale; one unit up keeps the plans whose rounded sum is the bound)
        bound = -(-numerator * chain.scale // denominator) + 1
    found = _least_compute(chain, limit, suffix_peaks, frontier_limit, bound)
    if found is None:
        return None
    choice, exact = found
    modes, levels = chain.plan(choice)
    peak = chain_peak(costs, modes, levels)
    if peak > limit:
        raise AssertionError(f"planned peak {peak} B over the budget {limit} B; the planner has a bug")
    plan = ChainPlan(modes, peak, chain_extra_flops(costs, modes, levels), plain_peak(costs), exact,
                     chain_extra_seconds(costs, modes, levels), levels)
    # (the search keeps a little slack above the bound: the plan's compute, as reported, is checked against it)
    if compute_bound is not None and \
            (plan.extra_seconds if plan.extra_seconds is not None else plan.extra_flops) > compute_bound:
        return None
    return plan


def exhaustive(costs: Iterable[SegmentCost], budget: int | None = None) -> ChainPlan:
    """The same answer as :func:`plan_chain`, by trying every plan with :func:`chain_peak`. For tests; at most
    ``EXHAUSTIVE_LIMIT`` segments."""
    costs = _check_chain(costs)
    budget = _check_budget(budget)
    if len(costs) > EXHAUSTIVE_LIMIT:
        raise ValueError(f"exhaustive search of {len(costs)} segments: at most {EXHAUSTIVE_LIMIT}")
    chain = _Chain(costs)  # validates the allowed modes
    least, best_key, best_modes = None, None, None
    best_levels: tuple[int | None, ...] = ()
    for ranks in itertools.product(*chain.allowed):
        modes, levels = chain.plan(ranks)
        peak = chain_peak(costs, modes, levels)
        least = peak if least is None else min(least, peak)
        compute = sum(chain.compute[s][rank] for s, rank in enumerate(ranks))
        if budget is None:
            key = (peak, compute, ranks)
        elif peak <= budget:
            key = (compute, peak, ranks)
        else:
            continue
        if best_key is None or key < best_key:
            best_key, best_modes, best_levels = key, modes, levels
    if best_modes is None:
        raise _budget_error(budget, least)  # type: ignore[arg-type]  # (with no budget some plan is best)
    return ChainPlan(best_modes, chain_peak(costs, best_modes, best_levels),
                     chain_extra_flops(costs, best_modes, best_levels), plain_peak(costs), True,
                     chain_extra_seconds(costs, best_modes, best_levels), best_levels)
