"""Models from other libraries (issue 18), unmodified, through ``invfx.optimize`` at budget None and 0.5: a row
per model saying whether optimize succeeded, how long it took, what it planned, and what the plans measure
against plain autograd.

The models (random weights, float32, train mode; built here, nothing downloaded):

* timm: ``resnet18``, ``convnext_atto``, ``vit_tiny_patch16_224`` made small (``img_size``, ``patch_size``),
  ``mobilenetv3_small_050``; torchvision: ``resnet18``, ``mobilenet_v3_small`` (10 classes each);
* Hugging Face transformers (traced by ``torch.export`` inside invfx): GPT-2 (``GPT2LMHeadModel``) and BERT
  (``BertModel``), 4 layers, built from a config, called with ``{"input_ids": ..., "attention_mask": ...}``
  (one sequence padded: the mask is an input the graph reads);
* FrEIA flows from ``benchmarks/zoo_models.py`` (``freia_glow(depth, image=True)``, ``freia_allinone(depth)``,
  each returning ``(model, example_input)``), where that module is present; else their rows are skipped with a
  note, as are the rows of a library that is not installed (``pip install -c constraints.txt -e '.[models]'``).

The input sizes are in the table. For the CNNs they are chosen so that activations, not the weight-sized
workspace of a CPU convolution's backward (36 MiB for one of resnet18's 512x512x3x3 convolutions), make up most
of a plain step's peak: at 2x3x32x32 plain resnet18's peak is 45.9 MiB of which ~1.7 MiB are activations, and
no plan could reach half of it.

Per model:

* ``optimize``: ``invfx.optimize(model, example, memory_budget=b)`` for b in None (least memory) and 0.5, with
  its defaults (the float64 gradient check included), timed; ``ok`` or the error's first line. Where 0.5
  raises ``invfx.BudgetError`` the row says so with the least achievable ratio from its message (estimated by
  the cost model, or measured), and 0.75 is tried as well (its own column, empty where 0.5 was met), unless
  budget None's plan, the plan of least memory, already measured above 0.75.
* ``segments``: the plan's rows counted by mode, ``keep / checkpoint / invertible / selective``.
* ``peak``, ``time``: :func:`invfx.measure` of the optimized module with the model itself as baseline (a warm-
  up step, then the exact CPU peak of one step by allocator replay; the median of ``--steps`` steps timed
  interleaved with plain's), as ratios to plain's. A training step's loss is ``sum(w * t)`` over the output's
  floating tensors, ``w`` fixed random weights (the same for plain and optimized): every output element gets a
  gradient of its own, as in the zoo tests (a plain ``sum`` would give a classifier's bias a zero gradient).
* ``grad error``: the largest ``|g - g_plain| / |g_plain|`` (Frobenius norms) over every parameter's gradient
  after one float32 step of the optimized module and one of plain, both from the model's initial state
  (BatchNorm statistics included) under the same seed, and whether BatchNorm's running statistics then equal
  plain's (a recomputed forward must not update them again); beside it plain's own float32 error (the same step's
  gradients against a float64 copy's, measured where the error is not 0; a gradient's norm floored at 1e-6 of
  the largest), the scale of rounding such a model has anyway. Over
  ``max(1e-4, 10 x plain's own error)`` fails the run (exit status 1); so does an optimize that crashes with
  anything but an ``invfx.InvfxError`` (an ``InvfxError``, a budget it cannot meet included, is a finding the
  row reports).

    .venv/bin/python benchmarks/zoo.py                         # every model at the README's sizes
    .venv/bin/python benchmarks/zoo.py --quick                 # tiny sizes, one thread, steps 1
    .venv/bin/python benchmarks/zoo.py --models "timm resnet18,HF GPT-2" --steps 5

Writes the markdown report (the README's table, then notes) to ``benchmarks/results/zoo.md`` (``--quick``:
``zoo_quick.md``; ``--output`` overrides). CPU only. Progress on stderr, a line per model and budget.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import platform
import re
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tabulate import tabulate
from torch import nn

import invfx
from invfx.argtypes import positive, write_report
from invfx.errors import first_line
from invfx.measure import Measurement
from invfx.memory import mib
from invfx.modes import Mode

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))  # (run as a module by suite.py, or imported by a test)
from model_libraries import import_library  # noqa: E402
from resnet_budget import compare_batchnorm, relative_error  # noqa: E402

try:  # written beside this one (the FrEIA flows); optional: their rows are skipped without it
    import zoo_models
except ImportError:
    zoo_models = None

RESULTS = HERE / "results"
CLASSES = 10
CHECK_SEED = 1234  # torch.manual_seed before every compared step
GRAD_TOLERANCE = 1e-4  # the floor; a model's own float32 rounding can be larger (see plain_float32_error)
NOISE_FACTOR = 10
BUDGETS = (None, 0.5)
FALLBACK_BUDGET = 0.75  # tried where 0.5 cannot be met
MODES = (Mode.KEEP, Mode.CHECKPOINT, Mode.INVERTIBLE, Mode.SELECTIVE)


# --------------------------------------------------------------------------------------------- the models


@dataclass
class Workload:
    """One model of the run: the model (train mode, its initial state kept for the gradient check), its example
    (a tuple of positional inputs, or a dict of keyword inputs) and how to describe its size."""

    name: str
    model: nn.Module
    example: tuple | dict
    size: str

    def positional(self) -> tuple:
        """What :func:`invfx.measure` passes on: the tuple itself, or the dict as one argument (for
        :class:`Keywords`)."""
        return self.example if isinstance(self.example, tuple) else (self.example,)

    def callable(self, module: nn.Module) -> nn.Module:
        return Keywords(module) if isinstance(self.example, dict) else module


class Keywords(nn.Module):
    """``module(**inputs)`` called as ``Keywords(module)(inputs)``, so that :func:`invfx.measure` (which passes
    positional inputs) can run a model that takes keyword ones; its parameters are the module's."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module

    def forward(self, inputs: dict):
        return self.module(**inputs)


