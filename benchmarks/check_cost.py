"""What ``invfx.optimize``'s gradient check costs (``check_gradients=True``, the default; ``invfx/check.py``).

For each model: the time ``optimize`` takes with the check and without it (medians of ``--repeats`` runs, the
two interleaved), the check's own time as the plan reports it, the dtype it ran in, and one plain training step
of the model at the same size for scale. The check deep-copies the model (in float64 where that fits) and runs
one plain and one optimized training step on the example inputs. Plans are weighed in FLOPs
(``OptimizeOptions(compute="flops")``): the same plan in every run, so that the runs compare the check alone (a
plan weighed in measured time can differ from run to run, and a toy ResNet's budget once failed its measured
check that way under a loaded test suite).

    .venv/bin/python benchmarks/check_cost.py            # the README's sizes
    .venv/bin/python benchmarks/check_cost.py --quick    # tiny sizes
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from tabulate import tabulate

import invfx
from invfx.examples import Glow, ResNet, ReversibleTransformer, RevNetMLP


def models(quick: bool):
    """(name, model, example input, memory_budget)."""
    torch.manual_seed(0)
    if quick:
        return [("coupling stack", RevNetMLP(depth=4, width=16, hidden=16), torch.randn(8, 16), None),
                ("ResNet", ResNet(depth=4, channels=4), torch.randn(2, 3, 8, 8), 0.75)]
    return [("coupling stack, depth 32, width 256", RevNetMLP(depth=32, width=256, hidden=256),
             torch.randn(256, 256), None),
            ("Glow-style flow, 2 levels x 8 steps", Glow(channels=3, levels=2, depth=8, hidden=32),
             torch.randn(16, 3, 32, 32), None),
            ("two-stream transformer, depth 8", ReversibleTransformer(features=16, dim=64, depth=8),
             torch.randn(32, 64, 16), None),
            ("ResNet, depth 16, budget 0.5", ResNet(depth=16, channels=16), torch.randn(32, 3, 32, 32), 0.5)]


def plain_step_seconds(model, x) -> float:
    times = []
    for _ in range(3):
        model.zero_grad(set_to_none=True)
        start = time.perf_counter()
        out = model(x)
        (out if isinstance(out, torch.Tensor) else out[0]).float().pow(2).mean().backward()
        times.append(time.perf_counter() - start)
    model.zero_grad(set_to_none=True)
    return statistics.median(times)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args(argv)
    repeats = args.repeats or (1 if args.quick else 3)
    rows = []
    options = invfx.OptimizeOptions(compute="flops")
    for name, model, x, budget in models(args.quick):
        print(f"check_cost: {name}", file=sys.stderr, flush=True)
        with_check, without, check_seconds, dtype = [], [], [], None
        # (warm-up: first calls pay for lazy imports and caches)
        invfx.optimize(model, x, memory_budget=budget, options=options)
        for _ in range(repeats):
            for check in (True, False):
                start = time.perf_counter()
                optimized = invfx.optimize(model, x, memory_budget=budget, check_gradients=check, options=options)
                (with_check if check else without).append(time.perf_counter() - start)
                if check:
                    check_seconds.append(optimized.plan.gradient_check.seconds)
                    dtype = str(optimized.plan.gradient_check.dtype).replace("torch.", "")
        step = plain_step_seconds(model, x)
        on, off, own = statistics.median(with_check), statistics.median(without), statistics.median(check_seconds)
        rows.append([name, f"{off:.2f}", f"{on:.2f}", f"{on / off:.2f}x", f"{own:.2f}", dtype,
                     f"{own / step:.1f}"])
    headers = ["model", "optimize, no check (s)", "optimize, with check (s)", "ratio", "the check (s)",
               "check dtype", "check / one plain step"]
    table = tabulate(rows, headers, tablefmt="github")
    report = (f"## The gradient check's cost\n\ntorch {torch.__version__}, {torch.get_num_threads()} threads, "
              f"medians of {repeats} interleaved runs\n\n{table}\n")
    print(report)
    if args.output is not None:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
