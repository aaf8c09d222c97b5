"""Two plain models, a ResNet and a transformer (:class:`invfx.examples.ResNet`, :class:`invfx.examples.Transformer`,
nothing invertible in either), trained at memory budgets: plain autograd,
``torch.utils.checkpoint.checkpoint_sequential``, ``torch.utils.checkpoint.checkpoint`` per block,
``torch.compile`` with ``torch._functorch.config.activation_memory_budget``, and
``invfx.optimize(..., memory_budget=...)``, all in one process, each model on its own fixed weights and batch.

The models (``--model resnet|transformer|both``, default both; a section of the report each):

* ResNet: ``stem`` (3x3 conv, BatchNorm, ReLU), ``depth`` residual blocks (two 3x3 convs with BatchNorm, ReLU)
  in the ``nn.Sequential`` ``blocks``, ``head`` (average pool, linear). Defaults: depth 16, channels 32, input
  16x32x32x32.
* Transformer: ``embed`` (linear from the input's features), ``depth`` pre-norm blocks (LayerNorm, attention by
  ``scaled_dot_product_attention``, LayerNorm, Linear-GELU-Linear MLP; dropout on both residual branches) in the
  ``nn.Sequential`` ``blocks``, then ``head(norm(h).mean(dim=1))``. Defaults: features 32, dim 128, depth 8,
  heads 4, MLP hidden 512, dropout 0.1, input 16x128x32 (batch x tokens x features), sized so that its section
  takes roughly as long as the ResNet's (a plain step took 0.8 of the default ResNet's, one thread, 2-core VM).
  Dropout stays on so that every method's recomputation must replay the forward's random masks.

Both forwards are ``after(blocks(before(x)))`` (ResNet: ``stem``, ``blocks``, ``head``; transformer: ``embed``,
``blocks``, ``head(norm(h).mean(dim=1))``); the checkpoint columns run the model's own ``before`` and
``after`` around checkpointed blocks (:class:`Checkpointed`).

A budget is a fraction of the plain model's activation memory: the exact CPU peak of one plain training step
above weights, gradients and data (:func:`invfx.measure`: allocator replay of one step after a warm-up step,
``.grad`` zeroed in place). A step is ``cross_entropy(model(x), labels).backward()`` in train mode. Per budget:

* ``checkpoint``: ``checkpoint_sequential(model.blocks, k, h, use_reentrant=False)`` between the model's own
  ``before`` and ``after``; the first ``k - 1`` segments are recomputed, the last is not (so ``k = 1`` is plain).
  The peak of every ``k`` in ``1..depth`` is measured once; a budget takes the ``k`` with the largest peak
  within it (none within it: the smallest peak, marked over budget).
* ``per-block checkpoint``: ``checkpoint(block, h, use_reentrant=False)`` on each of the first ``n`` blocks
  separately, the others run plainly (so ``n = 0`` is plain). The peak of every ``n`` in ``0..depth`` is
  measured once; a budget takes ``n`` as the ``checkpoint`` column takes ``k``.
* ``torch.compile``: the model compiled afresh (``torch._dynamo.reset()``) while
  ``activation_memory_budget = budget``. Its budget is relative to what the compiled graph would save by
  default (which already recomputes cheap pointwise ops), not to the plain peak, so its peak at 1.0 may be
  below plain. Backend ``inductor``; where inductor cannot compile (no C compiler), ``aot_eager`` instead, said
  so in the table: in torch 2.13 ``aot_eager`` partitions with the same min-cut partitioner, so the budget acts
  there too (the table shows what it does). Compiled with ``torch._inductor.config.fallback_random = True``:
  inductor then draws dropout masks with eager's random ops, the same draws as plain's at the same seed, so
  its gradients can be compared with plain's (its own generator would give other masks; no effect on the
  ResNet, which draws nothing). Where a budget makes the partitioner recompute dropout in the backward graph,
  that recomputation draws new masks and the gradients differ: a note in the report says so.
* ``invfx``: ``invfx.optimize(model, x, memory_budget=budget)``. Where it raises ``InvfxError`` (no planner
  yet, or a budget it cannot meet) the cell says ``n/a: <message>``; it fills in by itself once it works.

Each column gets: its peak and peak / plain; its step time / plain, the median over rounds of its step's time
over plain's in the same round, every method of the budget and plain timed together in one round-robin
(:func:`invfx.timing.interleaved_times`; timing each method beside plain alone let the machine's drift between
pairs decide which of two close methods looked faster); the largest relative error
``|g - g_plain| / |g_plain|`` over the parameter gradients of one step, checked against
``max(1e-4, 2 x plain's own float32 error)``, that error measured against the same step in float64 (a deep
BatchNorm network's float32 gradients are nowhere near 1e-4 of exact, and fused kernels round differently);
and whether BatchNorm's running statistics after one step equal those after one plain step (a recomputed
forward in train mode updates them a second time unless the method prevents it; the transformer has no
BatchNorm: ``no BN``). Both checks start from the same, freshly initialized state and the same RNG seed
(``torch.manual_seed(CHECK_SEED)`` right before each compared step, float64 one included), so the transformer's
dropout draws the same masks in plain's step and the method's: a method that replays them in its recomputation
(checkpoint restores the RNG state, invfx replays it) matches plain exactly. The model's state is restored
afterwards. A method that fails is a cell with its error, not a crash.

    .venv/bin/python benchmarks/resnet_budget.py                    # both models at the sizes above
    .venv/bin/python benchmarks/resnet_budget.py --model transformer
    .venv/bin/python benchmarks/resnet_budget.py --quick            # tiny, one thread, aot_eager: about 25 s

Prints a markdown report, a section per model (its config, the full table, notes, and the README's form: a row
per budget, a column per method), and writes it to ``benchmarks/results/resnet_budget.md`` (``--quick``:
``resnet_budget_quick.md``; ``--output`` overrides). Beside it, where matplotlib is installed (the
``notebooks`` extra), a PNG per model, ``<report stem>_<model>.png`` (``resnet_budget_resnet.png``,
``resnet_budget_quick_transformer.png``, ...): step time / plain against peak / plain, a line per tool through
its budgets (checkpoint_sequential, per-block checkpoint, torch.compile, invfx; hollow markers over budget),
plain the point (1, 1), the budgets dashed; without matplotlib a note instead. CPU only. ``--quick`` compiles
with ``aot_eager`` (inductor's cold C++ compile alone would take most of a minute) and runs one torch thread
(``--threads``; on a busy 2-core machine two threads spin-wait for each other). Exit status 1 when the
checkpoint, per-block checkpoint or invfx column fails its gradient check or crashes (invfx's ``n/a``, an
``InvfxError``, is not a failure); torch.compile's errors and gradient differences are reported, not failed on
(they depend on the machine's toolchain, on inductor's fused kernels and, with dropout, on what the partitioner
recomputes).
"""