@dataclass(frozen=True)
class Spec:
    """How to build one model at the full and the quick size: ``build(quick) -> (model, example, size)``."""

    name: str
    library: str  # the import_library name the model needs
    build: Callable[[bool], tuple[nn.Module, tuple | dict, str]]


def images(batch: int, pixels: int) -> tuple[tuple, str]:
    return (torch.randn(batch, 3, pixels, pixels),), f"{batch}x3x{pixels}x{pixels}"


# full, quick: (batch, pixels); activations dominate a plain step's peak at the full size, a step ~1 s on 2 cores
CNN_SIZES = {False: (16, 112), True: (2, 32)}  # (resnet18's plain peak at 16x112: 102 MiB, 36 of it workspace)
VIT_SIZES = {False: (16, 64), True: (2, 32)}


def timm_cnn(name: str) -> Callable:
    def build(quick: bool):
        model = import_library("timm").create_model(name, num_classes=CLASSES)
        x, size = images(*CNN_SIZES[quick])
        return model, x, size
    return build


def timm_vit(quick: bool):
    batch, pixels = VIT_SIZES[quick]
    patch, depth = (8, 12) if not quick else (8, 2)
    model = import_library("timm").create_model("vit_tiny_patch16_224", num_classes=CLASSES, img_size=pixels,
                                                 patch_size=patch, depth=depth)
    x, size = images(batch, pixels)
    return model, x, f"{size}, patch {patch}, depth {depth}"


def torchvision_cnn(name: str) -> Callable:
    def build(quick: bool):
        model = getattr(import_library("torchvision").models, name)(num_classes=CLASSES)
        x, size = images(*CNN_SIZES[quick])
        return model, x, size
    return build


# Hugging Face: (layers, width, heads, vocabulary, batch, tokens)
TEXT_SIZES = {False: (4, 256, 4, 1024, 16, 128), True: (2, 32, 2, 64, 2, 8)}


