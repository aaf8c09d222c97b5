"""invfx.optimize on the three plainly written models: exact CPU peak of one training step at two depths,
plain autograd against the optimized model, and the optimized model's error against plain in float32.

Goals (issue 4): peak(deep) / peak(shallow) <= 1.05 for the coupling MLP, <= 1.2 for the Glow-style flow and
the two-stream transformer; relative error of outputs and gradients <= 1e-4 in float32 at the deep depth.

    .venv/bin/python benchmarks/optimize_depth.py            # depths 8, 16 and 32

It writes the markdown table to ``benchmarks/results/optimize_depth.md`` and, where matplotlib is installed (the
``notebooks`` extra), the memory-vs-depth plot to ``optimize_depth.png`` (``--quick``: ``*_quick.*``).
    .venv/bin/python benchmarks/optimize_depth.py --quick    # small sizes, seconds
"""

from __future__ import annotations

import argparse
import datetime
import platform
import sys
import time
from pathlib import Path

import torch
from tabulate import tabulate

import invfx
from invfx.argtypes import depths, write_report
from invfx.examples import Glow, RevNetMLP, ReversibleTransformer
from invfx.memory import cpu_peak_memory

RESULTS = Path(__file__).resolve().parent / "results"
GOALS = {"coupling MLP": 1.05, "Glow-style flow": 1.2, "two-stream transformer": 1.2}


def models(quick: bool):
    if quick:
        return {
            "coupling MLP": (lambda d: RevNetMLP(depth=d, width=32, hidden=32), lambda: torch.randn(16, 32)),
            "Glow-style flow": (lambda d: Glow(channels=3, levels=2, depth=max(1, d // 2), hidden=8),
                                lambda: torch.randn(2, 3, 8, 8)),
            "two-stream transformer": (lambda d: ReversibleTransformer(features=8, dim=16, depth=d, heads=2,
                                                                       hidden=32), lambda: torch.randn(2, 8, 8)),
        }
    return {
        "coupling MLP": (lambda d: RevNetMLP(depth=d, width=512, hidden=512), lambda: torch.randn(256, 512)),
        "Glow-style flow": (lambda d: Glow(channels=3, levels=2, depth=max(1, d // 2), hidden=64),
                            lambda: torch.randn(16, 3, 32, 32)),
        "two-stream transformer": (lambda d: ReversibleTransformer(features=32, dim=128, depth=d, heads=4,
                                                                   hidden=256), lambda: torch.randn(16, 64, 32)),
    }


def step_peak(model, x) -> int:
    for _ in range(2):  # every .grad allocated, then zeroed in place: the step's own memory is measured
        model(x).sum().backward()
        for p in model.parameters():
            p.grad.zero_()
    return cpu_peak_memory(lambda: model(x).sum().backward())[0]


def relative_error(model, optimized, x) -> float:
    params = list(model.parameters())
    results = []
    for net in (optimized, model):
        for p in params:
            p.grad = None
        torch.manual_seed(0)
        out = net(x)
        out.pow(2).mean().backward()
        results.append([out.detach()] + [p.grad.clone() for p in params])
    return max(float((a - b).norm() / b.norm().clamp_min(1e-30)) for a, b in zip(*results))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depths", type=depths, default=(8, 16, 32))
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    rows, failures, curves = [], [], {}
    shallow, deep = min(args.depths), max(args.depths)
    for name, (build, data) in models(args.quick).items():
        torch.manual_seed(0)
        x = data()
        peaks = {}
        for depth in args.depths:
            model = build(depth)
            optimized = invfx.optimize(model, x)
            peaks[depth] = (step_peak(optimized, x), step_peak(model, x))
            if depth == deep:
                error = relative_error(model, optimized, x)
            print(f"{name} depth {depth}: done ({time.perf_counter() - started:.0f} s)", file=sys.stderr)
        curves[name] = peaks
        ratio = peaks[deep][0] / peaks[shallow][0]
        for depth in args.depths:
            rows.append([name, depth, f"{peaks[depth][1] / 2**20:.2f}", f"{peaks[depth][0] / 2**20:.2f}",
                         f"{peaks[depth][0] / peaks[depth][1]:.3f}"])
        ok = ratio <= GOALS[name] and error <= 1e-4
        rows.append([name, f"{deep}/{shallow}", "", f"ratio {ratio:.3f} (goal <= {GOALS[name]})",
                     f"float32 error {error:.1e}" + ("" if ok else "  FAILS")])
        if not ok:
            failures.append(name)
    table = tabulate(rows, ["model", "depth", "plain peak (MiB)", "invfx peak (MiB)", "invfx / plain"],
                     tablefmt="github", disable_numparse=True)
    text = "\n".join([
        "# invfx.optimize: peak memory of one training step by depth", "",
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.machine()}; exact CPU peak "
        "(allocation replay) above weights, grads and data", "", table, "",
        f"run took {time.perf_counter() - started:.0f} s on {datetime.date.today().isoformat()}"])
    stem = "optimize_depth_quick" if args.quick else "optimize_depth"
    status = write_report([text], RESULTS / f"{stem}.md", [f"{name} misses its goal" for name in failures])
    plot(curves, RESULTS / f"{stem}.png")
    return status


def plot(curves: dict[str, dict[int, tuple[int, int]]], path: Path) -> None:
    """Peak MiB against depth, plain and invfx, a panel per model (skipped, with a note, without matplotlib)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("no plot: matplotlib is not installed (pip install -e '.[notebooks]')", file=sys.stderr)
        return
    figure, axes = plt.subplots(1, len(curves), figsize=(4 * len(curves), 3.4))
    for ax, (name, peaks) in zip(axes, curves.items()):
        depths_ = sorted(peaks)
        ax.plot(depths_, [peaks[d][1] / 2**20 for d in depths_], "o-", label="plain autograd")
        ax.plot(depths_, [peaks[d][0] / 2**20 for d in depths_], "o-", label="invfx.optimize")
        ax.set_title(name)
        ax.set_xlabel("depth")
        ax.set_ylabel("peak of one training step (MiB)")
        ax.set_ylim(bottom=0)
    axes[0].legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    print(f"plot written to {path}")


if __name__ == "__main__":
    sys.exit(main())
