"""How long :func:`invfx.planner.plan_chain` takes to plan long chains of ResNet-like segments.

What it times. Chains of ``--sizes`` segments whose costs mimic a ResNet's basic blocks (batch 32, float32):
four stages of widths 64..512 at 56x56..7x7, the first block of each stage a non-invertible downsampling block,
the others invertible (RevNet-like, ``inverse_flops = flops``). Each block saves three activations of its size
besides its input and output (it starts with a conv and ends with a relu, so it saves both), needs two more in
backward and one in a forward that saves nothing. Two kinds of chain:

* ``jittered``: every size and flop count multiplied by a random factor in [0.95, 1.05] (seeded), so almost no
  two plans cost the same: the hard case for the planner's Pareto frontiers;
* ``identical``: one block repeated exactly (64 channels at 56x56), so many plans tie.

For each chain it plans with no budget (least peak) and with budgets at 0%, 10%, 25%, 50%, 90% and 100% of
the way from the least achievable peak to the all-keep peak, and reports the best of ``--repeats`` wall-clock
times, whether the plan is exact (no frontier was thinned) and the plan's peak as a fraction of the all-keep
peak. Then it times the planning step of ``invfx.optimize`` on a real traced graph of about 1,000 fx nodes
(``examples.ResNet(depth=140)``). It prints markdown tables and writes them to ``benchmarks/results/plan_speed.md``
(``--quick``: ``plan_speed_quick.md``; ``--output`` overrides); the exit status is 1 if any plan of a chain of
200 segments, or the real graph's planning, took 1 s or more, else 0.

Run it::

    .venv/bin/python benchmarks/plan_speed.py              # 200 and 1000 segments
    .venv/bin/python benchmarks/plan_speed.py --quick      # 20 and 50 segments, a second or two
    .venv/bin/python benchmarks/plan_speed.py --sizes 200,500 --repeats 5
"""

from __future__ import annotations

import argparse
import datetime
import random
import sys
import time
from pathlib import Path

from tabulate import tabulate

from invfx.argtypes import write_report
from invfx.planner import SegmentCost, plain_peak, plan_chain

RESULTS = Path(__file__).resolve().parent / "results"

LIMIT_SECONDS = 1.0
LIMITED_SIZE = 200  # the size the time limit applies to
BUDGET_FRACTIONS = (0.0, 0.1, 0.25, 0.5, 0.9, 1.0)
STAGES = ((64, 56), (128, 28), (256, 14), (512, 7))  # (channels, height = width) of a ResNet's four stages
BATCH, FLOAT_BYTES = 32, 4