from __future__ import annotations

import argparse
import copy
import datetime
import platform
import re
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from tabulate import tabulate
from torch import nn
from torch.utils.checkpoint import checkpoint, checkpoint_sequential

import invfx
from invfx.argtypes import apply_profile, positive, write_report
from invfx.examples import ResNet, Transformer
from invfx.memory import cpu_peak_memory, mib
from invfx.timing import interleaved_times

RESULTS = Path(__file__).resolve().parent / "results"
BUDGETS = (1.0, 0.75, 0.5, 0.33, 0.25)
MODELS = ("resnet", "transformer")
DEFAULTS = dict(depth=16, channels=32, input=(16, 32, 32, 32), transformer_depth=8, transformer_dim=128,
                transformer_heads=4, transformer_hidden=512, transformer_input=(16, 128, 32), dropout=0.1,
                repeats=9, compile_backend="inductor", threads=None)
# aot_eager in --quick: inductor's C++ compile, cold, takes 10 to 20 s per budget on 2 cores, and --quick
# must stay under a minute; aot_eager runs the same partitioner, so the budget still acts
QUICK = dict(depth=4, channels=8, input=(4, 3, 16, 16), transformer_depth=4, transformer_dim=16,
             transformer_heads=2, transformer_hidden=32, transformer_input=(4, 16, 8), dropout=0.1, repeats=5,
             compile_backend="aot_eager", threads=1)
GRAD_TOLERANCE = 1e-4  # the floor; the float32 noise of the model itself can be larger (see float32_noise)
CHECK_SEED = 1234  # torch.manual_seed before every compared step: the same dropout masks for plain and method
CLASSES = 10
METHODS = ("checkpoint", "per-block checkpoint", "torch.compile", "invfx")


def dims(count: int, letters: str):
    """An argparse type for ``count`` positive sizes written ``AxBx...`` (``letters`` names them in errors)."""

    def parse(text: str) -> tuple[int, ...]:
        try:
            values = tuple(int(d) for d in text.lower().split("x"))
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {letters}, got {text!r}") from None
        if len(values) != count or min(values) < 1:
            raise argparse.ArgumentTypeError(f"expected {count} positive sizes {letters}, got {text!r}")
        return values

    return parse


shape = dims(4, "NxCxHxW")
tokens_shape = dims(3, "NxTxF")


