"""Every benchmark whose figures are in the README, at the README's sizes, in one command; the tables collected
into one file to paste from.

Runs, in one process and in this order (each script's own ``main``, so each can also be run alone):

* ``chain_memory.py``: hand-written invertible chain, plain / checkpoint / invertible, depths 4..64 (README:
  the first table of "Measured");
* ``depth_sweep.py``: the coupling stack, the Glow-style flow, the two-stream transformer and the ResNet by
  depth, plain / torch checkpoint / revlib / memcnn / invfx (the depth-sweep table and its PNG);
* ``peers.py --depths 8,32 --width 1024 --hidden 1024 --batch 512 --repeats 9``: revlib and memcnn on the same
  coupling stack;
* ``resnet_budget.py``: memory budgets on a ResNet and a transformer: checkpoint_sequential, per-block
  checkpoint, torch.compile, invfx (the budget tables and a peak-against-time PNG per model);
* ``plan_speed.py --sizes 200``: planning time of 200-segment chains and of a 988-node ResNet graph (the README
  quotes these in prose; the script's default also plans 1,000-segment chains, which the README does not);
* ``check_cost.py``: what optimize's gradient check costs (``check_gradients``);
* ``zoo.py``: timm, torchvision, Hugging Face and FrEIA models through ``invfx.optimize`` at budgets None and
  0.5 (README: "Models from other libraries"); rows of a library not installed are skipped with a note.

What each measures and how is in its docstring: peak memory by allocator replay
(:func:`invfx.memory.cpu_peak_memory`), step times as ratios to plain autograd from interleaved rounds in one
process. Each writes its report to ``--output-dir`` (default ``benchmarks/results``) as ``NAME.md``
(``--quick``: ``NAME_quick.md``), and this script writes them all, under a description of the machine (CPU model
from ``/proc/cpuinfo``, cores, torch threads, torch version, date), to ``README_tables.md``
(``README_tables_quick.md``): refreshing the README's "Measured" section is pasting from that file.

Progress on stderr: a line as each benchmark starts and ends, with the elapsed time and an estimate of what
remains (:data:`EXPECTED_SECONDS`, rescaled by how long the finished ones took), besides each benchmark's own
progress lines. A benchmark that fails or crashes does not stop the others; the exit status is 1 if any did.
The peers' optional dependencies (revlib, memcnn) missing: their columns are skipped with a note.

    make bench                                            # = .venv/bin/python benchmarks/suite.py
    .venv/bin/python benchmarks/suite.py --quick          # tiny sizes, one torch thread, well under a minute
    .venv/bin/python benchmarks/suite.py --only depth_sweep,peers --output-dir /tmp/bench
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import os
import platform
import re
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"


@dataclass(frozen=True)
class Benchmark:
    name: str  # the script benchmarks/NAME.py, whose main(argv) returns an exit status
    title: str  # what its README table shows
    full: tuple[str, ...] = ()  # arguments for the README's sizes
    quick: tuple[str, ...] = ("--quick",)

    def argv(self, quick: bool, output: Path) -> list[str]:
        return [*(self.quick if quick else self.full), "--output", str(output)]

    def command(self, quick: bool) -> str:
        return " ".join(["python", f"benchmarks/{self.name}.py", *(self.quick if quick else self.full)])


BENCHMARKS = (
    Benchmark("chain_memory", "a hand-written chain of invertible couplings: plain, checkpoint, invertible"),
    Benchmark("depth_sweep", "depth sweeps of four plainly written models: plain, torch checkpoint, revlib, "
              "memcnn, invfx.optimize"),
    Benchmark("peers", "revlib and memcnn against invfx on the same plainly written coupling stack",
              full=("--depths", "8,32", "--width", "1024", "--hidden", "1024", "--batch", "512", "--repeats", "9")),
    Benchmark("resnet_budget", "memory budgets on a ResNet and a transformer: checkpoint_sequential, per-block "
              "checkpoint, torch.compile, invfx",
              quick=("--quick", "--budgets", "1.0,0.5")),
    Benchmark("plan_speed", "planning time: 200-segment chains and a 988-node ResNet graph",
              full=("--sizes", "200")),
    Benchmark("check_cost", "what optimize's gradient check costs"),
    Benchmark("zoo", "models from other libraries (timm, torchvision, Hugging Face, FrEIA) at budgets None and 0.5"),
)

#: rough seconds per benchmark on a quiet 2-core CPU, only for the progress line's estimate of what remains
EXPECTED_SECONDS = {
    False: {"chain_memory": 90, "depth_sweep": 300, "peers": 170, "resnet_budget": 300, "plan_speed": 40,
            "check_cost": 120, "zoo": 900},
    True: {"chain_memory": 3, "depth_sweep": 8, "peers": 2, "resnet_budget": 12, "plan_speed": 2, "check_cost": 3,
           "zoo": 40},
}


@dataclass
class Outcome:
    benchmark: Benchmark
    output: Path
    status: str  # "ok", "failed (exit status N)", "crashed: ..."
    seconds: float


# --------------------------------------------------------------------------------------------- the machine


def cpu_model() -> str:
    """The first ``model name`` of ``/proc/cpuinfo`` (elsewhere: ``platform.processor()``)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def machine() -> str:
    import torch

    return (f"{cpu_model()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads; "
            f"{platform.system()} {platform.machine()}; Python {platform.python_version()}; torch {torch.__version__}")


