"""Depth sweeps of four plainly written models, one training step each: plain autograd, torch checkpoint, revlib
and memcnn where they apply, and ``invfx.optimize``; peak memory, step time and a gradient check per cell.

The models (all written without invfx, all ``float32``, train mode):

* ``coupling stack``: :func:`peers.make_stack`, a stem, ``depth`` RevNet additive couplings
  ``y1 = x1 + F(x2); y2 = x2 + G(y1)`` (``F``, ``G``: LayerNorm, Linear, GELU, Linear), a head;
* ``Glow-style flow``: :class:`invfx.examples.Glow`, two levels of squeeze then ``depth / 2`` steps each (actnorm,
  invertible 1x1 convolution through ``F.conv2d``, affine coupling with a ReLU conv net), ``depth`` steps in all;
* ``two-stream transformer``: :class:`invfx.examples.ReversibleTransformer`, ``depth`` blocks
  ``y1 = x1 + attention(ln1(x2)); y2 = x2 + mlp(ln2(y1))`` (``nn.MultiheadAttention``);
* ``ResNet``: :class:`invfx.examples.ResNet`, ``depth`` conv-BN-ReLU residual blocks: nothing in it is invertible.

The libraries (every column trains **the same parameter objects** on the same batch):

* ``plain``: the model itself;
* ``checkpoint``: ``torch.utils.checkpoint.checkpoint(block, ..., use_reentrant=False)`` around every block of
  the model's block list (``blocks``; Glow: every step of every level), the rest as written
  (:func:`checkpoint_blocks`). In the ResNet the recomputation updates BatchNorm's running statistics a second
  time (gradients are unaffected: train mode normalises with batch statistics);
* ``revlib`` (``ReversibleSequential``, default memory mode) and ``memcnn`` (``InvertibleModuleWrapper`` around
  ``AdditiveCoupling``, ``keep_input=False``), on the coupling stack (:func:`peers.revlib_stack`,
  :func:`peers.memcnn_stack`) and on the transformer, whose block is the same additive coupling of two streams:
  ``F`` is ``ln1`` + attention, ``G`` is ``ln2`` + mlp, and the two streams (both the embedding, as in the model)
  are concatenated on the last dimension for the peers to split (:func:`revlib_transformer`,
  :func:`memcnn_transformer`). **n/a** on the Glow-style flow (its actnorm and 1x1 convolution need hand-written
  inverses: both libraries invert couplings of arbitrary sub-networks, not those layers, so a wrapped Glow would
  be a different model) and on the ResNet (nothing in it is invertible);
* ``invfx``: ``invfx.optimize(model, x)`` on the unmodified model; on the ResNet, where there is nothing to
  invert, ``invfx.optimize(model, x, memory_budget=0.5)`` (a ``BudgetError``, which shallow ResNets can give,
  is reported in the cell, not as a failure).

Per cell (model, depth, library), on the same input ``x``, one step being ``module(x).sum().backward()``:

* peak: exact CPU peak bytes of one training step above weights, gradients and data, by replaying every
  ``torch.profiler`` allocation (:func:`peers.steady_peak_of_step`: a warm-up step, ``.grad`` zeroed in place,
  then the second of two profiled steps, so state a library replaces at every step, like revlib's saved RNG
  state, is counted once, as in training); reported in MiB and as a ratio to plain at the same depth;
* time: the median over ``--repeats`` rounds in which every library of the (model, depth) runs one step, the
  order rotated each round (:func:`invfx.timing.interleaved_medians`), reported as a ratio to plain;
* gradients: :func:`peers.check_gradients` against plain on ``x``: outputs, every parameter gradient and the
  input gradient, float32; a tensor matches when its relative error ``max |diff| / max |plain|`` is at most
  1e-4 (issue 4's bound; an elementwise ``allclose`` fails every library, revlib and memcnn included, on
  gradients summed over 32 blocks, whose small entries carry the rounding of the large ones). The cell shows
  the largest relative error of any tensor. The Glow-style flow's ReLU masks can flip when its coupling nets
  rerun on rebuilt inputs (README, limitations): such a mismatch is shown in the table, marked known, and does
  not fail the run; any other mismatch or crash does (exit status 1). So does invfx's peak not staying flat in
  depth on the three invertible models (peak(deepest) / peak(shallowest) <= 1.05, 1.2, 1.2, issue 4's goals).

Progress: one line per measured cell on stderr, with the elapsed time and an estimate of what remains (seconds
per block per library so far, per model). Writes the markdown report (a compact table for the README, then every
figure) to ``benchmarks/results/depth_sweep.md`` and, where matplotlib is installed (the ``notebooks`` extra),
peak against depth, a panel per model and a line per library, to ``depth_sweep.png`` beside it
(``--quick``: ``depth_sweep_quick.*``; ``--output`` overrides)::

    .venv/bin/python benchmarks/depth_sweep.py                      # depths 8,16,32, 5 repeats
    .venv/bin/python benchmarks/depth_sweep.py --quick              # tiny sizes, seconds
    .venv/bin/python benchmarks/depth_sweep.py --models ResNet --resnet-depths 16 --repeats 3
"""

