"""Peer reversible-network libraries side by side on the same RevNet-style additive coupling MLP stack.

The model (:func:`make_stack`) is written in plain PyTorch: a stem ``nn.Linear(width, width)``, ``depth``
additive coupling blocks, and a head ``nn.Linear(width, 10)``. Each block computes::

    x1, x2 = x.chunk(2, -1)
    y1 = x1 + F(x2)
    y2 = x2 + G(y1)
    x = torch.cat([y1, y2], -1)

with ``F`` and ``G`` each ``LayerNorm(width/2) -> Linear(width/2, hidden) -> GELU -> Linear(hidden, width/2)``.

The peers wrap **the very same module objects** (stem, every ``F`` and ``G``, head), so every column trains
the same weights on the same batch:

* ``plain``: the model itself, ordinary autograd;
* ``revlib`` (1.7.2): ``revlib.ReversibleSequential(F1, G1, F2, G2, ..., split_dim=-1)`` in its default
  memory mode (``autograd_function``). Its streams start as ``(x1, x2)``; every wrapped module ``m`` maps
  ``(a, b) -> (b, a + m(b))``, so after ``F`` the streams are ``(x2, y1)`` and after ``G`` ``(y1, y2)``, and
  the final ``torch.cat(..., split_dim)`` is ``[y1, y2]``: the same math and order as the plain block.
* ``memcnn`` (1.5.2): per block ``memcnn.InvertibleModuleWrapper(memcnn.AdditiveCoupling(Fm=F, Gm=G,
  split_dim=-1), keep_input=False, keep_input_inverse=False)``. ``AdditiveCoupling`` computes
  ``y1 = x1 + Fm(x2); y2 = x2 + Gm(y1); cat([y1, y2], split_dim)``: the same math and order.

A peer that is not installed is skipped with a note
(``pip install -c constraints.txt --no-deps revlib==1.7.2 memcnn==1.5.2 numpy``
installs them without touching torch; see ``pyproject.toml``). To add another column (e.g. ``invfx.optimize``),
add a ``name: wrap(model) -> nn.Module`` entry to :data:`PEERS`.

For each depth: a gradient check per peer on a small batch (outputs, every parameter's gradient and the
input's gradient vs plain autograd, float32, rtol 1e-4, atol 1e-5, with ``.grad`` already allocated as in the
benchmark, so gradients accumulated twice show up), then per library the exact CPU peak memory of one training
step ``model(x).sum().backward()`` (:func:`invfx.memory.cpu_peak_memory`: replay of every ``torch.profiler``
allocation; measured after a warm-up step, ``.grad`` zeroed in place, so it is the step's activations and
temporaries above weights, gradients and data), the same replay on the second of two profiled steps ("steady
peak", :func:`steady_peak_of_step`: the profiler cannot see the free of a block allocated before it started, so
state a library replaces at every step, like revlib's per-module RNG state, inflates the first figure), and the
median step time over ``--repeats`` rounds in which the libraries are interleaved (order rotated every round).

Run it::

    .venv/bin/python benchmarks/peers.py            # depths 8,32, width 256, hidden 256, batch 256, 5 repeats
    .venv/bin/python benchmarks/peers.py --quick    # tiny sizes, a few seconds; writes peers_quick.md

It prints a markdown (github) table and writes it to ``benchmarks/results/peers.md`` (``--quick``:
``peers_quick.md``; ``--output`` overrides). Exit status 0, unless a peer's gradients differ from plain or a
peer crashes (1): the table still gets written and says which.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import platform
import statistics
import sys
import time
import traceback
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from tabulate import tabulate
from torch import nn

import invfx
from invfx.argtypes import apply_profile, depths, even, positive, write_report
from invfx.memory import cpu_peak_memory, cpu_steady_peak_memory, mib
from invfx.timing import interleaved_times

RTOL, ATOL = 1e-4, 1e-5
RESULTS = Path(__file__).resolve().parent / "results"
DEFAULTS = dict(depths=(8, 32), width=256, hidden=256, batch=256, repeats=5)
QUICK = dict(depths=(2, 4), width=32, hidden=32, batch=16, repeats=2)
CHECK_BATCH = 8


# --------------------------------------------------------------------------------------------- the model


def mlp(width: int, hidden: int) -> nn.Sequential:
    half = width // 2
    return nn.Sequential(nn.LayerNorm(half), nn.Linear(half, hidden), nn.GELU(), nn.Linear(hidden, half))


class CouplingBlock(nn.Module):
    """RevNet additive coupling: ``y1 = x1 + F(x2); y2 = x2 + G(y1); y = cat([y1, y2], -1)``."""

    def __init__(self, F: nn.Module, G: nn.Module):
        super().__init__()
        self.F = F
        self.G = G

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1, x2 = x.chunk(2, -1)
        y1 = x1 + self.F(x2)
        y2 = x2 + self.G(y1)
        return torch.cat([y1, y2], -1)


class Stack(nn.Module):
    """``head(blocks(stem(x)))``; ``blocks`` is any module mapping ``(batch, width)`` to ``(batch, width)``."""

    def __init__(self, stem: nn.Module, blocks: nn.Module, head: nn.Module):
        super().__init__()
        self.stem = stem
        self.blocks = blocks
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(x)
        if isinstance(self.blocks, nn.ModuleList):
            for block in self.blocks:
                h = block(h)
        else:
            h = self.blocks(h)
        return self.head(h)


def make_stack(depth: int, width: int, hidden: int, seed: int = 0) -> Stack:
    """The plain model: stem, ``depth`` :class:`CouplingBlock` in ``model.blocks`` (an ``nn.ModuleList``), head."""
    if width % 2:
        raise ValueError(f"width must be even (the coupling splits it in two), got {width}")
    torch.manual_seed(seed)
    stem = nn.Linear(width, width)
    blocks = nn.ModuleList(CouplingBlock(mlp(width, hidden), mlp(width, hidden)) for _ in range(depth))
    head = nn.Linear(width, 10)
    return Stack(stem, blocks, head)


# --------------------------------------------------------------------------------------------- the peers


def _quiet_import(name: str):
    """Import a peer; memcnn warns at import that ``torch.cuda.amp.custom_fwd`` is deprecated."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return __import__(name)