# --------------------------------------------------------------------------------------------- the run


class Progress:
    """``[suite]`` lines on stderr: elapsed time and the expected seconds of what remains, rescaled by
    the ratio of actual to expected seconds of the benchmarks done so far."""

    def __init__(self, names: list[str], expected: dict[str, float]):
        self.started = time.perf_counter()
        self.expected = {name: expected.get(name, 60.0) for name in names}
        self.done: dict[str, float] = {}

    def left(self) -> float:
        finished_expected = sum(self.expected[n] for n in self.done)
        scale = sum(self.done.values()) / finished_expected if finished_expected else 1.0
        remaining = sum(e for n, e in self.expected.items() if n not in self.done) * scale
        return remaining

    def say(self, text: str) -> None:
        elapsed = time.perf_counter() - self.started
        print(f"[suite] {text} ({elapsed:.0f} s elapsed, about {self.left():.0f} s left)", file=sys.stderr,
              flush=True)


def run_one(benchmark: Benchmark, quick: bool, output: Path) -> Outcome:
    """Import ``benchmarks/NAME.py`` and call its ``main``; a non-zero status or an exception is the outcome."""
    started = time.perf_counter()
    try:
        module = importlib.import_module(benchmark.name)
        code = module.main(benchmark.argv(quick, output))
        status = "ok" if not code else f"failed (exit status {code})"
    except Exception as error:  # one benchmark's crash is reported; the others still run
        traceback.print_exc()
        status = f"crashed: {type(error).__name__}: {error}"
    return Outcome(benchmark, output, status, time.perf_counter() - started)


def section(outcome: Outcome, quick: bool) -> list[str]:
    """One benchmark's part of README_tables.md: its command, status and report (its headings two levels down:
    its title level 3, its sections level 4)."""
    b = outcome.benchmark
    lines = [f"## {b.name}: {b.title}", "",
             f"`{b.command(quick)}`: {outcome.status}, {outcome.seconds:.0f} s; report `{outcome.output.name}`", ""]
    if outcome.output.exists():
        lines += [f"##{line}" if re.match(r"#{1,4} ", line) else line
                  for line in outcome.output.read_text().rstrip().splitlines()]
    else:
        lines.append("(no report written)")
    return lines + [""]


def combined(outcomes: list[Outcome], quick: bool, total: float) -> str:
    when = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    head = ["# Benchmark tables for the README", "",
            f"`python benchmarks/suite.py{' --quick' if quick else ''}` on {when}, {total:.0f} s in all. "
            f"Machine: {machine()}.", ""]
    if quick:
        head += ["**Quick run: tiny sizes for a smoke test, not figures for the README.**", ""]
    head += ["Each section is one benchmark's report as written to its own file; the README's \"Measured\" "
             "section pastes its tables from here.", ""]
    return "\n".join(head + [line for outcome in outcomes for line in section(outcome, quick)]).rstrip() + "\n"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="every benchmark at tiny sizes (a smoke test)")
    parser.add_argument("--output-dir", type=Path, default=RESULTS, help="where the reports go (default "
                        "benchmarks/results)")
    parser.add_argument("--only", help="comma-separated subset of " + ",".join(b.name for b in BENCHMARKS))
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's own; --quick: 1, so a smoke "
                        "test on a busy machine does not spin-wait)")
    args = parser.parse_args(argv)
    names = [b.name for b in BENCHMARKS]
    args.only = names if not args.only else [n.strip() for n in args.only.split(",")]
    unknown = sorted(set(args.only) - set(names))
    if unknown:
        parser.error(f"unknown benchmark(s) {unknown}; choose from {names}")
    if args.threads is None and args.quick:
        args.threads = 1
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if str(HERE) not in sys.path:
        sys.path.insert(0, str(HERE))  # the benchmarks import each other (depth_sweep uses peers)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    suffix = "_quick" if args.quick else ""
    args.output_dir.mkdir(parents=True, exist_ok=True)
    chosen = [b for b in BENCHMARKS if b.name in args.only]
    progress = Progress([b.name for b in chosen], EXPECTED_SECONDS[args.quick])
    outcomes = []
    for index, benchmark in enumerate(chosen, 1):
        progress.say(f"{index}/{len(chosen)} {benchmark.name}: `{benchmark.command(args.quick)}`")
        outcome = run_one(benchmark, args.quick, args.output_dir / f"{benchmark.name}{suffix}.md")
        progress.done[benchmark.name] = outcome.seconds
        outcomes.append(outcome)
        progress.say(f"{index}/{len(chosen)} {benchmark.name}: {outcome.status} in {outcome.seconds:.0f} s")
    path = args.output_dir / f"README_tables{suffix}.md"
    path.write_text(combined(outcomes, args.quick, time.perf_counter() - progress.started))
    print(f"all tables written to {path}")
    failed = [o for o in outcomes if o.status != "ok"]
    for outcome in failed:
        print(f"FAIL: {outcome.benchmark.name}: {outcome.status}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