from __future__ import annotations

import argparse
import copy
import datetime
import platform
import sys
import time
import traceback
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from peers import (
    _quiet_import,
    check_gradients,
    make_stack,
    memcnn_stack,
    revlib_stack,
    steady_peak_of_step,
    step,
    version,
    zero_grads,
)
from tabulate import tabulate
from torch import nn
from torch.utils.checkpoint import checkpoint

import invfx
from invfx.argtypes import apply_profile, depths, positive, write_report
from invfx.examples import Glow, ResNet, ReversibleTransformer
from invfx.memory import mib
from invfx.timing import interleaved_medians

RESULTS = Path(__file__).resolve().parent / "results"
LIBRARIES = ("plain", "checkpoint", "revlib", "memcnn", "invfx")
PEER_DISTS = {"revlib": "revlib", "memcnn": "memcnn"}
RESNET_BUDGET = 0.5
REL_TOL = 1e-4  # largest relative error of a gradient tensor against plain, float32 (issue 4)
DEFAULTS = dict(depths=(8, 16, 32), resnet_depths=(8, 16, 32), repeats=5)
QUICK = dict(depths=(2, 4), resnet_depths=(2, 4), repeats=2)
FLAT_GOALS = {"coupling stack": 1.05, "Glow-style flow": 1.2, "two-stream transformer": 1.2}
GLOW_KNOWN = "known: ReLU masks flip on rebuilt inputs in float32 (README, limitations)"


# --------------------------------------------------------------------------------------------- wrappers


class Checkpointed(nn.Module):
    """One block run by ``torch.utils.checkpoint.checkpoint(..., use_reentrant=False)``."""

    def __init__(self, block: nn.Module):
        super().__init__()
        self.block = block

    def forward(self, *args):
        return checkpoint(self.block, *args, use_reentrant=False)


def _checkpoint_each(container: nn.Module) -> nn.Module:
    """The same blocks, each in a :class:`Checkpointed`; nested ``ModuleList``s (Glow's levels) are walked."""
    if isinstance(container, nn.Sequential):
        return nn.Sequential(*(Checkpointed(block) for block in container))
    if isinstance(container, nn.ModuleList):
        return nn.ModuleList(_checkpoint_each(m) if isinstance(m, nn.ModuleList) else Checkpointed(m)
                             for m in container)
    raise TypeError(f"expected an nn.ModuleList or nn.Sequential of blocks, got {type(container).__name__}")


def checkpoint_blocks(model: nn.Module, attribute: str) -> nn.Module:
    """``model`` with every block of ``model.<attribute>`` checkpointed: a shallow copy (same parameters,
    buffers and forward) whose own table of submodules holds the wrapped block list; ``model`` is unchanged."""
    wrapped = copy.copy(model)
    wrapped._modules = dict(model._modules)  # copy.copy shares the dict; give the copy its own
    setattr(wrapped, attribute, _checkpoint_each(getattr(model, attribute)))
    return wrapped


class AttentionHalf(nn.Module):
    """``F`` of a :class:`invfx.examples.ReversibleBlock`: ``attention(ln1(x))``, the block's own modules."""

    def __init__(self, block: nn.Module):
        super().__init__()
        self.ln = block.ln1
        self.attention = block.attention

    def forward(self, x):
        h = self.ln(x)
        return self.attention(h, h, h, need_weights=False)[0]


