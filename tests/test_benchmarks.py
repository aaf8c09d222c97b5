"""``benchmarks/suite.py --quick`` runs every README benchmark at tiny sizes and writes every report, the
depth-sweep table has a row per model and depth and a column per library, and missing peer libraries are
skipped with a note. One subprocess of the whole quick suite (about 15 s on two cores), the rest in-process."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
NAMES = ("chain_memory", "depth_sweep", "peers", "resnet_budget", "plan_speed", "check_cost", "zoo")
MODELS = ("coupling stack", "Glow-style flow", "two-stream transformer", "ResNet")
QUICK_DEPTHS = ("2", "4")
LIBRARIES = ("plain", "checkpoint", "revlib", "memcnn", "invfx")


def installed(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


@pytest.fixture(scope="module")
def quick_suite(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    run = subprocess.run([sys.executable, str(BENCHMARKS / "suite.py"), "--quick", "--output-dir", str(out)],
                         capture_output=True, text=True, timeout=600)
    return out, run


def markdown_tables(text: str) -> list[list[list[str]]]:
    """Every github-style table of ``text``: its rows (the header first) as lists of stripped cells."""
    tables, current = [], []
    for line in text.splitlines() + [""]:
        if line.startswith("|"):
            if not re.fullmatch(r"\|[-|: ]+\|", line):
                current.append([cell.strip() for cell in line.strip("|").split("|")])
        elif current:
            tables.append(current)
            current = []
    return tables


@pytest.mark.slow
def test_quick_suite_writes_every_report(quick_suite):
    out, run = quick_suite
    assert run.returncode == 0, run.stderr[-3000:]
    for name in NAMES:
        assert (out / f"{name}_quick.md").stat().st_size > 0, name
    assert not installed("matplotlib") or (out / "depth_sweep_quick.png").stat().st_size > 0
    assert not list(out.glob(f"{NAMES[0]}.md")), "--quick must not write the full-size report names"


def test_combined_file_has_the_machine_and_every_table(quick_suite):
    out, _ = quick_suite
    text = (out / "README_tables_quick.md").read_text()
    assert re.search(r"Machine: .+, \d+ cores, \d+ torch threads; .*torch \d", text)
    assert "Quick run" in text
    for name in NAMES:
        assert f"## {name}: " in text and f"`python benchmarks/{name}.py" in text, name
        assert ": ok, " in text.split(f"## {name}: ")[1].split("\n## ")[0], name
    assert len(markdown_tables(text)) >= len(NAMES)


def test_peers_report_compares_invfx_and_revlib_round_by_round(quick_suite):
    out, _ = quick_suite
    text = (out / "peers_quick.md").read_text()
    if not installed("revlib"):
        pytest.skip("revlib is not installed")
    for depth in QUICK_DEPTHS:
        assert re.search(rf"depth {depth}: invfx / revlib step time round by round: median [0-9.]+; invfx took "
                         rf"at most revlib's time in \d+ of 2 rounds", text), text


def test_interleaved_times_rotate_the_order_and_keep_every_round():
    from invfx.timing import interleaved_times

    order = []
    times = interleaved_times({"a": lambda: order.append("a"), "b": lambda: order.append("b")}, 3,
                              prepare=lambda name: order.append("prepare " + name))
    assert [n for n in order if not n.startswith("prepare")] == ["a", "b", "b", "a", "a", "b", "b", "a"]
    assert order[:2] == ["prepare a", "a"]  # (prepared right before its own call)
    assert len(times["a"]) == len(times["b"]) == 3 and all(t >= 0 for t in times["a"] + times["b"])


def test_depth_sweep_table_rows_and_columns(quick_suite):
    out, _ = quick_suite
    compact, detail = markdown_tables((out / "depth_sweep_quick.md").read_text())
    assert compact[0] == ["model", "depth", "plain peak (MiB)", "plain step (ms)", *LIBRARIES[1:]]
    assert [row[:2] for row in compact[1:]] == [[m, d] for m in MODELS for d in QUICK_DEPTHS]
    cells = {(row[0], row[1]): dict(zip(compact[0], row)) for row in compact[1:]}
    for (model, _depth), row in cells.items():
        assert float(row["plain peak (MiB)"]) > 0
        assert re.fullmatch(r"[0-9.]+, [0-9.]+x", row["checkpoint"]), row
        if model in ("Glow-style flow", "ResNet"):
            assert row["revlib"] == row["memcnn"] == "n/a"
        for peer in ("revlib", "memcnn"):
            if model in ("coupling stack", "two-stream transformer") and installed(peer):
                assert re.fullmatch(r"[0-9.]+, [0-9.]+x", row[peer]), row
        if model != "ResNet":  # the ResNet's budget of 0.5 is out of reach at the quick depths
            assert re.fullmatch(r"[0-9.]+, [0-9.]+x( \(grads differ\))?", row["invfx"]), row
    assert detail[0][:3] == ["model", "depth", "library"]
    assert {row[2] for row in detail[1:]} >= {"plain", "checkpoint", "invfx"}


def test_zoo_table_has_a_row_per_model_or_a_note_why_not(quick_suite):
    out, _ = quick_suite
    text = (out / "zoo_quick.md").read_text()
    table = markdown_tables(text)[0]
    header = table[0]
    assert header[:2] == ["model", "input"] and "worst grad rel error" in header
    rows = {row[0]: dict(zip(header, row)) for row in table[1:]}
    # (prefix of the rows' names, library, models): a row each, or a note saying why they were skipped
    for prefix, library, count in (("timm", "timm", 4), ("torchvision", "torchvision", 2),
                                   ("HF", "transformers", 2), ("FrEIA", "FrEIA", 2)):
        named = [name for name in rows if name.startswith(prefix + " ")]
        skipped = re.findall(rf"^- {prefix} [^:]*: skipped, ", text, re.M)
        assert len(named) + len(skipped) == count, (prefix, named, skipped)
        runs = installed(library) and (prefix != "FrEIA" or (BENCHMARKS / "zoo_models.py").exists())
        assert len(named) == (count if runs else 0), (prefix, named)
    for row in rows.values():
        assert re.fullmatch(r"ok, [0-9.]+ s", row["optimize None"]), row  # (the plan of least memory exists)
        assert re.fullmatch(r"[0-9.]+, [0-9.]+x", row["None: peak, time / plain"]), row
        assert re.fullmatch(r"\d+/\d+/\d+/\d+; (\d+/\d+/\d+/\d+|-)", row["segments k/c/i/s None; 0.5"]), row
        assert re.fullmatch(r"ok, [0-9.]+ s|BudgetError: least achievable [0-9.]+ \(.+\)", row["optimize 0.5"]), row
        assert re.match(r"[0-9.]+e[-+]\d+", row["worst grad rel error"]) and "OVER" not in row["worst grad rel error"]


def test_progress_lines_say_elapsed_and_left(quick_suite):
    _, run = quick_suite
    sweep = [line for line in run.stderr.splitlines() if line.startswith("[depth_sweep] ")]
    cells = sum(1 for line in sweep if re.search(r" depth \d+ \w+: ", line))
    assert cells >= len(MODELS) * len(QUICK_DEPTHS) * 3  # plain, checkpoint and invfx at least
    assert all(re.search(r"\(\d+ s elapsed, (about \d+ s left|no estimate before one group is done)\)$", line)
               for line in sweep)
    suite = [line for line in run.stderr.splitlines() if line.startswith("[suite] ")]
    assert len(suite) == 2 * len(NAMES) and all("s left)" in line for line in suite)


@pytest.fixture
def benchmarks_path(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))


@pytest.fixture
def one_thread():
    """As the quick suite does: on a busy machine two threads spin-wait for each other."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_missing_peers_are_skipped_with_a_note(benchmarks_path, one_thread, monkeypatch, tmp_path):
    import depth_sweep

    monkeypatch.setitem(sys.modules, "revlib", None)  # import revlib raises ImportError
    monkeypatch.setitem(sys.modules, "memcnn", None)
    output = tmp_path / "sweep.md"
    assert depth_sweep.main(["--quick", "--depths", "2", "--models", "coupling stack", "--repeats", "1",
                             "--output", str(output)]) == 0
    text = output.read_text()
    assert "revlib: skipped, import failed" in text and "memcnn: skipped, import failed" in text
    compact = markdown_tables(text)[0]
    assert compact[1][compact[0].index("revlib")] == "n/a"