def revlib_stack(model: Stack) -> Stack:
    """The same stem, F/G modules and head, the blocks run by ``revlib.ReversibleSequential``."""
    revlib = _quiet_import("revlib")
    halves = [m for block in model.blocks for m in (block.F, block.G)]
    body = revlib.ReversibleSequential(*halves, split_dim=-1)  # default memory_mode: autograd_function
    return Stack(model.stem, body, model.head)


def memcnn_stack(model: Stack) -> Stack:
    """The same stem, F/G modules and head, each block an ``InvertibleModuleWrapper(AdditiveCoupling(F, G))``."""
    memcnn = _quiet_import("memcnn")
    body = nn.Sequential(*[
        memcnn.InvertibleModuleWrapper(memcnn.AdditiveCoupling(Fm=block.F, Gm=block.G, split_dim=-1),
                                       keep_input=False, keep_input_inverse=False)
        for block in model.blocks])
    return Stack(model.stem, body, model.head)


def invfx_stack(model: Stack) -> nn.Module:
    """invfx finds the couplings in the plain model by itself: no wrapping, only an example input."""
    return invfx.optimize(model, torch.randn(2, model.stem.in_features))


#: name -> (distribution to import / report the version of, wrapper)
PEERS: dict[str, tuple[str, Callable[[Stack], nn.Module]]] = {
    "invfx": ("invfx", invfx_stack),
    "revlib": ("revlib", revlib_stack),
    "memcnn": ("memcnn", memcnn_stack),
}


def available_peers() -> tuple[dict[str, Callable[[Stack], nn.Module]], list[str]]:
    """The peers that import, and a note for each that does not."""
    found, notes = {}, []
    for name, (dist, wrap) in PEERS.items():
        try:
            _quiet_import(dist)
        except Exception as error:  # ImportError, or anything a stale package raises at import
            notes.append(f"{name}: skipped, import failed ({type(error).__name__}: {error}); "
                         f"install with `pip install -c constraints.txt --no-deps revlib==1.7.2 memcnn==1.5.2 numpy`")
            continue
        found[name] = wrap
    return found, notes


def version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "?"


# --------------------------------------------------------------------------------------------- checks


def zero_grads(module: nn.Module) -> None:
    """Zero ``.grad`` in place (allocating it if missing), so a step allocates no gradient buffers."""
    for p in module.parameters():
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        else:
            p.grad.zero_()