class MLPHalf(nn.Module):
    """``G`` of a :class:`invfx.examples.ReversibleBlock`: ``mlp(ln2(y))``, the block's own modules."""

    def __init__(self, block: nn.Module):
        super().__init__()
        self.ln = block.ln2
        self.mlp = block.mlp

    def forward(self, x):
        return self.mlp(self.ln(x))


class TwoStreamPeer(nn.Module):
    """The transformer with its blocks run by a peer: ``head(body(cat([h, h], -1)))``, ``h = embed(x)``; the
    body splits the last dimension into the two streams and returns ``cat([y1, y2], -1)``, the head's input."""

    def __init__(self, model: ReversibleTransformer, body: nn.Module):
        super().__init__()
        self.embed = model.embed
        self.body = body
        self.head = model.head

    def forward(self, x):
        h = self.embed(x)
        return self.head(self.body(torch.cat([h, h], dim=-1)))


def revlib_transformer(model: ReversibleTransformer) -> nn.Module:
    revlib = _quiet_import("revlib")
    halves = [half for block in model.blocks for half in (AttentionHalf(block), MLPHalf(block))]
    return TwoStreamPeer(model, revlib.ReversibleSequential(*halves, split_dim=-1))


def memcnn_transformer(model: ReversibleTransformer) -> nn.Module:
    memcnn = _quiet_import("memcnn")
    body = nn.Sequential(*[
        memcnn.InvertibleModuleWrapper(memcnn.AdditiveCoupling(Fm=AttentionHalf(b), Gm=MLPHalf(b), split_dim=-1),
                                       keep_input=False, keep_input_inverse=False)
        for b in model.blocks])
    return TwoStreamPeer(model, body)


# --------------------------------------------------------------------------------------------- the models


@dataclass
class ModelSpec:
    build: Callable[[int], nn.Module]  # depth -> the plain model (seeded)
    data: Callable[[], torch.Tensor]
    size: str  # for the report
    blocks: str  # attribute holding the block list, for the checkpoint column
    peers: dict[str, Callable[[nn.Module], nn.Module]] = field(default_factory=dict)
    not_applicable: str = ""  # why revlib and memcnn do not apply
    budget: float | None = None  # invfx.optimize's memory_budget
    known_mismatch: str = ""  # a known float32 gradient difference, reported without failing
    resnet: bool = False  # takes --resnet-depths


def seeded(build: Callable[[int], nn.Module]) -> Callable[[int], nn.Module]:
    def make(depth: int) -> nn.Module:
        torch.manual_seed(0)
        return build(depth).train()
    return make


