"""A plain ResNet (:class:`invfx.examples.ResNet`, nothing invertible in it) trained at memory budgets: plain
autograd, ``torch.utils.checkpoint.checkpoint_sequential``, ``torch.compile`` with
``torch._functorch.config.activation_memory_budget``, and ``invfx.optimize(..., memory_budget=...)``, all in
one process on the same weights and batch.

A budget is a fraction of the plain model's activation memory: the exact CPU peak of one plain training step
above weights, gradients and data (:func:`invfx.measure`: allocator replay of one step after a warm-up step,
``.grad`` zeroed in place). A step is ``cross_entropy(model(x), labels).backward()`` in train mode. Per budget:

* ``checkpoint``: ``checkpoint_sequential(model.blocks, k, h, use_reentrant=False)`` between the model's own
  stem and head; the first ``k - 1`` segments are recomputed, the last is not (so ``k = 1`` is plain). The peak
  of every ``k`` in ``1..depth`` is measured once; a budget takes the ``k`` with the largest peak within it
  (none within it: the smallest peak, marked over budget).
* ``torch.compile``: the model compiled afresh (``torch._dynamo.reset()``) while
  ``activation_memory_budget = budget``. Its budget is relative to what the compiled graph would save by
  default (which already recomputes cheap pointwise ops), not to the plain peak, so its peak at 1.0 may be
  below plain. Backend ``inductor``; where inductor cannot compile (no C compiler), ``aot_eager`` instead, said
  so in the table: in torch 2.13 ``aot_eager`` partitions with the same min-cut partitioner, so the budget acts
  there too (the table shows what it does).
* ``invfx``: ``invfx.optimize(model, x, memory_budget=budget)``. Where it raises ``InvfxError`` (no planner
  yet, or a budget it cannot meet) the cell says ``n/a: <message>``; it fills in by itself once it works.

Each column gets: its peak and peak / plain; its median step time / plain, timed interleaved with plain
(:func:`invfx.timing.interleaved_medians`, inside :func:`invfx.measure`); the largest relative error
``|g - g_plain| / |g_plain|`` over the parameter gradients of one step, checked against
``max(1e-4, 2 x plain's own float32 error)``, that error measured against the same step in float64 (a deep
BatchNorm network's float32 gradients are nowhere near 1e-4 of exact, and fused kernels round differently);
and whether BatchNorm's running statistics after one step equal those after one plain step (a recomputed
forward in train mode updates them a second time unless the method prevents it). Both checks start from the
same, freshly initialized state; the model's state is restored afterwards. A method that fails is a cell
with its error, not a crash.

    .venv/bin/python benchmarks/resnet_budget.py            # depth 16, channels 32, input 16x32x32x32
    .venv/bin/python benchmarks/resnet_budget.py --quick    # tiny, under a minute; compiles with aot_eager

Prints a markdown table and writes it to ``benchmarks/results/resnet_budget.md`` (``--quick``:
``resnet_budget_quick.md``; ``--output`` overrides). CPU only. ``--quick`` compiles with ``aot_eager``
(inductor's cold C++ compile alone would take most of a minute). Exit status 1 when the checkpoint or invfx
column fails its gradient check or crashes (invfx's ``n/a``, an ``InvfxError``, is not a failure);
torch.compile's errors and gradient differences are reported, not failed on (they depend on the machine's
toolchain and on inductor's fused kernels).
"""

from __future__ import annotations

import argparse
import copy
import datetime
import platform
import re
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tabulate import tabulate
from torch import nn
from torch.utils.checkpoint import checkpoint_sequential

import invfx
from invfx.argtypes import apply_profile, positive, write_report
from invfx.examples import ResNet
from invfx.memory import cpu_peak_memory, mib

RESULTS = Path(__file__).resolve().parent / "results"
BUDGETS = (1.0, 0.75, 0.5, 0.33, 0.25)
DEFAULTS = dict(depth=16, channels=32, input=(16, 32, 32, 32), repeats=5, compile_backend="inductor")
# aot_eager in --quick: inductor's C++ compile, cold, takes 10 to 20 s per budget on 2 cores, and --quick
# must stay under a minute; aot_eager runs the same partitioner, so the budget still acts
QUICK = dict(depth=4, channels=8, input=(4, 3, 16, 16), repeats=5, compile_backend="aot_eager")
GRAD_TOLERANCE = 1e-4  # the floor; the float32 noise of the model itself can be larger (see float32_noise)
CLASSES = 10