def token_inputs(batch: int, length: int, vocabulary: int) -> dict:
    generator = torch.Generator().manual_seed(0)
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[-1, length // 2:] = 0  # (a padded sequence: the mask is an input the graph reads)
    return {"input_ids": torch.randint(0, vocabulary, (batch, length), generator=generator), "attention_mask": mask}


def gpt2(quick: bool):
    layers, width, heads, vocabulary, batch, length = TEXT_SIZES[quick]
    transformers = import_library("transformers")
    config = transformers.GPT2Config(n_layer=layers, n_embd=width, n_head=heads, vocab_size=vocabulary,
                                     n_positions=length, use_cache=False)
    return (transformers.GPT2LMHeadModel(config), token_inputs(batch, length, vocabulary),
            f"{batch}x{length} tokens; {layers} layers, width {width}, vocabulary {vocabulary}")


def bert(quick: bool):
    layers, width, heads, vocabulary, batch, length = TEXT_SIZES[quick]
    transformers = import_library("transformers")
    config = transformers.BertConfig(num_hidden_layers=layers, hidden_size=width, num_attention_heads=heads,
                                     intermediate_size=4 * width, vocab_size=vocabulary,
                                     max_position_embeddings=length)
    return (transformers.BertModel(config), token_inputs(batch, length, vocabulary),
            f"{batch}x{length} tokens; {layers} layers, width {width}, vocabulary {vocabulary}")


FLOW_DEPTHS = {False: 8, True: 2}


def freia(builder: str, **kwargs) -> Callable:
    def build(quick: bool):
        depth = FLOW_DEPTHS[quick]
        model, x = getattr(zoo_models, builder)(depth, **kwargs)
        example = x if isinstance(x, (tuple, dict)) else (x,)
        shapes = [t for t in (example.values() if isinstance(example, dict) else example)
                  if isinstance(t, torch.Tensor)]
        return model, example, f"{' + '.join('x'.join(map(str, t.shape)) for t in shapes)}, depth {depth}"
    return build


SPECS = (
    Spec("timm resnet18", "timm", timm_cnn("resnet18")),
    Spec("timm convnext_atto", "timm", timm_cnn("convnext_atto")),
    Spec("timm vit_tiny (small images)", "timm", timm_vit),
    Spec("timm mobilenetv3_small_050", "timm", timm_cnn("mobilenetv3_small_050")),
    Spec("torchvision resnet18", "torchvision", torchvision_cnn("resnet18")),
    Spec("torchvision mobilenet_v3_small", "torchvision", torchvision_cnn("mobilenet_v3_small")),
    Spec("HF GPT-2", "transformers", gpt2),
    Spec("HF BERT", "transformers", bert),
    Spec("FrEIA Glow (zoo_models)", "FrEIA.framework", freia("freia_glow", image=True)),
    Spec("FrEIA AllInOne (zoo_models)", "FrEIA.framework", freia("freia_allinone")),
)


def missing(spec: Spec) -> str | None:
    """Why ``spec``'s row is skipped (its library not installed, or zoo_models absent); None if it runs."""
    if spec.name.startswith("FrEIA") and zoo_models is None:
        return "benchmarks/zoo_models.py is not there (the FrEIA flows' builders)"
    if import_library(spec.library) is None:
        return f"{spec.library} is not installed (pip install -c constraints.txt -e '.[models]')"
    return None


def make_workload(spec: Spec, quick: bool) -> Workload:
    torch.manual_seed(0)
    model, example, size = spec.build(quick)
    return Workload(spec.name, model.float().train(), example, size)


# --------------------------------------------------------------------------------------------- a step


def tensors_of(value) -> list[torch.Tensor]:
    """Every floating tensor in a model's output (tuples, lists, dicts and ``ModelOutput`` s, in order)."""
    if isinstance(value, torch.Tensor):
        return [value] if value.is_floating_point() else []
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, (tuple, list)):
        return [t for item in value for t in tensors_of(item)]
    return []