def model_specs(quick: bool) -> dict[str, ModelSpec]:
    """The four models at the README's sizes (``quick``: tiny ones)."""
    s = dict(width=32, hidden=32, batch=16, image=(2, 3, 8, 8), glow_hidden=8, tokens=(2, 8, 8), dim=16, heads=2,
             mlp=32, resnet=(4, (2, 3, 8, 8))) if quick else \
        dict(width=512, hidden=512, batch=256, image=(16, 3, 32, 32), glow_hidden=64, tokens=(16, 64, 32), dim=128,
             heads=4, mlp=256, resnet=(32, (16, 32, 32, 32)))
    channels, image = s["resnet"]
    peers_na = "revlib, memcnn: n/a ({})"
    return {
        "coupling stack": ModelSpec(
            seeded(lambda d: make_stack(d, s["width"], s["hidden"])), lambda: torch.randn(s["batch"], s["width"]),
            f"width {s['width']}, hidden {s['hidden']}, batch {s['batch']}", "blocks",
            peers={"revlib": revlib_stack, "memcnn": memcnn_stack}),
        "Glow-style flow": ModelSpec(
            seeded(lambda d: Glow(channels=3, levels=2, depth=max(1, d // 2), hidden=s["glow_hidden"])),
            lambda: torch.randn(*s["image"]),
            "input " + "x".join(map(str, s["image"])) + f", two levels, coupling nets {s['glow_hidden']} wide",
            "levels", not_applicable=peers_na.format("actnorm and the 1x1 convolution have no inverse there"),
            known_mismatch=GLOW_KNOWN),
        "two-stream transformer": ModelSpec(
            seeded(lambda d: ReversibleTransformer(features=s["tokens"][2], dim=s["dim"], depth=d, heads=s["heads"],
                                                   hidden=s["mlp"])),
            lambda: torch.randn(*s["tokens"]),
            f"{s['tokens'][0]} sequences of {s['tokens'][1]} tokens, dim {s['dim']}, {s['heads']} heads, "
            f"mlp {s['mlp']}", "blocks", peers={"revlib": revlib_transformer, "memcnn": memcnn_transformer}),
        "ResNet": ModelSpec(
            seeded(lambda d: ResNet(depth=d, channels=channels, in_channels=image[1])), lambda: torch.randn(*image),
            f"{channels} channels, input " + "x".join(map(str, image)), "blocks",
            not_applicable=peers_na.format("nothing is invertible"), budget=RESNET_BUDGET, resnet=True),
    }


def available_peers() -> tuple[set[str], list[str]]:
    """The peer libraries that import, and a note for each that does not."""
    found, notes = set(), []
    for name, dist in PEER_DISTS.items():
        try:
            _quiet_import(dist)
        except Exception as error:  # ImportError, or anything a stale package raises at import
            notes.append(f"{name}: skipped, import failed ({type(error).__name__}: {error}); install with "
                         "`pip install -c constraints.txt --no-deps revlib==1.7.2 memcnn==1.5.2 numpy`")
            continue
        found.add(name)
    return found, notes


# --------------------------------------------------------------------------------------------- one cell


@dataclass
class Cell:
    library: str
    module: nn.Module | None = None
    status: str = ""  # why there is no module (n/a, crashed)
    peak: int | None = None
    seconds: float | None = None
    grads: str = "reference"
    ok: bool = True  # False: a failure of the run
    known: bool = False  # a known mismatch


def build_cells(spec: ModelSpec, model: nn.Module, x: torch.Tensor, peers: set[str]) -> list[Cell]:
    """Every library's module for this model (or why there is none); a wrapper that crashes is a failed cell."""
    builders: dict[str, Callable[[], nn.Module]] = {"plain": lambda: model,
                                                    "checkpoint": lambda: checkpoint_blocks(model, spec.blocks)}
    builders.update({name: (lambda wrap=wrap: wrap(model)) for name, wrap in spec.peers.items() if name in peers})
    builders["invfx"] = lambda: invfx.optimize(model, x, memory_budget=spec.budget)
    cells = []
    for library in LIBRARIES:
        if library not in builders:
            continue
        try:
            cells.append(Cell(library, builders[library]()))
        except invfx.InvfxError as error:  # invfx's documented "not possible" (a budget it cannot meet)
            cells.append(Cell(library, status=f"n/a: {one_line(error)}"))
        except Exception as error:
            cells.append(Cell(library, status=f"crashed: {one_line(error)}", ok=False))
            traceback.print_exc()
    return cells


def measure_cell(cell: Cell, model: nn.Module, x: torch.Tensor, known_mismatch: str) -> None:
    """Peak of one step and the gradient check against plain; a crash marks the cell failed."""
    try:
        cell.peak = steady_peak_of_step(cell.module, x)
        if cell.library == "plain":
            return
        check = check_gradients(model, cell.module, x, cell.library)
    except Exception as error:
        cell.status, cell.ok, cell.module = f"crashed: {one_line(error)}", False, None
        traceback.print_exc()
        return
    ok = check.params_ok and check.max_rel <= REL_TOL
    cell.grads = ("yes" if ok else "NO") + f" ({check.max_rel:.1e})"
    if not ok:
        cell.grads += f", worst {check.max_rel_at}"
        cell.known = bool(known_mismatch)
        cell.ok = cell.known
        if cell.known:
            cell.grads += f"; {known_mismatch}"


def time_cells(cells: list[Cell], x: torch.Tensor, repeats: int) -> None:
    """Median step seconds of every measured cell, interleaved round by round."""
    modules = {c.library: c.module for c in cells if c.module is not None}
    medians = interleaved_medians({name: lambda m=m: step(m, x) for name, m in modules.items()}, repeats,
                                  prepare=lambda name: zero_grads(modules[name]))
    for cell in cells:
        cell.seconds = medians.get(cell.library)


def one_line(error: BaseException, limit: int = 200) -> str:
    text = f"{type(error).__name__}: {error}".replace("\n", " ").replace("|", "/")
    return text if len(text) <= limit else text[:limit - 3] + "..."


# --------------------------------------------------------------------------------------------- progress


class Progress:
    """Elapsed time and an estimate of what remains, on stderr: the seconds per (block x library) measured so far
    for each model (for a model not yet measured, the mean over the others) times what is left."""

    def __init__(self, jobs: list[tuple[str, int, int]]):
        self.started = time.perf_counter()
        self.left = {(name, depth): units for name, depth, units in jobs}
        self.rates: dict[str, list[float]] = {}
        self.group_started = self.started

    def start_group(self) -> None:
        self.group_started = time.perf_counter()

    def finish_group(self, name: str, depth: int) -> None:
        units = self.left.pop((name, depth))
        now = time.perf_counter()
        self.rates.setdefault(name, []).append((now - self.group_started) / units)
        self.group_started = now  # nothing of the next group has run yet

    def remaining(self) -> float | None:
        if not self.rates:
            return None
        rate = {name: sum(r) / len(r) for name, r in self.rates.items()}
        mean = sum(rate.values()) / len(rate)
        total = sum(rate.get(name, mean) * units for (name, _), units in self.left.items())
        return max(0.0, total - (time.perf_counter() - self.group_started))

    def say(self, text: str) -> None:
        elapsed = time.perf_counter() - self.started
        left = self.remaining()
        estimate = "no estimate before one group is done" if left is None else f"about {left:.0f} s left"
        print(f"[depth_sweep] {text} ({elapsed:.0f} s elapsed, {estimate})", file=sys.stderr, flush=True)


def jobs(specs: dict[str, ModelSpec], args) -> list[tuple[str, int]]:
    """(model, depth) in the order measured: every model at its shallowest depth first, so the estimate of what
    remains has every model's rate early."""
    lists = {name: args.resnet_depths if spec.resnet else args.depths for name, spec in specs.items()}
    return [(name, lists[name][i]) for i in range(max(map(len, lists.values())))
            for name in specs if i < len(lists[name])]


def columns(spec: ModelSpec, peers: set[str]) -> int:
    """How many libraries run on this model: plain, checkpoint, invfx and the installed peers that apply."""
    return 3 + sum(name in peers for name in spec.peers)


# --------------------------------------------------------------------------------------------- the run


def run_group(name: str, spec: ModelSpec, depth: int, peers: set[str], repeats: int, progress: Progress
              ) -> list[Cell]:
    """Every library on one model at one depth: build, peak and check each, then time them interleaved."""
    progress.start_group()
    model = spec.build(depth)
    x = spec.data()
    cells = build_cells(spec, model, x, peers)
    for cell in cells:
        if cell.module is not None:  # checkpoint reruns plain's kernels on the same inputs: no known excuse there
            measure_cell(cell, model, x, "" if cell.library == "checkpoint" else spec.known_mismatch)
        progress.say(f"{name} depth {depth} {cell.library}: " + (
            f"peak {mib(cell.peak)} MiB, gradients {cell.grads}" if cell.peak is not None else cell.status))
    time_cells(cells, x, repeats)
    progress.finish_group(name, depth)
    timed = ", ".join(f"{c.library} {c.seconds * 1e3:.1f} ms" for c in cells if c.seconds is not None)
    progress.say(f"{name} depth {depth}: timed ({repeats} interleaved rounds): {timed}")
    return cells


def ratio(value: float | None, base: float | None, digits: int) -> str:
    return "-" if value is None or not base else f"{value / base:.{digits}f}"


def detail_rows(results: dict[str, dict[int, list[Cell]]]) -> list[list]:
    """A row per (model, depth, library) with every figure."""
    rows = []
    for name, by_depth in results.items():
        for depth, cells in by_depth.items():
            plain = cells[0]
            for c in cells:
                measured = c.peak is not None and c.seconds is not None
                rows.append([name, depth, c.library, mib(c.peak) if measured else c.status,
                             ratio(c.peak, plain.peak, 3), f"{c.seconds * 1e3:.1f}" if measured else "-",
                             ratio(c.seconds, plain.seconds, 2), c.grads if measured else "-"])
    return rows


def compact_rows(results: dict[str, dict[int, list[Cell]]]) -> list[list]:
    """The README's table: a row per (model, depth); per library ``peak / plain, time / plain``."""
    rows = []
    for name, by_depth in results.items():
        for depth, cells in by_depth.items():
            by_library = {c.library: c for c in cells}
            plain = by_library["plain"]
            row = [name, depth, mib(plain.peak) if plain.peak is not None else plain.status,
                   f"{plain.seconds * 1e3:.1f}" if plain.seconds is not None else "-"]
            for library in LIBRARIES[1:]:
                c = by_library.get(library)
                if c is None:
                    row.append("n/a")
                elif c.peak is None or c.seconds is None:
                    row.append(c.status.split(":")[0])
                else:
                    mark = "" if c.grads.startswith("yes") else " (grads differ)"
                    row.append(f"{ratio(c.peak, plain.peak, 3)}, {ratio(c.seconds, plain.seconds, 2)}x{mark}")
            rows.append(row)
    return rows


def flatness(results: dict[str, dict[int, list[Cell]]]) -> tuple[list[str], list[str]]:
    """invfx's peak(deepest) / peak(shallowest) per invertible model against its goal; lines and failures."""
    lines, failures = [], []
    for name, goal in FLAT_GOALS.items():
        peaks = {d: c.peak for d, cells in results.get(name, {}).items() for c in cells
                 if c.library == "invfx" and c.peak}
        if len(peaks) < 2:
            continue
        low, high = min(peaks), max(peaks)
        value = peaks[high] / peaks[low]
        lines.append(f"{name}: invfx peak({high}) / peak({low}) = {value:.3f} (goal <= {goal})")
        if value > goal:
            failures.append(f"{name}: invfx peak grows with depth ({value:.3f} > {goal})")
    return lines, failures


def report(results, specs, args, notes, elapsed) -> tuple[list[str], list[str]]:
    """The markdown report and the run's failures."""
    compact = tabulate(compact_rows(results), ["model", "depth", "plain peak (MiB)", "plain step (ms)",
                                               *LIBRARIES[1:]], tablefmt="github", disable_numparse=True)
    detail = tabulate(detail_rows(results), ["model", "depth", "library", "peak (MiB)", "peak / plain", "step (ms)",
                                             "time / plain", f"gradients match (relative error <= {REL_TOL:g})"],
                      tablefmt="github", disable_numparse=True)
    flat_lines, failures = flatness(results)
    failures += [f"{name} depth {depth} {c.library}: {c.status or c.grads}" for name, by_depth in results.items()
                 for depth, cells in by_depth.items() for c in cells if not c.ok]
    versions = ", ".join(f"{name} {version(dist)}" for name, dist in PEER_DISTS.items() if name in args.peers)
    sizes = "; ".join(f"{name}: {spec.size}" for name, spec in specs.items())
    lines = [
        "# Depth sweeps: plain, torch checkpoint, revlib, memcnn, invfx.optimize", "",
        f"{sizes}. float32, train mode; step = `module(x).sum().backward()`; peak = exact CPU peak of one step above "
        f"weights, grads and data (allocator replay, second of two profiled steps); time = median of "
        f"{args.repeats} interleaved rounds; torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"{platform.machine()}; invfx {invfx.__version__}" + (f", {versions}" if versions else ""), "",
        "Per library: peak / plain, time / plain (same depth).", "", compact, "",
        *(f"- {line}" for line in flat_lines),
        f"- invfx on the ResNet: `invfx.optimize(model, x, memory_budget={RESNET_BUDGET})`; elsewhere "
        "`invfx.optimize(model, x)`.",
        *(f"- {name}: {spec.not_applicable}" for name, spec in specs.items() if spec.not_applicable),
        "- checkpoint: `torch.utils.checkpoint.checkpoint(block, use_reentrant=False)` per block (on the ResNet it "
        "updates BatchNorm's running statistics twice per step).",
        f"- gradients: outputs, every parameter gradient and the input gradient against plain; the figure is the "
        f"largest relative error of any tensor, max |diff| / max |plain|, which must be <= {REL_TOL:g}.",
        *(f"- {note}" for note in notes), "", "Every figure:", "", detail, "",
        f"run took {elapsed:.0f} s on {datetime.date.today().isoformat()}"]
    return lines, failures


def plot(results: dict[str, dict[int, list[Cell]]], path: Path) -> None:
    """Peak MiB against depth, a panel per model, a line per library, log y (skipped without matplotlib)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("no plot: matplotlib is not installed (pip install -e '.[notebooks]')", file=sys.stderr)
        return
    columns = min(2, len(results))
    rows = -(-len(results) // columns)
    figure, axes = plt.subplots(rows, columns, figsize=(5.5 * columns, 4 * rows), squeeze=False)
    for ax, (name, by_depth) in zip(axes.flat, results.items()):
        for library in LIBRARIES:
            points = [(d, c.peak / 2**20) for d, cells in by_depth.items() for c in cells
                      if c.library == library and c.peak]
            if points:
                ax.plot(*zip(*points), "o-", label=library, color=f"C{LIBRARIES.index(library)}")
        ax.set_title(name)
        ax.set_xlabel("depth (blocks)")
        ax.set_ylabel("peak of one training step (MiB)")
        ax.set_yscale("log")
        ax.set_xscale("log", base=2)
        ax.set_xticks(list(by_depth), [str(d) for d in by_depth])
        ax.minorticks_off()
        ax.legend(fontsize="small")
    for ax in list(axes.flat)[len(results):]:
        ax.axis("off")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    print(f"plot written to {path}")


def parse_args(argv=None) -> argparse.Namespace:
    d = DEFAULTS
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depths", type=depths, help="depths of the coupling stack, the flow and the transformer "
                        f"(default {','.join(map(str, d['depths']))})")
    parser.add_argument("--resnet-depths", type=depths, help="depths of the ResNet (default "
                        f"{','.join(map(str, d['resnet_depths']))})")
    parser.add_argument("--repeats", type=positive, help=f"interleaved timing rounds (default {d['repeats']})")
    parser.add_argument("--models", help="comma-separated subset of the models (default: all four)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes and depths "
                        f"{','.join(map(str, QUICK['depths']))}, {QUICK['repeats']} repeats; explicit options win")
    parser.add_argument("--output", type=Path, help="markdown file to write; the plot goes beside it as .png "
                        "(default benchmarks/results/depth_sweep.md, or depth_sweep_quick.md with --quick)")
    args = parser.parse_args(argv)
    apply_profile(args, QUICK if args.quick else DEFAULTS)
    if args.output is None:
        args.output = RESULTS / ("depth_sweep_quick.md" if args.quick else "depth_sweep.md")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    specs = model_specs(args.quick)
    if args.models:
        wanted = [m.strip() for m in args.models.split(",")]
        unknown = [m for m in wanted if m not in specs]
        if unknown:
            print(f"unknown model(s) {unknown}; choose from {list(specs)}", file=sys.stderr)
            return 2
        specs = {name: specs[name] for name in wanted}
    # memcnn frees inputs with tensor.storage().resize_(0); torch warns once that TypedStorage is deprecated
    warnings.filterwarnings("ignore", message="TypedStorage is deprecated")
    args.peers, notes = available_peers()
    for note in notes:
        print(note, file=sys.stderr)
    order = jobs(specs, args)
    progress = Progress([(name, depth, depth * columns(specs[name], args.peers)) for name, depth in order])
    results: dict[str, dict[int, list[Cell]]] = {name: {} for name in specs}
    for name, depth in order:
        results[name][depth] = run_group(name, specs[name], depth, args.peers, args.repeats, progress)
    results = {name: dict(sorted(by_depth.items())) for name, by_depth in results.items()}
    lines, failures = report(results, specs, args, notes, time.perf_counter() - progress.started)
    status = write_report(lines, args.output, failures)
    plot(results, args.output.with_suffix(".png"))
    return status


if __name__ == "__main__":
    sys.exit(main())
