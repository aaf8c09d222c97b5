"""``python -m invfx plan path/to/file.py:factory --input-shape 8,3,32,32 [--budget 0.5]``: the memory plan of
a user's model, without training it.

The factory is any callable in the file (a function or a class) that returns an ``nn.Module`` when called with
no arguments. The example input is ``torch.randn`` of the given shape (``--dtype``, default float32). Every
failure a user can cause (a missing file, a file that does not import, no such name, a factory that fails or
returns something else, a bad shape or budget, a model that does not run on that shape) is one line on stderr
saying which and why, and exit status 2; no traceback.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

__all__ = ["add_parser", "run_plan", "PlanCommandError", "load_factory", "input_shape", "budget"]


class PlanCommandError(Exception):
    """A user error in ``invfx plan``: printed as one line, exit status 2."""


def input_shape(text: str) -> tuple[int, ...]:
    try:
        dims = tuple(int(d) for d in text.replace("x", ",").split(",") if d.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive sizes like 8,3,32,32, got {text!r}") \
            from None
    if not dims or min(dims) < 1:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive sizes like 8,3,32,32, got {text!r}")
    return dims


_UNITS = {"kib": 2**10, "mib": 2**20, "gib": 2**30, "kb": 10**3, "mb": 10**6, "gb": 10**9}


def budget(text: str) -> float | int:
    """A fraction of the plain peak in (0, 1] (``0.5``), or bytes: a whole number above 1 (``200000000``) or a
    number with a unit (``200MB``, ``1.5GiB``)."""
    lowered = text.strip().lower()
    unit = next((u for u in _UNITS if lowered.endswith(u)), None)
    number = lowered[:-len(unit)] if unit else lowered
    try:
        value = float(number)
    except ValueError:
        value = float("nan")
    if unit and value > 0:
        return int(value * _UNITS[unit])
    if not unit and 0 < value <= 1:
        return value
    if not unit and value > 1 and value.is_integer():
        return int(value)
    raise argparse.ArgumentTypeError(f"expected a fraction in (0, 1], a whole number of bytes or a size like "
                                     f"200MB, got {text!r}")


def add_parser(commands) -> None:
    plan = commands.add_parser(
        "plan", help="print the memory plan invfx makes for your model",
        description="Load FACTORY from FILE, build the model, run invfx.optimize on a random input of the given "
                    "shape and print its plan: a row per segment (mode, kept bytes, recompute cost, risk, why).")
    plan.add_argument("target", metavar="FILE:FACTORY",
                      help="a Python file and the name of a callable in it that returns an nn.Module")
    plan.add_argument("--input-shape", type=input_shape, required=True, metavar="N,C,H,W",
                      help="shape of the example input, e.g. 8,3,32,32")
    plan.add_argument("--budget", type=budget, default=None,
                      help="memory budget: a fraction of the plain peak (0.5) or bytes (200000000, 200MB)")
    plan.add_argument("--dtype", choices=("float32", "float64", "bfloat16"), default="float32",
                      help="dtype of the model and input (default float32)")
    plan.add_argument("--modes", default="keep,checkpoint,invertible,selective",
                      help="modes the plan may use, comma-separated (default keep,checkpoint,invertible,selective)")


def load_factory(target: str):
    """The callable named by ``path/to/file.py:name``."""
    path_text, sep, name = target.rpartition(":")
    if not sep or not path_text or not name:
        raise PlanCommandError(f"expected FILE:FACTORY (e.g. models.py:make_model), got {target!r}")
    path = Path(path_text)
    if not path.is_file():
        raise PlanCommandError(f"no such file: {path}")
    spec = importlib.util.spec_from_file_location(f"invfx_plan_{path.stem}", path)
    if spec is None or spec.loader is None:
        raise PlanCommandError(f"{path} is not a Python file")
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(path.resolve().parent))  # (the file may import its neighbours)
    try:
        spec.loader.exec_module(module)
    except Exception as error:  # noqa: BLE001 - the user's code: report, do not crash
        raise PlanCommandError(f"importing {path} failed: {type(error).__name__}: {error}") from None
    finally:
        sys.path.pop(0)
    factory = getattr(module, name, None)
    if factory is None:
        public = sorted(n for n, v in vars(module).items() if callable(v) and not n.startswith("_"))
        raise PlanCommandError(f"{path} has no {name!r}; callables in it: {', '.join(public) or 'none'}")
    if not callable(factory):
        raise PlanCommandError(f"{path}:{name} is a {type(factory).__name__}, not a callable")
    return factory


def run_plan(args) -> int:
    import torch
    from torch import nn

    import invfx

    try:
        factory = load_factory(args.target)
        try:
            model = factory()
        except Exception as error:  # noqa: BLE001 - the user's code
            raise PlanCommandError(f"calling {args.target}() failed: {type(error).__name__}: {error}") from None
        if not isinstance(model, nn.Module):
            raise PlanCommandError(f"{args.target}() returned a {type(model).__name__}, not an nn.Module")
        dtype = getattr(torch, args.dtype)
        model = model.to(dtype)
        modes = tuple(m.strip() for m in args.modes.split(",") if m.strip())
        x = torch.randn(*args.input_shape, dtype=dtype)
        try:
            with torch.no_grad():
                model.eval()(x)
            model.train()
        except Exception as error:  # noqa: BLE001 - the user's model on this shape
            raise PlanCommandError(f"the model does not run on an input of shape {tuple(args.input_shape)}: "
                                   f"{type(error).__name__}: {error}") from None
        try:
            optimized = invfx.optimize(model, x, memory_budget=args.budget, modes=modes)
        except invfx.InvfxError as error:
            raise PlanCommandError(str(error)) from None
    except PlanCommandError as error:
        print(f"invfx plan: {error}", file=sys.stderr)
        return 2
    print(optimized.plan)
    return 0