class WeightedSum:
    """The loss ``sum(w * t)`` over the output's floating tensors, ``w`` fixed random weights per shape (drawn
    once from their own generator, so that plain and optimized steps, and the float64 copy's, see the same)."""

    def __init__(self):
        self.weights: dict[tuple[int, ...], torch.Tensor] = {}

    def weight(self, t: torch.Tensor) -> torch.Tensor:
        key = tuple(t.shape)
        if key not in self.weights:
            generator = torch.Generator().manual_seed(len(self.weights) + 1)
            self.weights[key] = torch.randn(t.shape, generator=generator)
        return self.weights[key].to(t.dtype)

    def __call__(self, output) -> torch.Tensor:
        return sum((t * self.weight(t)).sum() for t in tensors_of(output))


def one_step(work: Workload, module: nn.Module, loss: WeightedSum, start: dict, dtype=torch.float32
             ) -> tuple[list, dict]:
    """Every parameter's gradient of the model (zeros where None) and its buffers after one step of ``module``
    from the state ``start`` under ``CHECK_SEED``, the inputs cast to ``dtype`` where floating."""
    work.model.load_state_dict(start)
    params = list(work.model.parameters())
    for p in params:
        p.grad = None
    cast = tuple(x.to(dtype) if isinstance(x, torch.Tensor) and x.is_floating_point() else x
                 for x in work.positional())
    torch.manual_seed(CHECK_SEED)
    loss(work.callable(module)(*cast)).backward()
    return ([torch.zeros_like(p) if p.grad is None else p.grad.detach().clone() for p in params],
            {name: b.clone() for name, b in work.model.named_buffers()})


def plain_float32_error(work: Workload, loss: WeightedSum, start: dict) -> float:
    """How far plain's float32 gradients are from a float64 copy's on the same step: the rounding the model has
    anyway, the scale against which a plan's gradient error is judged."""
    state = copy.deepcopy(work.model.state_dict())
    try:
        single, _ = one_step(work, work.model, loss, start)
        twin = copy.deepcopy(work.model).double()
        double_work = Workload(work.name, twin, work.example, work.size)
        double, _ = one_step(double_work, twin, loss, {k: v.double() if v.is_floating_point() else v
                                                     for k, v in start.items()}, torch.float64)
    finally:
        work.model.load_state_dict(state)
    # (a parameter whose exact gradient is all but 0 would divide by its rounding: a floor of 1e-6 of the
    # largest gradient's norm; without it torchvision's mobilenet_v3_small measured 5.3e+08)
    reference = [g.float() for g in double]
    floor = 1e-6 * max(float(r.norm()) for r in reference)
    return max(float((g - r).norm()) / max(float(r.norm()), floor) for g, r in zip(single, reference))


# --------------------------------------------------------------------------------------------- one model


@dataclass
class Attempt:
    """``invfx.optimize`` at one budget and what it measured."""

    budget: float | None
    seconds: float = 0.0
    error: str = ""  # "" when optimize succeeded
    least: float | None = None  # a BudgetError's least achievable ratio
    least_how: str = ""  # how the BudgetError knows it: "estimated", "measured"
    segments: dict[str, int] = field(default_factory=dict)
    peak: float | None = None  # peak / plain
    time: float | None = None  # step time / plain
    grad_error: float | None = None
    batchnorm: str = ""  # compare_batchnorm's verdict: "yes", "no BN" or what differs
    crashed: bool = False  # an exception other than InvfxError (a failure of the run)

    def optimize_cell(self) -> str:
        if not self.error:
            return f"ok, {self.seconds:.1f} s"
        if self.least is not None:
            return f"BudgetError: least achievable {self.least:.3f} ({self.least_how})"
        return self.error

    def measured_cell(self) -> str:
        if self.error:
            return self.optimize_cell() if self.least is not None else "-"
        return f"{self.peak:.3f}, {self.time:.2f}x"

    def segments_cell(self) -> str:
        return "/".join(str(self.segments.get(str(m), 0)) for m in MODES) if self.segments else "-"