def step(module: nn.Module, x: torch.Tensor) -> None:
    module(x).sum().backward()


@dataclass
class GradCheck:
    ok: bool
    outputs_ok: bool
    param_grads_ok: bool
    input_grad_ok: bool
    params_ok: bool  # the wrapper trains exactly the plain model's parameter objects
    max_abs: float  # largest |peer - plain| over outputs, parameter grads and input grad
    worst: str  # where it is
    worst_rel: float  # its |diff| / max|plain| of that tensor
    mismatched: int  # parameter tensors whose grads are not allclose
    report: str
    max_rel: float = 0.0  # the largest relative error of any one tensor: max |diff| / max |plain|
    max_rel_at: str = ""  # ... and which tensor

    def __str__(self) -> str:
        return self.report


def check_gradients(model: nn.Module, peer: nn.Module, x: torch.Tensor, name: str = "peer") -> GradCheck:
    """Outputs, every parameter gradient and the input gradient of ``peer`` vs ``model`` on the input ``x``.

    Both run with every parameter's ``.grad`` allocated and zeroed first (as in the benchmark), so a gradient
    accumulated twice shows up. float32, ``torch.allclose(rtol=1e-4, atol=1e-5)``.
    """
    named = list(model.named_parameters())
    params_ok = {id(p) for p in peer.parameters()} == {id(p) for _, p in named}

    def run(module):
        zero_grads(model)
        zero_grads(module)
        inp = x.detach().clone().requires_grad_(True)
        out = module(inp)
        out.sum().backward()
        return out.detach().clone(), [p.grad.clone() for _, p in named], inp.grad.clone()

    ref_out, ref_grads, ref_dx = run(model)
    out, grads, dx = run(peer)

    pairs = [("output", out, ref_out)] + [(f"grad {n}", g, r) for (n, _), g, r in zip(named, grads, ref_grads)]
    pairs.append(("input grad", dx, ref_dx))
    diffs = [(float((a - b).abs().max()), label, float(b.abs().max())) for label, a, b in pairs]
    max_abs, worst, scale = max(diffs)
    close = {label: torch.allclose(a, b, rtol=RTOL, atol=ATOL) for label, a, b in pairs}
    outputs_ok = close["output"]
    mismatched = sum(not ok for label, ok in close.items() if label.startswith("grad "))
    input_ok = close["input grad"]
    ok = outputs_ok and mismatched == 0 and input_ok and params_ok
    worst_rel = max_abs / scale if scale else float("inf") if max_abs else 0.0
    report = (f"{name} vs plain (rtol {RTOL:g}, atol {ATOL:g}): outputs {outputs_ok}, parameter grads "
              f"{mismatched == 0}" + (f" ({mismatched}/{len(named)} tensors differ)" if mismatched else "")
              + f", input grad {input_ok}, same parameters {params_ok}; max abs diff {max_abs:.2e} "
              f"({worst}, {worst_rel:.1e} of its max) -> {'OK' if ok else 'MISMATCH'}")
    zero_grads(model)
    relative = [(d / sc if sc else float("inf") if d else 0.0, label) for d, label, sc in diffs]
    max_rel, max_rel_at = max(relative)
    return GradCheck(ok, outputs_ok, mismatched == 0, input_ok, params_ok, max_abs, worst, worst_rel, mismatched,
                     report, max_rel, max_rel_at)


# --------------------------------------------------------------------------------------------- measurement


@dataclass
class Measurement:
    peak_bytes: int  # invfx.memory.cpu_peak_memory of one step after a warm-up step
    steady_peak_bytes: int  # the second of two profiled steps (see steady_peak_of_step)
    step_times: list[float]  # one per interleaved round

    @property
    def step_s(self) -> float:
        return statistics.median(self.step_times)


def paired_ratio(a: Measurement, b: Measurement) -> tuple[float, int, int]:
    """``a``'s step time over ``b``'s, round by round (the two ran back to back, at the same machine speed):
    the median ratio, and in how many of how many rounds ``a`` took at most ``b``'s time."""
    ratios = [x / y for x, y in zip(a.step_times, b.step_times)]
    return statistics.median(ratios), sum(r <= 1 for r in ratios), len(ratios)