def budgets(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated fractions, got {text!r}") from None
    if not values or not all(0 < v <= 1 for v in values):
        raise argparse.ArgumentTypeError(f"budgets are fractions in (0, 1], got {text!r}")
    return values


def dropout_rate(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a fraction in [0, 1), got {text!r}") from None
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"dropout is a fraction in [0, 1), got {text!r}")
    return value


# --------------------------------------------------------------------------------------------- the models


def parts(model: nn.Module) -> tuple[Callable, nn.Sequential, Callable]:
    """``(before, blocks, after)`` with ``model(x) == after(blocks(before(x)))``: ResNet ``stem``, ``blocks``,
    ``head``; Transformer ``embed``, ``blocks``, ``head(norm(h).mean(dim=1))``."""
    if isinstance(model, ResNet):
        return model.stem, model.blocks, model.head
    if isinstance(model, Transformer):
        return model.embed, model.blocks, lambda h: model.head(model.norm(h).mean(dim=1))
    raise TypeError(f"no before/blocks/after split known for {type(model).__name__}")


@dataclass
class Workload:
    """One model of the run: its fixed weights and batch, how to describe it, and its results."""

    name: str  # "resnet" or "transformer": --model and the PNG's name
    title: str
    model: nn.Module
    x: torch.Tensor
    labels: torch.Tensor
    config: str
    has_batchnorm: bool
    points: dict[str, list[tuple[float, float, float, bool]]] = field(default_factory=dict)  # tool -> points

    @property
    def depth(self) -> int:
        return len(self.model.blocks)

    def loss(self, out):
        return F.cross_entropy(out, self.labels)


def make_workload(name: str, args: argparse.Namespace) -> Workload:
    torch.manual_seed(0)
    if name == "resnet":
        n, c, h, w = args.input
        model = ResNet(depth=args.depth, channels=args.channels, classes=CLASSES, in_channels=c)
        x = torch.randn(*args.input)
        config = (f"ResNet depth {args.depth}, channels {args.channels}, input {n}x{c}x{h}x{w} (every block's "
                  f"activation {n}x{args.channels}x{h}x{w}, {mib(4 * n * args.channels * h * w)} MiB)")
        title, has_batchnorm = "ResNet", True
    else:
        n, t, f = args.transformer_input
        d = args.transformer_dim
        model = Transformer(features=f, dim=d, depth=args.transformer_depth, heads=args.transformer_heads,
                            hidden=args.transformer_hidden, classes=CLASSES, dropout=args.dropout)
        x = torch.randn(*args.transformer_input)
        config = (f"Transformer depth {args.transformer_depth}, dim {d}, heads {args.transformer_heads}, MLP hidden "
                  f"{args.transformer_hidden}, dropout {args.dropout}, input {n}x{t}x{f} (batch x tokens x "
                  f"features; every block's residual stream {n}x{t}x{d}, {mib(4 * n * t * d)} MiB)")
        title, has_batchnorm = "Transformer", False
    model.train()
    labels = torch.randint(0, CLASSES, (x.shape[0],))
    return Workload(name, title, model, x, labels, config, has_batchnorm)


# --------------------------------------------------------------------------------------------- the methods


class Checkpointed(nn.Module):
    """A model whose forward is ``after(blocks(before(x)))`` (:func:`parts`), its ``nn.Sequential`` ``blocks``
    checkpointed: with ``segments=k`` by ``checkpoint_sequential(blocks, k, h, use_reentrant=False)``; with
    ``per_block=n`` each of the first ``n`` blocks by ``checkpoint(block, h, use_reentrant=False)``, the rest
    plainly. The parameters are the model's (it is the one registered submodule)."""

    def __init__(self, model: nn.Module, before: Callable, blocks: nn.Sequential, after: Callable, *,
                 segments: int | None = None, per_block: int | None = None):
        super().__init__()
        if (segments is None) == (per_block is None):
            raise ValueError("give exactly one of segments and per_block")
        self.model = model
        self.parts = (before, blocks, after)  # a tuple: not registered a second time
        self.segments, self.per_block = segments, per_block

    @classmethod
    def of(cls, model: nn.Module, **how) -> Checkpointed:
        return cls(model, *parts(model), **how)

    def forward(self, x):
        before, blocks, after = self.parts
        h = before(x)
        if self.segments is not None:
            h = checkpoint_sequential(blocks, self.segments, h, use_reentrant=False)
        else:
            for i, block in enumerate(blocks):
                h = checkpoint(block, h, use_reentrant=False) if i < self.per_block else block(h)
        return after(h)


def compiled(model: nn.Module, backend: str, budget: float, x, loss) -> nn.Module:
    """``torch.compile(model)`` compiled now, under ``activation_memory_budget = budget`` and inductor's
    ``fallback_random`` (eager's random ops: plain's dropout masks at the same seed): the partitioner reads the
    budget when the first forward compiles, so that step runs inside the patch; dynamo's caches are reset first,
    else the graph compiled for an earlier budget would be reused."""
    torch._dynamo.reset()
    module = torch.compile(model, backend=backend)
    with torch._functorch.config.patch(activation_memory_budget=budget), \
            torch._inductor.config.patch(fallback_random=True):
        loss(module(x)).backward()
    return module


def best_setting(peaks: dict[int, int], target: float) -> tuple[int, bool]:
    """The setting with the largest peak within ``target`` (ties: the smallest setting), and True; none within
    it: the one of smallest peak, and False."""
    fitting = [k for k, p in peaks.items() if p <= target]
    if fitting:
        return max(fitting, key=lambda k: (peaks[k], -k)), True
    return min(peaks, key=lambda k: (peaks[k], k)), False


# --------------------------------------------------------------------------------------------- checks


def peak_of_step(module: nn.Module, x, loss) -> int:
    """The peak of :func:`invfx.measure` without its timing: warm-up step, ``.grad`` zeroed, one replayed step."""
    def step():
        loss(module(x)).backward()

    step()
    for p in module.parameters():
        p.grad.zero_()
    return cpu_peak_memory(step)[0]


def time_together(model: nn.Module, modules: list, x, loss, repeats: int) -> tuple[list[float], list[float]]:
    """Each of ``modules``' median step seconds and its median ratio to plain's step, all of them and ``model``
    timed in one round-robin (:func:`invfx.timing.interleaved_times`, ``.grad`` zeroed in place before each
    step): a ratio is taken within a round, where the machine ran both at the same speed."""
    contenders = {"plain": model, **{f"method {i}": module for i, module in enumerate(modules)}}
    params = list(model.parameters())

    def zero_grads(name: str) -> None:
        with torch.no_grad():
            for p in params:
                if p.grad is not None:
                    p.grad.zero_()

    steps = {name: (lambda module=module: loss(module(x)).backward()) for name, module in contenders.items()}
    times = interleaved_times(steps, repeats, prepare=zero_grads)
    seconds = [statistics.median(times[f"method {i}"]) for i in range(len(modules))]
    ratios = [statistics.median(t / p for t, p in zip(times[f"method {i}"], times["plain"]))
              for i in range(len(modules))]
    return seconds, ratios


def relative_error(grads, reference) -> float:
    """The largest ``|g - r| / |r|`` over pairs of gradients (Frobenius norms)."""
    return max(float((g - r).norm() / r.norm().clamp_min(1e-30)) for g, r in zip(grads, reference))


def float32_noise(model: nn.Module, x, labels, start: dict) -> float:
    """How far plain float32 gradients of one step from ``start`` are from float64 ones (:func:`relative_error`),
    both steps seeded with ``CHECK_SEED`` (the same dropout masks: CPU draws them independently of the dtype).

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
            torch.manual_seed(CHECK_SEED)
            F.cross_entropy(net(x.to(dtype)), labels).backward()
            grads.append([p.grad.double() for p in net.parameters()])
    finally:
        model.load_state_dict(state)
    return relative_error(grads[1], grads[0])


@dataclass
class Check:
    grad_error: float  # max over parameters of |g - g_plain| / |g_plain|
    bn_report: str  # "yes", "no BN", or what differs
    tolerance: float

    @property
    def grads_ok(self) -> bool:
        return self.grad_error <= self.tolerance


def check_against_plain(model: nn.Module, method: nn.Module, x, loss, start: dict, tolerance: float) -> Check:
    """One step of ``model`` and one of ``method`` from the state ``start`` (parameters, running statistics),
    ``.grad`` None and ``torch.manual_seed(CHECK_SEED)`` before each (the same dropout masks): parameter
    gradients and BatchNorm buffers compared. The model's state at the call is restored. ``start`` should be the
    freshly initialized state: every measured step runs on the same batch, so by now the running statistics have
    converged to its statistics and a second update in one step would barely move them."""
    state = copy.deepcopy(model.state_dict())
    params = list(model.parameters())

    def one_step(module):
        model.load_state_dict(start)  # copies in place: a compiled graph keeps seeing the same tensors
        for p in params:
            p.grad = None
        torch.manual_seed(CHECK_SEED)
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
    else how many layers counted the step more than once and how far the statistics are apart; "no BN" for a
    model without running statistics."""
    counts = [k for k in plain if k.endswith("num_batches_tracked")]
    stats = [k for k in plain if k.endswith(("running_mean", "running_var"))]
    if not counts and not stats:
        return "no BN"
    recounted = [k for k in counts if int(buffers[k]) != int(plain[k])]
    worst = max((float((buffers[k] - plain[k]).abs().max() / plain[k].abs().max().clamp_min(1e-30))
                 for k in stats), default=0.0)
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
    d, q = DEFAULTS, QUICK
    parser = argparse.ArgumentParser(description="A plain ResNet and a transformer at memory budgets (fractions "
                                     "of plain's peak): plain, checkpoint_sequential, checkpoint per block, "
                                     "torch.compile with activation_memory_budget and "
                                     "invfx.optimize(memory_budget=...); peak, time, gradient and BatchNorm "
                                     "checks, and a peak-against-time plot per model.")
    parser.add_argument("--model", choices=(*MODELS, "both"), default="both", help="which model(s) (default both)")
    parser.add_argument("--depth", type=positive, help=f"ResNet: residual blocks (default {d['depth']})")
    parser.add_argument("--channels", type=positive, help=f"ResNet: channels of every block (default "
                        f"{d['channels']})")
    parser.add_argument("--input", type=shape, help="ResNet: input NxCxHxW; C is the stem's input channels "
                        "(default " + "x".join(map(str, d["input"])) + ")")
    parser.add_argument("--transformer-depth", type=positive, help=f"transformer blocks (default "
                        f"{d['transformer_depth']})")
    parser.add_argument("--transformer-dim", type=positive, help=f"transformer width (default "
                        f"{d['transformer_dim']})")
    parser.add_argument("--transformer-heads", type=positive, help=f"attention heads, dividing the width "
                        f"(default {d['transformer_heads']})")
    parser.add_argument("--transformer-hidden", type=positive, help=f"transformer MLP width (default "
                        f"{d['transformer_hidden']})")
    parser.add_argument("--transformer-input", type=tokens_shape, help="transformer input NxTxF (batch, tokens, "
                        "features; default " + "x".join(map(str, d["transformer_input"])) + ")")
    parser.add_argument("--dropout", type=dropout_rate, help=f"transformer dropout (default {d['dropout']})")
    parser.add_argument("--budgets", type=budgets, default=BUDGETS,
                        help="comma-separated fractions of plain activation memory (default "
                        + ",".join(map(str, BUDGETS)) + ")")
    parser.add_argument("--repeats", type=positive, help=f"timed rounds per budget, median (default {d['repeats']})")
    parser.add_argument("--compile-backend", help="torch.compile backend (default inductor, falling back to "
                        "aot_eager where inductor fails; --quick: aot_eager)")
    parser.add_argument("--threads", type=positive, help="torch threads for the run, restored afterwards "
                        "(default: torch's own; --quick: 1, as benchmarks/suite.py --quick: on a busy 2-core machine "
                        "two threads spin-wait for each other, and a tiny step takes a second instead of ms)")
    parser.add_argument("--quick", action="store_true",
                        help="tiny sizes (ResNet depth {depth}, channels {channels}, input {shape}; transformer "
                        "depth {transformer_depth}, dim {transformer_dim}, heads {transformer_heads}, hidden "
                        "{transformer_hidden}, input {tshape}; {repeats} repeats, backend {compile_backend}, "
                        "{threads} thread); "
                        "explicit options still win".format(**q, shape="x".join(map(str, q["input"])),
                                                            tshape="x".join(map(str, q["transformer_input"]))))
    parser.add_argument("--output", type=Path, help="markdown file to write, the PNGs beside it (default "
                        "benchmarks/results/resnet_budget.md, or resnet_budget_quick.md with --quick)")
    args = parser.parse_args(argv)
    apply_profile(args, QUICK if args.quick else DEFAULTS)
    if args.transformer_dim % args.transformer_heads:
        parser.error(f"--transformer-heads {args.transformer_heads} does not divide --transformer-dim "
                     f"{args.transformer_dim}")
    if args.output is None:
        args.output = RESULTS / ("resnet_budget_quick.md" if args.quick else "resnet_budget.md")
    args.models = MODELS if args.model == "both" else (args.model,)
    return args


def error_text(error: BaseException, limit: int = 160) -> str:
    text = f"{type(error).__name__}: {error}".replace("\n", " ").replace("|", "/")
    return text if len(text) <= limit else text[:limit - 3] + "..."


def readme_cell(row: list) -> str:
    """One method at one budget as the README's table has it: ``peak / plain[ (over)], time / plain x, BN stats``
    (no BN clause for a model without BatchNorm)."""
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
    stats = ("" if bn == "no BN" else ", BN stats right" if bn == "yes" else
             f", BN stats wrong ({counted.group(1)}/{counted.group(2)} layers updated {counted.group(3)}x)"
             if counted else f", BN stats wrong ({bn})")
    return (f"{ratio}{'' if within == 'yes' else ' (over)'}, {time_ratio}x{stats}"
            + ("" if "over tolerance" not in grads else f", gradients off ({grads})"))


def readme_table(rows: list[list], backend: str) -> str:
    """The README's summary of one model: a row per budget, a column per method (from the full table's rows)."""
    cells = {(row[0], row[1]): readme_cell(row) for row in rows if row[1] in METHODS}
    budgets = list(dict.fromkeys(budget for budget, _ in cells))
    headers = ["budget", "`checkpoint_sequential` (best k)", "`checkpoint` per block (best n)",
               f"`torch.compile` ({backend})", "`invfx.optimize(memory_budget=...)`"]
    return tabulate([[budget, *(cells.get((budget, m), "-") for m in METHODS)] for budget in budgets], headers,
                    tablefmt="github", disable_numparse=True)


def plot(work: Workload, budgets: tuple[float, ...], backend: str, path: Path) -> str:
    """Step time / plain against peak / plain for ``work``, a line per tool through its budgets (sorted by
    budget, hollow markers over budget), plain at (1, 1), the budgets dashed; written to ``path`` with
    matplotlib's Agg canvas (no pyplot: a caller's backend is left alone). Returns the report's line about it;
    without matplotlib, or when plotting fails, a note instead (never an error)."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        note = "no plot: matplotlib is not installed (pip install -e '.[notebooks]')"
        print(note, file=sys.stderr)
        return note
    labels = {"checkpoint": "checkpoint_sequential (best k)", "per-block checkpoint": "checkpoint per block "
              "(best n)", "torch.compile": f"torch.compile ({backend})", "invfx": "invfx.optimize(memory_budget)"}
    markers = {"checkpoint": "o", "per-block checkpoint": "s", "torch.compile": "^", "invfx": "D"}
    # the budget labels of each tool on its own side of the point, so that tools at the same point stay legible
    offsets = {"checkpoint": (4, 3, "left"), "per-block checkpoint": (4, -9, "left"),
               "torch.compile": (-4, 3, "right"), "invfx": (-4, -9, "right")}
    try:
        fig = Figure(figsize=(6.4, 4.8))
        FigureCanvasAgg(fig)
        ax = fig.add_subplot()
        for budget in budgets:
            ax.axhline(budget, color="0.75", linestyle="--", linewidth=0.8, zorder=0)
            ax.annotate(f"budget {budget}", (1, budget), xycoords=("axes fraction", "data"), xytext=(-2, 2),
                        textcoords="offset points", ha="right", fontsize=7, color="0.5")
        for method in METHODS:
            points = sorted(work.points.get(method, []), key=lambda p: -p[0])
            if not points:
                continue
            xs, ys = [p[1] for p in points], [p[2] for p in points]
            (line,) = ax.plot(xs, ys, marker=markers[method], label=labels[method], linewidth=1.2)
            at: dict[tuple[float, float], list[str]] = {}  # a point reached at several budgets: one label
            for budget, x, y, _ in points:
                at.setdefault((x, y), []).append(f"{budget:g}")
            for (x, y), names in at.items():
                dx, dy, align = offsets[method]
                ax.annotate(",".join(names), (x, y), xytext=(dx, dy), textcoords="offset points", fontsize=6,
                            ha=align, color=line.get_color())
            over = [p for p in points if not p[3]]
            if over:
                ax.plot([p[1] for p in over], [p[2] for p in over], linestyle="none", marker=markers[method],
                        markerfacecolor="white", markeredgecolor=line.get_color())
        ax.plot([1.0], [1.0], marker="*", markersize=12, color="black", linestyle="none", label="plain autograd")
        ax.set_xlabel("step time / plain")
        ax.set_ylabel("peak memory / plain")
        ax.set_ylim(bottom=0)
        ax.set_title(f"{work.title}: peak against time at memory budgets (labels: budget; hollow: over it)",
                     fontsize=9)
        ax.legend(fontsize=7, loc="lower left")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=120)
    except Exception as error:  # the plot is a convenience: never the run's failure
        note = f"no plot: {error_text(error)}"
        print(note, file=sys.stderr)
        return note
    print(f"plot written to {path}")
    return (f"plot: `{path.name}` (step time / plain against peak / plain, a line per tool through the budgets, "
            "hollow markers over budget, plain at (1, 1))")


@dataclass
class CompileBackend:
    """The torch.compile backend in use: inductor falls back to aot_eager for the rest of the run where it
    fails (``note`` says so)."""

    name: str
    note: str = ""


def run_model(work: Workload, args: argparse.Namespace, backend: CompileBackend, progress) -> tuple[list, list]:
    """Every method at every budget on one model: the report's lines for it and the failures."""
    model, x, loss = work.model, work.x, work.loss
    initial_state = copy.deepcopy(model.state_dict())

    def say(what: str) -> None:
        progress(f"{work.name}: {what}")

    plain = invfx.measure(model, x, steps=args.repeats, loss=loss)
    say(f"plain: {plain}")
    noise = float32_noise(model, x, work.labels, initial_state)
    tolerance = max(GRAD_TOLERANCE, 2 * noise)
    say(f"plain float32 gradients vs float64: {noise:.1e}; tolerance {tolerance:.1e}")
    segment_peaks = {k: peak_of_step(Checkpointed.of(model, segments=k), x, loss) for k in range(1, work.depth + 1)}
    say("checkpoint peaks by segments: " + ", ".join(f"{k}: {mib(p)}" for k, p in segment_peaks.items()))
    block_peaks = {n: peak_of_step(Checkpointed.of(model, per_block=n), x, loss) for n in range(work.depth + 1)}
    say("per-block checkpoint peaks by blocks checkpointed: "
        + ", ".join(f"{n}: {mib(p)}" for n, p in block_peaks.items()))

    headers = ["budget", "method", "setting", "peak (MiB)", "peak / plain", "within budget", "step (ms)",
               "time / plain", "grad rel error", "BN stats = 1 plain step"]
    rows = [["-", "plain", "autograd", mib(plain.peak_bytes), "1.000", "-", f"{plain.step_seconds * 1e3:.1f}",
             "1.00", "reference", "reference" if work.has_batchnorm else "no BN"]]
    failures: list[str] = []
    cached: dict[tuple[str, int], tuple] = {}  # (method, k or n) -> (module, peak, check)
    compile_peaks: dict[float, int] = {}  # budget -> peak, to say whether the budget acted at all

    def run_column(budget, method, setting, make, fatal, timed):
        """Measure one method's peak and check it against plain; its row waits in ``timed`` for the budget's
        step times. A failure becomes the row's text (and a failure if ``fatal``)."""
        try:
            made = make()
            if isinstance(made, tuple):  # cached: (module, peak, check)
                module, peak, check = made
            else:
                module = made
                peak = peak_of_step(module, x, loss)
                check = check_against_plain(model, module, x, loss, initial_state, tolerance)
        except Exception as error:  # a method that fails is a finding, not the end of the run
            if method == "invfx" and isinstance(error, invfx.InvfxError):  # its documented "not (yet) possible"
                rows.append([budget, method, setting, f"n/a: {type(error).__name__}: {error}", "", "", "", "", "",
                             ""])
                return None
            rows.append([budget, method, setting, f"failed: {error_text(error)}", "", "", "", "", "", ""])
            if fatal:
                failures.append(f"{work.name} budget {budget} {method}: {traceback.format_exc()}")
            return None
        within = peak <= budget * plain.peak_bytes
        row = [budget, method, setting, mib(peak), f"{peak / plain.peak_bytes:.3f}", "yes" if within else "no",
               "", "", f"{check.grad_error:.1e}" + ("" if check.grads_ok else " (over tolerance)"), check.bn_report]
        rows.append(row)
        timed.append((row, module, method, peak, within))
        if fatal and not check.grads_ok:
            failures.append(f"{work.name} budget {budget} {method}: gradient relative error "
                            f"{check.grad_error:.2e}")
        return module, peak, check

    def run_checkpoint(budget, method, peaks, key, unit, make, timed):
        """A checkpoint column: the setting of ``peaks`` best within the budget, checked once per setting."""
        k, fits = best_setting(peaks, budget * plain.peak_bytes)
        setting = f"{key}={k} {unit}" + ("" if fits else " (smallest peak; none within budget)")
        if (method, k) in cached:
            run_column(budget, method, setting, lambda: cached[method, k], fatal=True, timed=timed)
        else:
            result = run_column(budget, method, setting, lambda: make(k), fatal=True, timed=timed)
            if result is not None:
                cached[method, k] = result
        say(f"budget {budget}: {method} {key}={k}")

    for budget in args.budgets:
        timed: list[tuple] = []  # (row, module, method, peak, within) of the methods that ran at this budget
        run_checkpoint(budget, "checkpoint", segment_peaks, "k", "segments",
                       lambda k: Checkpointed.of(model, segments=k), timed)
        run_checkpoint(budget, "per-block checkpoint", block_peaks, "n", "blocks checkpointed",
                       lambda n: Checkpointed.of(model, per_block=n), timed)

        def compile_now(budget=budget):
            try:
                return compiled(model, backend.name, budget, x, loss)
            except Exception as error:
                if backend.name != "inductor":
                    raise
                backend.note = (f"inductor failed here ({error_text(error)}); torch.compile columns use "
                                "backend aot_eager")
                print(backend.note, file=sys.stderr)
                backend.name = "aot_eager"
                return compiled(model, backend.name, budget, x, loss)

        labelled = backend.name
        result = run_column(budget, "torch.compile", f"{labelled}, activation_memory_budget={budget}", compile_now,
                            fatal=False, timed=timed)
        if result is not None:
            compile_peaks[budget] = result[1]
        if backend.name != labelled:  # the row was labelled before the fallback
            rows[-1][2] = f"{backend.name}, activation_memory_budget={budget}"
        say(f"budget {budget}: torch.compile")

        run_column(budget, "invfx", f"optimize(memory_budget={budget})",
                   lambda budget=budget: invfx.optimize(model, x, memory_budget=budget), fatal=True, timed=timed)
        say(f"budget {budget}: invfx")

        # every method of this budget and plain in one round-robin: their ratios to plain compare within a round,
        # and the methods compare with each other under the same machine load
        steps, ratios = time_together(model, [entry[1] for entry in timed], x, loss, args.repeats)
        for (row, _, method, peak, within), seconds, ratio in zip(timed, steps, ratios):
            row[6], row[7] = f"{seconds * 1e3:.1f}", f"{ratio:.2f}"
            work.points.setdefault(method, []).append((budget, ratio, peak / plain.peak_bytes, within))
        torch._dynamo.reset()  # the compiled graph of this budget is not needed any more
        say(f"budget {budget}: timed together")

    table = tabulate(rows, headers=headers, tablefmt="github", disable_numparse=True)
    notes = [
        "checkpoint: `checkpoint_sequential(model.blocks, k, h, use_reentrant=False)`, the first k-1 segments "
        "recomputed; k chosen as the one with the largest measured peak within the budget. Peaks by k: "
        + ", ".join(f"k={k}: {mib(p)} MiB ({p / plain.peak_bytes:.3f})" for k, p in segment_peaks.items()) + ".",
        "per-block checkpoint: `checkpoint(block, h, use_reentrant=False)` on each of the first n blocks, the rest "
        "plain; n chosen as k is. Peaks by n: "
        + ", ".join(f"n={n}: {mib(p)} MiB ({p / plain.peak_bytes:.3f})" for n, p in block_peaks.items()) + ".",
        f"grad rel error: plain's own float32 gradients are {noise:.1e} from float64 ones (same step, same seed), "
        f"so the tolerance is max({GRAD_TOLERANCE:g}, 2 x that) = {tolerance:.1e}.",
    ]
    if not work.has_batchnorm:
        notes.append("no BatchNorm in this model: nothing for a recomputed forward to update twice (`no BN`).")
    compile_off = [row[0] for row in rows if row[1] == "torch.compile" and "over tolerance" in row[8]]
    if compile_off and any(isinstance(m, nn.Dropout) and m.p > 0 for m in model.modules()):
        notes.append("torch.compile's gradients are off at budget(s) " + ", ".join(map(str, compile_off)) + ": "
                     "where the budget is below what the default partition saves, torch's min-cut partitioner "
                     "(its knapsack stage) may recompute random ops in the backward graph, `aten.native_dropout` "
                     "included, and without functionalized RNG the recomputation draws new masks (seen in the "
                     "backward graph of a small transformer under aot_eager in torch 2.13: `native_dropout` "
                     "rerun at budget 0.5, not at 0.75).")
    if len(compile_peaks) > 1:
        low, high = min(compile_peaks.values()), max(compile_peaks.values())
        notes.append(f"activation_memory_budget under {backend.name}: " + (
            "no effect on the measured peak at these budgets." if low == high else
            f"it acted: peaks from {low / plain.peak_bytes:.3f} to {high / plain.peak_bytes:.3f} of plain "
            "across the budgets (" + ", ".join(f"{b}: {p / plain.peak_bytes:.3f}" for b, p in compile_peaks.items())
            + ")."))
    plot_line = plot(work, args.budgets, backend.name, args.output.with_name(f"{args.output.stem}_{work.name}.png"))
    form = ("peak / plain, time / plain, BatchNorm statistics against one plain step" if work.has_batchnorm else
            "peak / plain, time / plain; no BatchNorm")
    lines = [f"## {work.title}", "", work.config + ".", "", table, "", *(f"- {note}" for note in notes), "",
             f"In the README's form ({form}):", "", readme_table(rows, backend.name), "", plot_line, ""]
    return lines, failures


def main(argv=None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()

    def progress(what: str) -> None:
        print(f"{what} ({time.perf_counter() - started:.0f} s)", file=sys.stderr, flush=True)

    backend = CompileBackend(args.compile_backend)
    sections, failures = [], []
    threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        for name in args.models:
            lines, failed = run_model(make_workload(name, args), args, backend, progress)
            sections += lines
            failures += failed
        used_threads = torch.get_num_threads()
    finally:
        torch.set_num_threads(threads)

    titles = {"resnet": "a ResNet", "transformer": "a transformer"}
    common = (f"float32, train mode; step = `cross_entropy(model(x), labels).backward()`; peak = exact CPU peak of "
              f"one step above weights, grads and data (`invfx.measure`: allocator replay after a warm-up step); "
              f"time / plain = median over {args.repeats} rounds of a step's time over plain's, every method at "
              f"a budget and plain timed in one round-robin; torch {torch.__version__}, "
              f"{used_threads} thread{'s' if used_threads > 1 else ''}, {platform.machine()}; "
              f"invfx {invfx.__version__}")
    notes = [
        "budget: a fraction of plain's peak; `within budget`: peak <= budget x plain peak.",
        "torch.compile: compiled afresh per budget with `torch._functorch.config.activation_memory_budget` (and "
        "`torch._inductor.config.fallback_random`, so that dropout draws plain's masks); that budget is relative "
        "to the compiled graph's default saved activations, not to plain's peak.",
        "grad rel error: max over parameters of |g - g_plain| / |g_plain| after one step from the freshly "
        f"initialized state, `torch.manual_seed({CHECK_SEED})` before plain's step and before the method's (the "
        "same dropout masks), against max(1e-4, 2 x plain's own float32 error): a method as accurate as plain in "
        "float32 is within it (checkpoint reruns plain's kernels and restores the RNG state: 0 expected). BN "
        "stats: running_mean/var (rel diff <= 1e-4) and num_batches_tracked after one step, against one plain "
        "step from the same state.",
    ]
    if backend.note:
        notes.append(backend.note)
    what = " and ".join(titles[m] for m in args.models)
    lines = [f"# {what[0].upper()}{what[1:]} at memory budgets: "
             "checkpoint_sequential, per-block checkpoint, torch.compile, invfx", "", common + ".", "",
             *(f"- {note}" for note in notes), "", *sections,
             f"run took {time.perf_counter() - started:.0f} s on {datetime.date.today().isoformat()}"]
    return write_report(lines, args.output, failures)


if __name__ == "__main__":
    sys.exit(main())