@dataclass
class Row:
    spec: Spec
    size: str = ""
    plain_peak: int = 0
    plain_step: float = 0.0
    noise: float | None = None
    attempts: dict[float | None, Attempt] = field(default_factory=dict)
    skipped: str = ""

    def worst_grad_error(self) -> float | None:
        errors = [a.grad_error for a in self.attempts.values() if a.grad_error is not None]
        return max(errors) if errors else None

    def tolerance(self) -> float:
        return max(GRAD_TOLERANCE, NOISE_FACTOR * (self.noise or 0.0))


def segment_counts(optimized) -> dict[str, int]:
    counts: dict[str, int] = {}
    for row in optimized.plan.rows:
        counts[str(row.mode)] = counts.get(str(row.mode), 0) + 1
    return counts


def least_ratio(error: invfx.BudgetError) -> tuple[float | None, str]:
    """The least achievable peak / plain a BudgetError states (``(1395848 B, 0.836 of plain 1.6 MiB)``) and
    whether the cost model estimated it or the example's step measured it."""
    text = str(error)
    found = re.search(r"\(\d+ B, ([0-9.]+) of plain", text)
    if not found:
        return None, ""
    how = ("estimated" if "least achievable peak is estimated" in text else
           "measured, plan of least memory" if "least achievable peak, measured" in text else
           "measured, last plan tried")
    return float(found.group(1)), how


def attempt(work: Workload, budget: float | None, loss: WeightedSum, start: dict, steps: int,
            say: Callable[[str], None]) -> tuple[Attempt, Measurement | None]:
    """Optimize at ``budget``, then measure the result beside plain and check its gradients."""
    result = Attempt(budget)
    started = time.perf_counter()
    try:
        optimized = invfx.optimize(work.model, work.example, memory_budget=budget)
    except invfx.InvfxError as error:
        result.seconds = time.perf_counter() - started
        result.error = f"{type(error).__name__}: {first_line(error)}".replace("|", "/")
        if isinstance(error, invfx.BudgetError):
            result.least, result.least_how = least_ratio(error)
        say(f"budget {budget}: {result.error}")
        return result, None
    except Exception as error:  # not an invfx error: a crash, reported and failed on
        result.seconds = time.perf_counter() - started
        result.error = f"crashed: {type(error).__name__}: {first_line(error)}".replace("|", "/")
        result.crashed = True
        say(f"budget {budget}: {result.error}")
        return result, None
    result.seconds = time.perf_counter() - started
    result.segments = segment_counts(optimized)
    work.model.load_state_dict(start)
    measured = invfx.measure(work.callable(optimized), *work.positional(), steps=steps,
                             baseline=work.callable(work.model), loss=loss)
    result.peak, result.time = measured.peak_ratio, measured.time_ratio
    grads, buffers = one_step(work, optimized, loss, start)
    plain_grads, plain_buffers = one_step(work, work.model, loss, start)
    result.grad_error = relative_error(grads, plain_grads)
    result.batchnorm = compare_batchnorm(buffers, plain_buffers, start)
    work.model.load_state_dict(start)
    say(f"budget {budget}: optimize {result.seconds:.1f} s, segments {result.segments_cell()}, {measured}, "
        f"grad error {result.grad_error:.1e}, BN statistics as plain's: {result.batchnorm}")
    return result, measured