def shape(text: str) -> tuple[int, ...]:
    try:
        dims = tuple(int(d) for d in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected NxCxHxW, got {text!r}") from None
    if len(dims) != 4 or min(dims) < 1:
        raise argparse.ArgumentTypeError(f"expected four positive sizes NxCxHxW, got {text!r}")
    return dims


def budgets(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated fractions, got {text!r}") from None
    if not values or not all(0 < v <= 1 for v in values):
        raise argparse.ArgumentTypeError(f"budgets are fractions in (0, 1], got {text!r}")
    return values


# --------------------------------------------------------------------------------------------- the methods


class CheckpointedResNet(nn.Module):
    """The model's own stem, blocks and head (``ResNet.forward`` is ``head(blocks(stem(x)))``), the blocks run
    by ``checkpoint_sequential`` in ``segments`` segments."""

    def __init__(self, model: ResNet, segments: int):
        super().__init__()
        self.model = model
        self.segments = segments

    def forward(self, x):
        h = checkpoint_sequential(self.model.blocks, self.segments, self.model.stem(x), use_reentrant=False)
        return self.model.head(h)


def compiled(model: nn.Module, backend: str, budget: float, x, loss) -> nn.Module:
    """``torch.compile(model)`` compiled now, under ``activation_memory_budget = budget``: the partitioner reads
    the budget when the first forward compiles, so that step runs inside the patch; dynamo's caches are reset
    first, else the graph compiled for an earlier budget would be reused."""
    torch._dynamo.reset()
    module = torch.compile(model, backend=backend)
    with torch._functorch.config.patch(activation_memory_budget=budget):
        loss(module(x)).backward()
    return module


# --------------------------------------------------------------------------------------------- checks


def peak_of_step(module: nn.Module, x, loss) -> int:
    """The peak of :func:`invfx.measure` without its timing: warm-up step, ``.grad`` zeroed, one replayed step."""
    def step():
        loss(module(x)).backward()

    step()
    for p in module.parameters():
        p.grad.zero_()
    return cpu_peak_memory(step)[0]


def relative_error(grads, reference) -> float:
    """The largest ``|g - r| / |r|`` over pairs of gradients (Frobenius norms)."""
    return max(float((g - r).norm() / r.norm().clamp_min(1e-30)) for g, r in zip(grads, reference))


def float32_noise(model: ResNet, x, labels, start: dict) -> float:
    """How far plain float32 gradients of one step from ``start`` are from float64 ones (:func:`relative_error`).

    A method whose kernels differ from plain's (inductor's fused BatchNorm, say) is as accurate as plain when its
    gradients are within this of the float64 ones, so within twice this of plain's; a 16-block BatchNorm ResNet
    is far noisier in float32 than 1e-4."""
    reference = copy.deepcopy(model).double()
    reference.load_state_dict(start)
    state = copy.deepcopy(model.state_dict())
    try:
        grads = []
        for net, dtype in ((reference, torch.float64), (model, torch.float32)):
            net.load_state_dict(start)
            for p in net.parameters():
                p.grad = None
            F.cross_entropy(net(x.to(dtype)), labels).backward()
            grads.append([p.grad.double() for p in net.parameters()])
    finally:
        model.load_state_dict(state)
    return relative_error(grads[1], grads[0])


@dataclass
class Check:
    grad_error: float  # max over parameters of |g - g_plain| / |g_plain|
    bn_report: str  # "yes", or what differs
    tolerance: float

    @property
    def grads_ok(self) -> bool:
        return self.grad_error <= self.tolerance


def check_against_plain(model: ResNet, method: nn.Module, x, loss, start: dict, tolerance: float) -> Check:
    """One step of ``model`` and one of ``method`` from the state ``start`` (parameters, running statistics),
    ``.grad`` None before each: parameter gradients and BatchNorm buffers compared. The model's state at the
    call is restored. ``start`` should be the freshly initialized state: every measured step runs on the same
    batch, so by now the running statistics have converged to its statistics and a second update in one step
    would barely move them."""
    state = copy.deepcopy(model.state_dict())
    params = list(model.parameters())

    def one_step(module):
        model.load_state_dict(start)  # copies in place: a compiled graph keeps seeing the same tensors
        for p in params:
            p.grad = None
        loss(module(x)).backward()
        return [p.grad.clone() for p in params], {k: v.clone() for k, v in model.named_buffers()}

    try:
        plain_grads, plain_buffers = one_step(model)
        grads, buffers = one_step(method)
    finally:
        model.load_state_dict(state)
    return Check(relative_error(grads, plain_grads), compare_batchnorm(buffers, plain_buffers, start), tolerance)


def compare_batchnorm(buffers: dict, plain: dict, before: dict) -> str:
    """"yes" when every BatchNorm's running statistics after the method's step equal those after plain's,
    else how many layers counted the step more than once and how far the statistics are apart."""
    counts = [k for k in plain if k.endswith("num_batches_tracked")]
    recounted = [k for k in counts if int(buffers[k]) != int(plain[k])]
    stats = [k for k in plain if k.endswith(("running_mean", "running_var"))]
    worst = max(float((buffers[k] - plain[k]).abs().max() / plain[k].abs().max().clamp_min(1e-30)) for k in stats)
    if not recounted and worst <= 1e-4:
        return "yes"
    parts = []
    if recounted:
        k = recounted[0]
        parts.append(f"{len(recounted)} of {len(counts)} BN layers counted the step "
                     f"{int(buffers[k] - before[k])}x (plain {int(plain[k] - before[k])}x)")
    parts.append(f"running stats max rel diff {worst:.1e}")
    return "NO: " + "; ".join(parts)


# --------------------------------------------------------------------------------------------- main


def parse_args(argv=None) -> argparse.Namespace:
    d = DEFAULTS
    parser = argparse.ArgumentParser(description="A plain ResNet at memory budgets (fractions of plain's peak): "
                                     "plain, checkpoint_sequential, torch.compile with activation_memory_budget "
                                     "and invfx.optimize(memory_budget=...); peak, time, gradient and BatchNorm "
                                     "checks.")
    parser.add_argument("--depth", type=positive, help=f"residual blocks (default {d['depth']})")
    parser.add_argument("--channels", type=positive, help=f"channels of every block (default {d['channels']})")
    parser.add_argument("--input", type=shape, help="input NxCxHxW; C is the stem's input channels (default "
                        + "x".join(map(str, d["input"])) + ")")
    parser.add_argument("--budgets", type=budgets, default=BUDGETS,
                        help="comma-separated fractions of plain activation memory (default "
                        + ",".join(map(str, BUDGETS)) + ")")
    parser.add_argument("--repeats", type=positive, help=f"timed steps per pair, median (default {d['repeats']})")
    parser.add_argument("--compile-backend", help="torch.compile backend (default inductor, falling back to "
                        "aot_eager where inductor fails; --quick: aot_eager)")
    parser.add_argument("--quick", action="store_true",
                        help="tiny sizes (depth {depth}, channels {channels}, input {shape}, {repeats} repeats, "
                        "backend {compile_backend}); explicit options still win".format(
                            **QUICK, shape="x".join(map(str, QUICK["input"]))))
    parser.add_argument("--output", type=Path, help="markdown file to write (default "
                        "benchmarks/results/resnet_budget.md, or resnet_budget_quick.md with --quick)")
    args = parser.parse_args(argv)
    apply_profile(args, QUICK if args.quick else DEFAULTS)
    if args.output is None:
        args.output = RESULTS / ("resnet_budget_quick.md" if args.quick else "resnet_budget.md")
    return args


def error_text(error: BaseException, limit: int = 160) -> str:
    text = f"{type(error).__name__}: {error}".replace("\n", " ").replace("|", "/")
    return text if len(text) <= limit else text[:limit - 3] + "..."


def readme_cell(row: list) -> str:
    """One method at one budget as the README's table has it: ``peak / plain[ (over)], time / plain x, BN stats``."""
    _, _, _, peak, ratio, within, _, time_ratio, grads, bn = row
    if peak.startswith("n/a: "):
        least = re.search(r"is ([^(]*)\(\d+ B, ([0-9.]+) of plain", peak)
        if not least:
            return peak
        how = "estimated" if "estimated" in least.group(1) else "measured"
        return f"{peak[5:].split(':')[0]}: least achievable {least.group(2)} ({how})"
    if peak.startswith("failed"):
        return peak
    counted = re.search(r"(\d+) of (\d+) BN layers counted the step (\d+)x", bn)
    stats = ("BN stats right" if bn == "yes" else
             f"BN stats wrong ({counted.group(1)}/{counted.group(2)} layers updated {counted.group(3)}x)" if counted
             else f"BN stats wrong ({bn})")
    return (f"{ratio}{'' if within == 'yes' else ' (over)'}, {time_ratio}x, {stats}"
            + ("" if "over tolerance" not in grads else f", gradients off ({grads})"))


def readme_table(rows: list[list], backend: str) -> str:
    """The README's summary: a row per budget, a column per method (from the full table's rows)."""
    methods = ("checkpoint", "torch.compile", "invfx")
    cells = {(row[0], row[1]): readme_cell(row) for row in rows if row[1] in methods}
    budgets = list(dict.fromkeys(budget for budget, _ in cells))
    headers = ["budget", "`checkpoint_sequential` (best k)", f"`torch.compile` ({backend})",
               "`invfx.optimize(memory_budget=...)`"]
    return tabulate([[budget, *(cells.get((budget, m), "-") for m in methods)] for budget in budgets], headers,
                    tablefmt="github", disable_numparse=True)


def main(argv=None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()

    def progress(what: str) -> None:
        print(f"{what} ({time.perf_counter() - started:.0f} s)", file=sys.stderr, flush=True)

    torch.manual_seed(0)
    model = ResNet(depth=args.depth, channels=args.channels, classes=CLASSES, in_channels=args.input[1])
    model.train()
    initial_state = copy.deepcopy(model.state_dict())
    x = torch.randn(*args.input)
    labels = torch.randint(0, CLASSES, (args.input[0],))

    def loss(out):
        return F.cross_entropy(out, labels)

    plain = invfx.measure(model, x, steps=args.repeats, loss=loss)
    progress(f"plain: {plain}")
    noise = float32_noise(model, x, labels, initial_state)
    tolerance = max(GRAD_TOLERANCE, 2 * noise)
    progress(f"plain float32 gradients vs float64: {noise:.1e}; tolerance {tolerance:.1e}")
    segment_peaks = {k: peak_of_step(CheckpointedResNet(model, k), x, loss) for k in range(1, args.depth + 1)}
    progress("checkpoint peaks by segments: " + ", ".join(f"{k}: {mib(p)}" for k, p in segment_peaks.items()))

    headers = ["budget", "method", "setting", "peak (MiB)", "peak / plain", "within budget", "step (ms)",
               "time / plain", "grad rel error", "BN stats = 1 plain step"]
    rows = [["-", "plain", "autograd", mib(plain.peak_bytes), "1.000", "-", f"{plain.step_seconds * 1e3:.1f}",
             "1.00", "reference", "reference"]]
    failures: list[str] = []
    backend, backend_note = args.compile_backend, ""
    checkpoint_results: dict[int, tuple] = {}
    compile_peaks: dict[float, int] = {}  # budget -> peak, to say whether the budget acted at all

    def run_column(budget, method, setting, make, fatal):
        """Measure one method beside plain; a failure becomes the row's text (and a failure if ``fatal``)."""
        try:
            module = make()
            if isinstance(module, tuple):  # cached: (measurement, check)
                measured, check = module
            else:
                measured = invfx.measure(module, x, steps=args.repeats, baseline=model, loss=loss)
                check = check_against_plain(model, module, x, loss, initial_state, tolerance)
        except Exception as error:  # a method that fails is a finding, not the end of the run
            if method == "invfx" and isinstance(error, invfx.InvfxError):  # its documented "not (yet) possible"
                rows.append([budget, method, setting, f"n/a: {type(error).__name__}: {error}", "", "", "", "", "",
                             ""])
                return None
            rows.append([budget, method, setting, f"failed: {error_text(error)}", "", "", "", "", "", ""])
            if fatal:
                failures.append(f"budget {budget} {method}: {traceback.format_exc()}")
            return None
        within = measured.peak_bytes <= budget * plain.peak_bytes
        rows.append([budget, method, setting, mib(measured.peak_bytes), f"{measured.peak_ratio:.3f}",
                     "yes" if within else "no", f"{measured.step_seconds * 1e3:.1f}", f"{measured.time_ratio:.2f}",
                     f"{check.grad_error:.1e}" + ("" if check.grads_ok else " (over tolerance)"), check.bn_report])
        if fatal and not check.grads_ok:
            failures.append(f"budget {budget} {method}: gradient relative error {check.grad_error:.2e}")
        return measured, check

    for budget in args.budgets:
        target = budget * plain.peak_bytes
        fitting = [k for k, p in segment_peaks.items() if p <= target]
        k = (max(fitting, key=lambda k: (segment_peaks[k], -k)) if fitting
             else min(segment_peaks, key=segment_peaks.get))
        setting = f"k={k} segments" + ("" if fitting else " (smallest peak; none within budget)")
        if k in checkpoint_results:
            run_column(budget, "checkpoint", setting, lambda k=k: checkpoint_results[k], fatal=True)
        else:
            result = run_column(budget, "checkpoint", setting, lambda k=k: CheckpointedResNet(model, k), fatal=True)
            if result is not None:
                checkpoint_results[k] = result
        progress(f"budget {budget}: checkpoint k={k}")

        def compile_now(budget=budget):
            nonlocal backend, backend_note
            try:
                return compiled(model, backend, budget, x, loss)
            except Exception as error:
                if backend != "inductor":
                    raise
                backend_note = (f"inductor failed here ({error_text(error)}); torch.compile columns use "
                                "backend aot_eager")
                print(backend_note, file=sys.stderr)
                backend = "aot_eager"
                return compiled(model, backend, budget, x, loss)

        result = run_column(budget, "torch.compile", f"{backend}, activation_memory_budget={budget}", compile_now,
                            fatal=False)
        if result is not None:
            compile_peaks[budget] = result[0].peak_bytes
        if backend != args.compile_backend:  # the row was labelled before the fallback
            rows[-1][2] = f"{backend}, activation_memory_budget={budget}"
        torch._dynamo.reset()
        progress(f"budget {budget}: torch.compile")

        run_column(budget, "invfx", f"optimize(memory_budget={budget})",
                   lambda budget=budget: invfx.optimize(model, x, memory_budget=budget), fatal=True)
        progress(f"budget {budget}: invfx")

    table = tabulate(rows, headers=headers, tablefmt="github", disable_numparse=True)
    n, c, h, w = args.input
    config = (f"ResNet depth {args.depth}, channels {args.channels}, input {n}x{c}x{h}x{w} (every block's "
              f"activation {n}x{args.channels}x{h}x{w}, {mib(4 * n * args.channels * h * w)} MiB), float32, "
              f"train mode; step = `cross_entropy(model(x), labels).backward()`; peak = exact CPU peak of one "
              f"step above weights, grads and data (`invfx.measure`: allocator replay after a warm-up step); "
              f"time = median of {args.repeats} steps interleaved with plain; torch {torch.__version__}, "
              f"{torch.get_num_threads()} threads, {platform.machine()}; invfx {invfx.__version__}")
    notes = [
        "budget: a fraction of plain's peak; `within budget`: peak <= budget x plain peak.",
        "checkpoint: `checkpoint_sequential(model.blocks, k, h, use_reentrant=False)`, the first k-1 segments "
        "recomputed; k chosen as the one with the largest measured peak within the budget. Peaks by k: "
        + ", ".join(f"k={k}: {mib(p)} MiB ({p / plain.peak_bytes:.3f})" for k, p in segment_peaks.items()) + ".",
        "torch.compile: compiled afresh per budget with `torch._functorch.config.activation_memory_budget`; that "
        "budget is relative to the compiled graph's default saved activations, not to plain's peak.",
        "grad rel error: max over parameters of |g - g_plain| / |g_plain| after one step from the freshly "
        f"initialized state. Plain's own float32 gradients are {noise:.1e} from float64 ones (same step), so the "
        f"tolerance is max({GRAD_TOLERANCE:g}, 2 x that) = {tolerance:.1e}: a method as accurate as plain in "
        "float32 is within it (checkpoint reruns plain's kernels: 0 expected). BN stats: running_mean/var (rel diff "
        "<= 1e-4) and num_batches_tracked after one step, against one plain step from the same state.",
    ]
    if backend_note:
        notes.append(backend_note)
    if len(compile_peaks) > 1:
        low, high = min(compile_peaks.values()), max(compile_peaks.values())
        notes.append(f"activation_memory_budget under {backend}: " + (
            "no effect on the measured peak at these budgets." if low == high else
            f"it acted: peaks from {low / plain.peak_bytes:.3f} to {high / plain.peak_bytes:.3f} of plain "
            "across the budgets (" + ", ".join(f"{b}: {p / plain.peak_bytes:.3f}" for b, p in compile_peaks.items())
            + ")."))
    lines = ["# A plain ResNet at memory budgets: checkpoint_sequential, torch.compile, invfx", "", config, "",
             table, "", *(f"- {note}" for note in notes), "",
             "In the README's form (peak / plain, time / plain, BatchNorm statistics against one plain step):", "",
             readme_table(rows, backend), "",
             f"run took {time.perf_counter() - started:.0f} s on {datetime.date.today().isoformat()}"]
    return write_report(lines, args.output, failures)


if __name__ == "__main__":
    sys.exit(main())
