"""Peak memory and step time of one training step of a chain of invertible couplings, by depth and mode.

What it measures. A chain of N hand-written additive couplings (``y = cat(x2, x1 + F(x2))``, from
``invfx.demo``, ``F`` a two-layer MLP) in an :class:`invfx.nn.InvertibleSequential`, for each N in
``--depths``, trained in three modes set on
every block (the container's own flags are left alone):

* ``plain``: ``block.checkpoint = False``, ordinary autograd; activations grow linearly with N;
* ``checkpoint``: ``block.invertible = False``; each block keeps its input and recomputes in backward, so the
  chain still keeps one tensor per block;
* ``invertible``: the default (``checkpoint=True, invertible=True``); each block keeps only its output and
  rebuilds its input with the inverse, so memory should be flat in N.

For each depth and mode, one training step ``loss = chain(x).sum(); loss.backward()``:

* peak memory: exact CPU peak bytes allocated above the start of the step, by replaying every allocation of
  ``torch.profiler`` (:func:`invfx.memory.cpu_peak_memory`). A warm-up step runs first, so the parameters'
  ``.grad`` already exist (they are zeroed in place, not set to None) and the input batch is made before the
  measurement: the figure is the step's activations and temporaries, not weights, grads or data;
* step time: median over ``--repeats`` steps, timed outside the profiler, with the modes interleaved in one
  process (one chain per depth, the flags switched between steps), reported in ms and as a ratio to plain.

It prints a markdown table, writes it to ``benchmarks/results/chain_memory.md`` (``--quick`` writes
``chain_memory_quick.md`` instead, so a smoke test does not overwrite real results), prints
peak(deepest)/peak(shallowest) per mode, and checks at the smallest depth that the invertible and checkpoint
chains give the same outputs and gradients as plain autograd on the same weights (float32, rtol 1e-4,
atol 1e-5). The exit status is 1 if the invertible ratio exceeds 1.1 (the goal: memory flat in depth) or a
gradient check fails, else 0.

Run it::

    make bench                                   # = .venv/bin/python benchmarks/chain_memory.py
    .venv/bin/python benchmarks/chain_memory.py --quick            # tiny sizes, a few seconds
    .venv/bin/python benchmarks/chain_memory.py --depths 4,16,64 --width 512 --batch 256 --repeats 3

The defaults (width 1024, batch 512, hidden = width, depths 4..64, 5 repeats) take a couple of minutes on two
CPU cores. Kineto may print ``USDT: ... profiler_start`` lines to stderr; they are harmless.
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
from torch import nn

import invfx
import invfx.nn as inn
from invfx.argtypes import apply_profile, depths, even, positive, write_report
from invfx.demo import AdditiveCoupling
from invfx.memory import cpu_peak_memory, mib
from invfx.timing import interleaved_medians

MODES = ("plain", "checkpoint", "invertible")
GOAL_RATIO = 1.1
RTOL, ATOL = 1e-4, 1e-5
RESULTS = Path(__file__).resolve().parent / "results"

FULL = dict(depths=(4, 8, 16, 32, 64), width=1024, batch=512, repeats=5)
QUICK = dict(depths=(4, 8, 16, 32, 64), width=64, batch=32, repeats=3)


def build_chain(depth: int, width: int, hidden: int, seed: int = 0) -> inn.InvertibleSequential:
    torch.manual_seed(seed)
    return inn.InvertibleSequential(*[AdditiveCoupling(width, hidden) for _ in range(depth)])


def set_mode(chain: inn.InvertibleSequential, mode: str) -> None:
    """Set the flags of every block (not of the container) for ``mode``."""
    for block in chain:
        block.checkpoint = True  # back to the defaults first: checkpoint=False clears invertible
        block.invertible = True
        if mode == "plain":
            block.checkpoint = False
        elif mode == "checkpoint":
            block.invertible = False
        elif mode != "invertible":
            raise ValueError(f"unknown mode {mode!r}")


def zero_grads(chain: nn.Module) -> None:
    for p in chain.parameters():
        if p.grad is not None:
            p.grad.zero_()


def step(chain: nn.Module, x: torch.Tensor) -> None:
    loss = chain(x).sum()
    loss.backward()


def measure_peak(chain: inn.InvertibleSequential, x: torch.Tensor, mode: str) -> int:
    set_mode(chain, mode)
    zero_grads(chain)
    step(chain, x)  # warm-up: every parameter has its .grad before the measured step
    zero_grads(chain)
    peak, _ = cpu_peak_memory(lambda: step(chain, x))
    return peak


def measure_times(chain: inn.InvertibleSequential, x: torch.Tensor, repeats: int) -> dict[str, float]:
    """Median seconds of one step per mode; the modes are interleaved (and rotated) in every round."""
    def prepare(mode):
        set_mode(chain, mode)
        zero_grads(chain)

    return interleaved_medians({mode: lambda: step(chain, x) for mode in MODES}, repeats, prepare)


def check_gradients(depth: int, width: int, hidden: int, batch: int) -> dict[str, dict]:
    """Outputs, parameter grads and input grad of each mode vs plain autograd, on the same weights and input.

    The other modes run with their parameters' .grad already allocated (zeroed), as in the benchmark, so this
    also checks that the gradient is accumulated once.
    """
    chain = build_chain(depth, width, hidden, seed=1)
    torch.manual_seed(2)
    data = torch.randn(batch, width)
    results = {}
    reference = None
    for mode in MODES:
        set_mode(chain, mode)
        zero_grads(chain)
        x = data.clone().requires_grad_(True)
        out = chain(x)
        out.sum().backward()
        got = (out.detach().clone(), [p.grad.clone() for p in chain.parameters()], x.grad.clone())
        input_intact = torch.equal(x.detach(), data)
        if reference is None:
            reference = got
            continue
        pairs = [(got[0], reference[0])] + list(zip(got[1], reference[1])) + [(got[2], reference[2])]
        results[mode] = dict(
            outputs=torch.allclose(got[0], reference[0], rtol=RTOL, atol=ATOL),
            param_grads=all(torch.allclose(a, b, rtol=RTOL, atol=ATOL) for a, b in zip(got[1], reference[1])),
            input_grad=torch.allclose(got[2], reference[2], rtol=RTOL, atol=ATOL),
            input_intact=input_intact,
            max_abs_diff=max(float((a - b).abs().max()) for a, b in pairs),
        )
    return results


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Exact CPU peak memory and step time of one training step of a chain of invertible "
                    "couplings, in plain / checkpoint / invertible mode.")
    parser.add_argument("--depths", type=depths, help=f"comma-separated chain depths (default "
                        f"{','.join(map(str, FULL['depths']))})")
    parser.add_argument("--width", type=even, help=f"features per sample (default {FULL['width']})")
    parser.add_argument("--hidden", type=positive, help="hidden width of each coupling's MLP (default: width)")
    parser.add_argument("--batch", type=positive, help=f"batch size (default {FULL['batch']})")
    parser.add_argument("--repeats", type=positive, help=f"timed steps per mode and depth, median reported "
                        f"(default {FULL['repeats']})")
    parser.add_argument("--quick", action="store_true", help="tiny sizes for a smoke test (width "
                        f"{QUICK['width']}, batch {QUICK['batch']}, {QUICK['repeats']} repeats); explicit "
                        "options still win")
    parser.add_argument("--output", type=Path, help="markdown file to write (default "
                        "benchmarks/results/chain_memory.md, or chain_memory_quick.md with --quick)")
    args = parser.parse_args(argv)
    apply_profile(args, QUICK if args.quick else FULL)
    if args.hidden is None:
        args.hidden = args.width
    if args.output is None:
        args.output = RESULTS / ("chain_memory_quick.md" if args.quick else "chain_memory.md")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    torch.manual_seed(0)

    rows, peaks = [], {mode: {} for mode in MODES}
    for depth in args.depths:
        chain = build_chain(depth, args.width, args.hidden)
        x = torch.randn(args.batch, args.width)
        depth_peaks = {mode: measure_peak(chain, x, mode) for mode in MODES}
        depth_times = measure_times(chain, x, args.repeats)
        for mode in MODES:
            peaks[mode][depth] = depth_peaks[mode]
            rows.append([depth, mode, f"{depth_peaks[mode]:,}", mib(depth_peaks[mode]),
                         f"{depth_peaks[mode] / depth_peaks['plain']:.3f}",
                         f"{depth_times[mode] * 1e3:.1f}", f"{depth_times[mode] / depth_times['plain']:.2f}"])
        print(f"depth {depth}: done ({time.perf_counter() - started:.0f} s)", file=sys.stderr, flush=True)
        del chain, x

    headers = ["depth", "mode", "peak (bytes)", "peak (MiB)", "peak / plain", "step (ms)", "time / plain"]
    table = tabulate(rows, headers=headers, tablefmt="github", disable_numparse=True,
                     colalign=("right", "left") + ("right",) * 5)

    low, high = min(args.depths), max(args.depths)
    ratios = {mode: peaks[mode][high] / peaks[mode][low] for mode in MODES}
    ratio_line = f"peak({high}) / peak({low}): " + ", ".join(f"{m} {ratios[m]:.3f}" for m in MODES)

    checks = check_gradients(low, args.width, args.hidden, args.batch)
    check_lines = []
    for mode, c in checks.items():
        ok = c["outputs"] and c["param_grads"] and c["input_grad"] and c["input_intact"]
        check_lines.append(
            f"{mode} vs plain at depth {low} (rtol {RTOL:g}, atol {ATOL:g}): outputs {c['outputs']}, "
            f"parameter grads {c['param_grads']}, input grad {c['input_grad']}, input left intact "
            f"{c['input_intact']} (max abs diff {c['max_abs_diff']:.2e}) -> {'OK' if ok else 'MISMATCH'}")
    grads_ok = all(c["outputs"] and c["param_grads"] and c["input_grad"] and c["input_intact"]
                   for c in checks.values())

    goal_met = ratios["invertible"] <= GOAL_RATIO
    goal_line = (f"goal (invertible peak({high}) / peak({low}) <= {GOAL_RATIO}): "
                 f"{'met' if goal_met else 'NOT MET'} ({ratios['invertible']:.3f})")
    elapsed = time.perf_counter() - started

    activation = args.batch * args.width * 4
    config = (f"width {args.width}, hidden {args.hidden}, batch {args.batch}, float32; one activation "
              f"{mib(activation)} MiB; step = `chain(x).sum().backward()`; time = median of {args.repeats}; "
              f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.machine()}; "
              f"invfx {invfx.__version__}")
    lines = ["# Chain of additive couplings: peak memory and step time of one training step", "",
             config, "", table, "", ratio_line, goal_line, *check_lines, "",
             f"run took {elapsed:.0f} s on {datetime.date.today().isoformat()}"]
    failures = ([] if goal_met else [f"invertible peak ratio {ratios['invertible']:.3f} > {GOAL_RATIO}"]) + \
        ([] if grads_ok else ["a mode's outputs or gradients differ from plain autograd"])
    return write_report(lines, args.output, failures)


if __name__ == "__main__":
    sys.exit(main())