def peak_of_step(module: nn.Module, x: torch.Tensor) -> int:
    """CPU peak bytes of one training step above what exists before it (after a warm-up step), by
    :func:`invfx.memory.cpu_peak_memory`."""
    zero_grads(module)
    step(module, x)  # warm-up: every .grad exists before the measured step
    zero_grads(module)
    peak, _ = cpu_peak_memory(lambda: step(module, x))
    return peak


def steady_peak_of_step(module: nn.Module, x: torch.Tensor) -> int:
    """Peak bytes of the second of two profiled steps, above the running total at its start.

    The profiler drops the free of a block that was allocated before profiling began, so state a module keeps
    from one step to the next and replaces in the next step (revlib stores ``torch.get_rng_state()``, 5,056
    bytes, on every wrapped module at every forward) shows up in :func:`peak_of_step` as new memory with no
    matching free. Here the first profiled step allocates that state inside the profile, so the second step's
    frees are seen and its peak is the steady-state one. Same replay as :func:`invfx.memory.cpu_peak_memory`.
    """
    zero_grads(module)
    step(module, x)  # warm-up, outside the profile
    zero_grads(module)
    return cpu_steady_peak_memory(lambda: step(module, x), between=lambda: zero_grads(module))


def measure(module: nn.Module | Mapping[str, nn.Module], x: torch.Tensor, steps: int
            ) -> Measurement | dict[str, Measurement]:
    """Peak memory of one training step and median step time over ``steps`` timed steps.

    ``module`` may be one module or a mapping name -> module (which should share weights); with a mapping,
    the timed steps are interleaved: in each of ``steps`` rounds (after one untimed warm-up round) every module
    runs once, the order rotated from round to round, so drift in machine speed hits all alike.
    """
    modules = {"": module} if isinstance(module, nn.Module) else dict(module)
    names = list(modules)
    peaks = {name: peak_of_step(m, x) for name, m in modules.items()}
    steady = {name: steady_peak_of_step(m, x) for name, m in modules.items()}
    times = interleaved_times({name: lambda m=modules[name]: step(m, x) for name in names}, steps,
                              prepare=lambda name: zero_grads(modules[name]))
    result = {name: Measurement(peaks[name], steady[name], times[name]) for name in names}
    return result[""] if isinstance(module, nn.Module) else result


# --------------------------------------------------------------------------------------------- main