def resnet_like(n: int, jitter: float, seed: int = 0) -> list[SegmentCost]:
    """``n`` ResNet-like basic blocks spread over four stages; sizes and flops scaled by 1 +- ``jitter``."""
    rng = random.Random(seed)

    def jittered(value: float) -> float:
        return value * (1 + rng.uniform(-jitter, jitter)) if jitter else value

    if jitter:
        stage_of = [min(len(STAGES) - 1, i * len(STAGES) // n) for i in range(n)]
    else:
        stage_of = [0] * n  # identical blocks: one stage
    boundary = [int(jittered(BATCH * STAGES[stage_of[0]][0] * STAGES[stage_of[0]][1] ** 2 * FLOAT_BYTES))]
    costs = []
    for i in range(n):
        channels, side = STAGES[stage_of[i]]
        size = BATCH * channels * side * side * FLOAT_BYTES
        boundary.append(int(jittered(size)))
        downsamples = i > 0 and stage_of[i] != stage_of[i - 1]
        flops = jittered(2 * 2 * 9 * channels * channels * side * side * BATCH)  # two 3x3 convs, 2 flops a MAC
        costs.append(SegmentCost(
            name=f"block{i}", input_bytes=boundary[i], output_bytes=boundary[i + 1],
            saved_bytes=int(jittered(3 * size)), transient_bytes=int(jittered(2 * size)),
            forward_transient_bytes=int(jittered(size)), saves_input=True, saves_output=True,
            flops=float(round(flops)), inverse_flops=None if downsamples else float(round(flops)),
            input_freeable=i > 0))
    return costs


def best_time(costs, budget, repeats):
    times, plan = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        plan = plan_chain(costs, budget)
        times.append(time.perf_counter() - start)
    return min(times), plan


def real_graph(depth: int) -> list[list]:
    """The planning step of ``invfx.optimize`` on a real traced graph: ``examples.ResNet(depth)`` (depth 140 is
    988 fx nodes), 4 channels on a 2x3x8x8 example. Times every ``plan_chain`` call optimize makes (with a
    budget it replans after measuring) and the whole of ``optimize`` (tracing, validation, cost measurement)."""
    import torch
    import torch.fx

    import invfx
    from invfx.examples import ResNet

    module = sys.modules["invfx.passes.pipeline"]
    calls: list[tuple[int, float]] = []
    original = module.plan_chain

    def timed(costs, budget=None, **kwargs):
        start = time.perf_counter()
        plan = original(costs, budget, **kwargs)
        calls.append((len(costs), time.perf_counter() - start))
        return plan

    torch.manual_seed(0)
    model = ResNet(depth=depth, channels=4)
    x = torch.randn(2, 3, 8, 8)
    nodes = len(torch.fx.symbolic_trace(model).graph.nodes)
    rows = []
    module.plan_chain = timed
    try:
        for budget in (None, 0.6):
            calls.clear()
            start = time.perf_counter()
            invfx.optimize(model, x, memory_budget=budget)
            total = time.perf_counter() - start
            rows.append([f"ResNet depth {depth}", nodes, calls[0][0], "none" if budget is None else budget,
                         f"{sum(seconds for _, seconds in calls):.3f}", f"{total:.1f}"])
    finally:
        module.plan_chain = original
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default=None, help="comma-separated chain lengths (default 200,1000)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per case; the best is reported")
    parser.add_argument("--quick", action="store_true", help="tiny chains (20, 50 segments), one repeat")
    parser.add_argument("--output", type=Path, help="markdown file to write (default "
                        "benchmarks/results/plan_speed.md, or plan_speed_quick.md with --quick)")
    args = parser.parse_args(argv)
    if args.output is None:
        args.output = RESULTS / ("plan_speed_quick.md" if args.quick else "plan_speed.md")
    if args.sizes:
        sizes = [int(size) for size in args.sizes.split(",")]
    else:
        sizes = [20, 50] if args.quick else [LIMITED_SIZE, 1000]
    repeats = 1 if args.quick else max(1, args.repeats)
    started = time.perf_counter()

    rows, too_slow = [], []
    for n in sizes:
        for kind, jitter in (("jittered", 0.05), ("identical", 0.0)):
            rows += chain_rows(n, kind, jitter, repeats, too_slow)
        print(f"{n} segments: done ({time.perf_counter() - started:.0f} s)", file=sys.stderr, flush=True)

    graph_rows = real_graph(depth=10 if args.quick else 140)
    too_slow += [f"{row[0]} budget {row[3]}: planning {row[4]} s" for row in graph_rows
                 if float(row[4]) >= LIMIT_SECONDS]
    lines = ["# Planning time: invfx.planner.plan_chain on ResNet-like chains, and optimize's planning step", "",
             f"best of {repeats} runs per case; a plan of {LIMITED_SIZE} segments, and the real graph's planning, "
             f"must take under {LIMIT_SECONDS:g} s", "",
             tabulate(rows, headers=["segments", "costs", "budget", "seconds", "exact", "peak / all-keep peak"],
                      tablefmt="github"), "",
             tabulate(graph_rows, headers=["model", "fx nodes", "segments", "budget", "planning (s)",
                                           "optimize total (s)"], tablefmt="github"), "",
             f"run took {time.perf_counter() - started:.0f} s on {datetime.date.today().isoformat()}"]
    failures = [f"planning {LIMITED_SIZE} segments took >= {LIMIT_SECONDS} s: " + "; ".join(too_slow)] \
        if too_slow else []
    return write_report(lines, args.output, failures)


def chain_rows(n: int, kind: str, jitter: float, repeats: int, too_slow: list[str]) -> list[list]:
    """A row per budget for one chain of ``n`` segments; a plan of the limited size that is too slow is noted in
    ``too_slow``."""
    costs = resnet_like(n, jitter)
    plain = plain_peak(costs)
    seconds, least_plan = best_time(costs, None, repeats)
    cases = [("none", seconds, least_plan)]
    for fraction in BUDGET_FRACTIONS:
        budget = least_plan.peak + int(fraction * (plain - least_plan.peak))
        seconds, plan = best_time(costs, budget, repeats)
        cases.append((f"{fraction:.0%} ({budget / 2 ** 20:.0f} MiB)", seconds, plan))
    rows = []
    for budget_label, seconds, plan in cases:
        rows.append([n, kind, budget_label, f"{seconds:.3f}", plan.exact, f"{plan.peak / plain:.3f}"])
        if n == LIMITED_SIZE and seconds >= LIMIT_SECONDS:
            too_slow.append(f"{n} {kind} budget {budget_label}: {seconds:.3f} s")
    return rows


if __name__ == "__main__":
    sys.exit(main())