def test_checkpoint_blocks_shares_parameters_and_leaves_the_model_alone(benchmarks_path):
    from depth_sweep import Checkpointed, checkpoint_blocks

    from invfx.examples import Glow

    model = Glow(channels=3, levels=2, depth=2, hidden=4)
    wrapped = checkpoint_blocks(model, "levels")
    assert all(isinstance(step, Checkpointed) for level in wrapped.levels for step in level)
    assert not any(isinstance(m, Checkpointed) for m in model.modules())
    assert [id(p) for p in wrapped.parameters()] == [id(p) for p in model.parameters()]
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(wrapped(x), model(x))


def test_transformer_peers_compute_the_plain_model(benchmarks_path):
    from depth_sweep import AttentionHalf, MLPHalf, TwoStreamPeer

    from invfx.examples import ReversibleTransformer

    class Plain(nn.Module):  # the peers' body without a peer: F, G applied as revlib and memcnn apply them
        def __init__(self, model):
            super().__init__()
            self.halves = nn.ModuleList(h for b in model.blocks for h in (AttentionHalf(b), MLPHalf(b)))

        def forward(self, x):
            x1, x2 = x.chunk(2, -1)
            for f, g in zip(self.halves[::2], self.halves[1::2]):
                x1 = x1 + f(x2)
                x2 = x2 + g(x1)
            return torch.cat([x1, x2], -1)

    model = ReversibleTransformer(features=4, dim=8, depth=2, heads=2, hidden=8)
    x = torch.randn(2, 5, 4)
    torch.testing.assert_close(TwoStreamPeer(model, Plain(model))(x), model(x))


def test_resnet_budget_times_a_budgets_methods_with_plain_round_by_round(benchmarks_path):
    import time

    from resnet_budget import time_together

    model = nn.Linear(3, 1)
    seen = []  # (who, every gradient zero when its step began)

    class Slow(nn.Module):  # the model's forward after a sleep, on the model's parameters
        def __init__(self, name, seconds):
            super().__init__()
            self.name, self.seconds, self.model = name, seconds, model

        def forward(self, x):
            seen.append((self.name, all(p.grad is None or not p.grad.any() for p in model.parameters())))
            time.sleep(self.seconds)
            return self.model(x)

    plain, fast, slow = Slow("plain", 0.002), Slow("fast", 0.002), Slow("slow", 0.02)
    seconds, ratios = time_together(plain, [fast, slow], torch.randn(4, 3), lambda out: out.sum(), repeats=3)
    assert [name for name, _ in seen].count("plain") == 4 and len(seen) == 12  # a warm-up round, then 3
    assert all(zeroed for _, zeroed in seen[1:])  # every step after the first starts from zeroed gradients
    assert seconds[1] >= 0.02 and ratios[1] > 2 * ratios[0]