def parse_args(argv=None) -> argparse.Namespace:
    d = DEFAULTS
    parser = argparse.ArgumentParser(description="Peak memory and step time of one training step of the same "
                                                 "additive coupling MLP stack: plain autograd, revlib, memcnn.")
    parser.add_argument("--depths", type=depths, help=f"comma-separated depths (default "
                        f"{','.join(map(str, d['depths']))})")
    parser.add_argument("--width", type=even, help=f"features per sample (default {d['width']})")
    parser.add_argument("--hidden", type=positive, help=f"hidden width of F and G (default {d['hidden']})")
    parser.add_argument("--batch", type=positive, help=f"batch size (default {d['batch']})")
    parser.add_argument("--repeats", type=positive, help=f"timed steps per library and depth, median reported "
                        f"(default {d['repeats']})")
    parser.add_argument("--quick", action="store_true", help="tiny sizes for a smoke test (depths "
                        f"{','.join(map(str, QUICK['depths']))}, width {QUICK['width']}, batch {QUICK['batch']}, "
                        f"{QUICK['repeats']} repeats); explicit options still win")
    parser.add_argument("--output", type=Path, help="markdown file to write (default benchmarks/results/peers.md, "
                        "or peers_quick.md with --quick)")
    args = parser.parse_args(argv)
    apply_profile(args, QUICK if args.quick else DEFAULTS)
    if args.output is None:
        args.output = RESULTS / ("peers_quick.md" if args.quick else "peers.md")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    # memcnn frees inputs with tensor.storage().resize_(0); torch warns once that TypedStorage is deprecated
    warnings.filterwarnings("ignore", message="TypedStorage is deprecated")
    started = time.perf_counter()
    torch.manual_seed(0)
    peers, notes = available_peers()
    for note in notes:
        print(note, file=sys.stderr)

    rows, check_lines, failures, paired_lines = [], [], [], []
    for depth in args.depths:
        model = make_stack(depth, args.width, args.hidden, seed=0)
        x = torch.randn(args.batch, args.width)
        x_check = torch.randn(CHECK_BATCH, args.width)
        modules: dict[str, nn.Module] = {"plain": model}
        status: dict[str, str] = {"plain": "reference"}
        for name, wrap in peers.items():
            try:
                wrapped = wrap(model)
                check = check_gradients(model, wrapped, x_check, name)
            except Exception as error:  # a peer that crashes is a finding, not the end of the run
                status[name] = f"crashed: {type(error).__name__}: {error}"
                failures.append(f"depth {depth} {name}: {traceback.format_exc()}")
                check_lines.append(f"depth {depth}: {name} crashed: {type(error).__name__}: {error}")
                continue
            check_lines.append(f"depth {depth}: {check}")
            status[name] = "yes" if check.ok else (f"NO: max abs diff {check.max_abs:.2e} ({check.worst}), "
                                                   f"{check.mismatched} param grads differ")
            if not check.ok:
                failures.append(f"depth {depth} {name}: {check}")
            modules[name] = wrapped
        try:
            results = measure(modules, x, args.repeats)
        except Exception as error:
            failures.append(f"depth {depth} measure: {traceback.format_exc()}")
            print(f"depth {depth}: measurement crashed: {type(error).__name__}: {error}", file=sys.stderr)
            continue
        base = results["plain"]
        if "invfx" in results and "revlib" in results:
            ratio, ahead, rounds = paired_ratio(results["invfx"], results["revlib"])
            paired_lines.append(f"depth {depth}: invfx / revlib step time round by round: median {ratio:.3f}; "
                                f"invfx took at most revlib's time in {ahead} of {rounds} rounds")
        for name in [*modules, *(n for n in status if n not in modules)]:
            if name in results:
                r = results[name]
                rows.append([depth, name, mib(r.peak_bytes), f"{r.peak_bytes / base.peak_bytes:.3f}",
                             mib(r.steady_peak_bytes), f"{r.steady_peak_bytes / base.steady_peak_bytes:.3f}",
                             f"{r.step_s * 1e3:.1f}", f"{r.step_s / base.step_s:.2f}", status[name]])
            else:
                rows.append([depth, name, "-", "-", "-", "-", "-", "-", status[name]])
        print(f"depth {depth}: done ({time.perf_counter() - started:.0f} s)", file=sys.stderr, flush=True)
        del model, modules, x

    headers = ["depth", "library", "peak (MiB)", "peak / plain", "steady peak (MiB)", "steady / plain",
               "step (ms)", "time / plain", "gradients match"]
    table = tabulate(rows, headers=headers, tablefmt="github", disable_numparse=True,
                     colalign=("right", "left") + ("right",) * 6 + ("left",))
    elapsed = time.perf_counter() - started
    versions = ", ".join(f"{name} {version(dist)}" for name, (dist, _) in PEERS.items() if name in peers)
    activation = args.batch * args.width * 4
    config = (f"width {args.width}, hidden {args.hidden}, batch {args.batch}, float32; one activation "
              f"{mib(activation)} MiB; step = `model(x).sum().backward()`; peak = exact CPU peak above weights, "
              f"grads and data; time = median of {args.repeats} interleaved steps; torch {torch.__version__}, "
              f"{torch.get_num_threads()} threads, {platform.machine()}; invfx {invfx.__version__}"
              + (f"; {versions}" if versions else ""))
    lines = ["# Peer reversible libraries on the same additive coupling MLP stack: one training step", "",
             config, "", table, "",
             "peak: `invfx.memory.cpu_peak_memory` of one step after a warm-up step. steady peak: the second of "
             "two profiled steps, above the total at its start; it differs where a library keeps state from one "
             "step to the next and replaces it (revlib: a 5,056-byte `torch.get_rng_state()` per wrapped module "
             "and forward), whose old copy's free the profiler cannot see when it was allocated before profiling.",
             "", *(f"- {line}" for line in paired_lines), *([""] if paired_lines else []),
             f"gradient checks on a batch of {CHECK_BATCH}, same weights, `.grad` pre-allocated:", "",
             *(f"- {line}" for line in check_lines), *(f"- {note}" for note in notes), "",
             f"run took {elapsed:.0f} s on {datetime.date.today().isoformat()}"]
    return write_report(lines, args.output, failures)


if __name__ == "__main__":
    sys.exit(main())
