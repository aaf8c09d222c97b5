"""``python -m invfx plan FILE:FACTORY --input-shape ...``: the plan of a user's model, and one clear line for
every mistake a user can make."""

import re

import pytest

from invfx.__main__ import main

MODELS = '''
import torch
from torch import nn
from invfx.examples import ResNet, RevNetMLP


def resnet():
    return ResNet(depth=3, channels=4)


def revnet():
    return RevNetMLP(depth=3, width=16, hidden=16)


def broken():
    raise ValueError("no weights here")


def not_a_module():
    return 3


not_callable = 7
'''


@pytest.fixture
def models(tmp_path):
    path = tmp_path / "models.py"
    path.write_text(MODELS)
    (tmp_path / "bad_syntax.py").write_text("def f(:\n")
    return path


def test_plan_prints_the_plan(models, capsys):
    assert main(["plan", f"{models}:revnet", "--input-shape", "4,16"]) == 0
    out = capsys.readouterr().out
    assert "inv_blocks_" in out and "estimated peak" in out
    assert main(["plan", f"{models}:resnet", "--input-shape", "2,3,8,8", "--budget", "0.9"]) == 0
    out = capsys.readouterr().out
    assert "memory budget 0.9 of plain" in out and "checked on the example" in out


@pytest.mark.parametrize("args, message", [
    (["{dir}/missing.py:f", "--input-shape", "1"], "no such file"),
    (["{dir}/bad_syntax.py:f", "--input-shape", "1"], "importing"),
    (["{models}:nothing", "--input-shape", "1"], "has no 'nothing'; callables in it: ResNet, RevNetMLP, broken"),
    (["{models}:not_callable", "--input-shape", "1"], "is a int, not a callable"),
    (["{models}:broken", "--input-shape", "1"], "calling .* failed: ValueError: no weights here"),
    (["{models}:not_a_module", "--input-shape", "1"], "returned a int, not an nn.Module"),
    (["{models}:resnet", "--input-shape", "2,3"], r"does not run on an input of shape \(2, 3\)"),
    (["{models}:resnet", "--input-shape", "2,3,8,8", "--budget", "0.01"], "memory budget 0.01 of plain cannot be met"),
    (["{models}:resnet", "--input-shape", "2,3,8,8", "--modes", "keep,fast"], "unknown modes"),
    (["{models}", "--input-shape", "1"], "expected FILE:FACTORY"),
])
def test_plan_errors_are_one_clear_line(models, capsys, args, message):
    args = [a.format(dir=models.parent, models=models) for a in args]
    assert main(["plan", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("invfx plan: ") and "Traceback" not in err
    assert re.search(message, err), err


@pytest.mark.parametrize("option, value", [("--input-shape", "2,a"), ("--input-shape", "0,3"),
                                           ("--budget", "3.5"), ("--budget", "-1"), ("--budget", "lots")])
def test_bad_option_values_are_usage_errors(models, capsys, option, value):
    args = ["plan", f"{models}:resnet", "--input-shape", "2,3,8,8", option, value]
    assert main(args) == 2
    assert "invfx plan: error: argument" in capsys.readouterr().err


def test_budget_units():
    from invfx.cli_plan import budget

    assert budget("0.5") == 0.5 and budget("1") == 1.0 and budget("2000") == 2000
    assert budget("200MB") == 200 * 10**6 and budget("1.5GiB") == int(1.5 * 2**30) and budget("64kib") == 65536


def test_demo_compares_and_shows_the_plan_of_an_unmodified_model(capsys):
    assert main(["demo", "--depth", "3", "--width", "32", "--batch", "16", "--steps", "1"]) == 0
    out = capsys.readouterr().out
    assert "invfx invertible" in out and "torch.utils.checkpoint" in out
    assert "invfx.optimize on a plainly written RevNet MLP" in out and "inv_blocks_" in out
    assert "DO NOT MATCH" not in out


def test_demo_numbers():
    import io

    from invfx.demo import run_demo

    result = run_demo(depth=4, width=32, batch=16, steps=1, file=io.StringIO())
    assert result["grads_match"] and result["optimize"]["peak_ratio"] < 1