def run_model(spec: Spec, args: argparse.Namespace, progress: Callable[[str], None]) -> Row:
    row = Row(spec)
    reason = missing(spec)
    if reason:
        row.skipped = reason
        progress(f"{spec.name}: skipped, {reason}")
        return row

    def say(what: str) -> None:
        progress(f"{spec.name}: {what}")

    try:
        work = make_workload(spec, args.quick)
    except Exception as error:  # a builder that fails (a library's API changed): the row says so
        row.skipped = f"could not be built: {type(error).__name__}: {first_line(error)}"
        say(row.skipped)
        return row
    row.size = work.size
    loss = WeightedSum()
    start = copy.deepcopy(work.model.state_dict())
    for budget in (*BUDGETS, FALLBACK_BUDGET):
        if budget == FALLBACK_BUDGET:
            if row.attempts[0.5].least is None:
                break  # (0.75 only where 0.5 could not be met)
            least = row.attempts[None].peak
            if least is not None and least > FALLBACK_BUDGET:  # (its optimize would only find that out again)
                row.attempts[budget] = Attempt(budget, error=f"not tried: budget None's plan (least memory) "
                                               f"measures {least:.3f}")
                break
        row.attempts[budget], measured = attempt(work, budget, loss, start, args.steps, say)
        if measured is not None:
            row.plain_peak, row.plain_step = measured.baseline.peak_bytes, measured.baseline.step_seconds
    if not args.quick and row.worst_grad_error():  # (an error of 0 needs no scale)
        row.noise = plain_float32_error(work, loss, start)
        say(f"plain float32 gradients against float64: {row.noise:.1e}")
    return row


# --------------------------------------------------------------------------------------------- the report


def grad_cell(row: Row) -> str:
    worst = row.worst_grad_error()
    if worst is None:
        return "-"
    noise = "" if row.noise is None else f" (plain f32: {row.noise:.1e})"
    return f"{worst:.1e}{noise}" + ("" if worst <= row.tolerance() else " OVER")


def batchnorm_cell(row: Row) -> str:
    """"yes" / "no BN" when every plan's step left BatchNorm's statistics as plain's; else, per budget, how many
    layers counted the step more than once."""
    verdicts = {budget: a.batchnorm for budget, a in row.attempts.items() if a.batchnorm}
    if not verdicts:
        return "-"
    if len(set(verdicts.values())) == 1 and next(iter(verdicts.values())) in ("yes", "no BN"):
        return next(iter(verdicts.values()))
    cells = []
    for budget, verdict in verdicts.items():
        counted = re.search(r"(\d+) of (\d+) BN layers counted the step (\d+)x", verdict)
        short = (f"{counted.group(1)}/{counted.group(2)} layers updated {counted.group(3)}x" if counted else
                 verdict.removeprefix("NO: "))
        cells.append(f"{budget}: {'yes' if verdict == 'yes' else 'NO, ' + short}")
    return "; ".join(cells)


def table(rows: list[Row]) -> str:
    headers = ["model", "input", "plain peak (MiB), step (ms)", "optimize None", "optimize 0.5",
               "segments k/c/i/s None; 0.5", "None: peak, time / plain", "0.5: peak, time / plain",
               f"{FALLBACK_BUDGET} (where 0.5 fails)", "worst grad rel error", "BN statistics = plain"]
    lines = []
    for row in rows:
        if row.skipped:
            continue
        a = row.attempts
        fallback = a.get(FALLBACK_BUDGET)
        lines.append([
            row.spec.name, row.size,
            f"{mib(row.plain_peak)}, {row.plain_step * 1e3:.0f}" if row.plain_peak else "-",
            a[None].optimize_cell(), a[0.5].optimize_cell(),
            f"{a[None].segments_cell()}; {a[0.5].segments_cell()}",
            a[None].measured_cell(), a[0.5].measured_cell(),
            "" if fallback is None else fallback.measured_cell() if not fallback.error else fallback.optimize_cell(),
            grad_cell(row), batchnorm_cell(row)])
    return tabulate(lines, headers=headers, tablefmt="github", disable_numparse=True)


def failures_of(rows: list[Row]) -> list[str]:
    failures = []
    for row in rows:
        for budget, a in row.attempts.items():
            if a.crashed:
                failures.append(f"{row.spec.name} budget {budget}: {a.error}")
            if a.grad_error is not None and a.grad_error > row.tolerance():
                failures.append(f"{row.spec.name} budget {budget}: gradient relative error {a.grad_error:.2e} over "
                                f"{row.tolerance():.1e}")
    return failures


def notes_of(rows: list[Row], args: argparse.Namespace) -> list[str]:
    notes = [f"{row.spec.name}: skipped, {row.skipped}" for row in rows if row.skipped]
    for row in rows:
        half = row.attempts.get(0.5)
        least = row.attempts.get(None)
        if half is not None and half.least is not None and least is not None and least.peak is not None:
            notes.append(f"{row.spec.name}: budget 0.5 cannot be met; its BudgetError gives the least achievable "
                         f"as {half.least:.3f} of plain ({half.least_how}), and the plan of least memory (budget "
                         f"None) measures {least.peak:.3f}.")
    return notes


def parse_args(argv=None) -> argparse.Namespace:
    names = [s.name for s in SPECS]
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", help="comma-separated subset of: " + ", ".join(names))
    parser.add_argument("--steps", type=positive, help="timed steps per measurement, median (default 3; --quick 1)")
    parser.add_argument("--threads", type=positive, help="torch threads for the run, restored afterwards "
                        "(default: torch's own; --quick: 1)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, steps 1, one thread, no float64 "
                        "reference of plain's rounding; explicit options win")
    parser.add_argument("--output", type=Path, help="markdown file to write (default benchmarks/results/zoo.md, "
                        "or zoo_quick.md with --quick)")
    args = parser.parse_args(argv)
    args.specs = list(SPECS)
    if args.models:
        wanted = [m.strip() for m in args.models.split(",")]
        unknown = sorted(set(wanted) - set(names))
        if unknown:
            parser.error(f"unknown model(s) {unknown}; choose from {names}")
        args.specs = [s for s in SPECS if s.name in wanted]
    if args.steps is None:
        args.steps = 1 if args.quick else 3
    if args.threads is None and args.quick:
        args.threads = 1
    if args.output is None:
        args.output = RESULTS / ("zoo_quick.md" if args.quick else "zoo.md")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()

    def progress(what: str) -> None:
        print(f"[zoo] {what} ({time.perf_counter() - started:.0f} s)", file=sys.stderr, flush=True)

    threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        used_threads = torch.get_num_threads()
        rows = [run_model(spec, args, progress) for spec in args.specs]
    finally:
        torch.set_num_threads(threads)

    common = (f"float32, train mode, random weights; step = `loss(model(x)).backward()`, loss a fixed random "
              f"weighting of every output element; peak and time = `invfx.measure(optimized, x, baseline=model, "
              f"steps={args.steps})` (exact CPU peak of one step by allocator replay after a warm-up step; median "
              f"of {args.steps} steps interleaved with plain); torch {torch.__version__}, {used_threads} "
              f"thread{'s' if used_threads > 1 else ''}, {platform.machine()}; invfx {invfx.__version__}")
    legend = [
        "optimize: `invfx.optimize(model, x, memory_budget=b)` with its defaults (its float64 gradient check "
        "included): ok and its seconds, or the error's first line; a BudgetError gives the least achievable peak "
        "/ plain it states (estimated by the cost model, or measured on the example).",
        "segments k/c/i/s: the plan's segments in mode keep / checkpoint / invertible / selective.",
        f"{FALLBACK_BUDGET}: tried only where 0.5 cannot be met.",
        "worst grad rel error: max over parameters and budgets of |g - g_plain| / |g_plain| after one float32 step "
        f"from the initial state, same seed; plain f32: plain's own float32 gradients against a float64 copy's. "
        f"OVER: above max({GRAD_TOLERANCE:g}, {NOISE_FACTOR} x plain f32), a failure.",
        "BN statistics = plain: BatchNorm's running statistics after that step against plain's (relative "
        "difference <= 1e-4, and num_batches_tracked); NO says at which budget and in how many layers the "
        "recomputation updated them again.",
    ]
    lines = ["# Models from other libraries through `invfx.optimize`", "", common + ".", "",
             *(f"- {item}" for item in legend), "", table(rows), ""]
    notes = notes_of(rows, args)
    if notes:
        lines += [*(f"- {note}" for note in notes), ""]
    lines.append(f"run took {time.perf_counter() - started:.0f} s on {datetime.date.today().isoformat()}")
    return write_report(lines, args.output, failures_of(rows))


if __name__ == "__main__":
    sys.exit(main())
