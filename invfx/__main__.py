"""The ``invfx`` command (``python -m invfx``): ``invfx demo`` compares plain autograd, torch.utils.checkpoint
and invfx's invertible chain on a small training run; ``invfx plan FILE:FACTORY --input-shape ...`` prints the
memory plan of your model."""

from __future__ import annotations

import argparse
import sys

from . import cli_plan
from .argtypes import even, positive


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="invfx", description="invfx: memory-efficient training for PyTorch, "
                                     "by inverting or recomputing instead of keeping activations.")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    demo = commands.add_parser(
        "demo", help="train a chain of invertible couplings plainly, with torch.utils.checkpoint and with invfx; "
                     "compare peak memory, step time and gradients",
        description="Train a chain of hand-written additive couplings with SGD in three ways (plain autograd, "
                    "torch.utils.checkpoint, invfx invertible) and print the exact CPU peak memory of one "
                    "training step, the median step time, and whether invfx's gradients equal plain's.")
    demo.add_argument("--depth", type=positive, default=16, help="number of couplings (default 16)")
    demo.add_argument("--width", type=even, default=512, help="features per sample, even (default 512)")
    demo.add_argument("--batch", type=positive, default=256, help="batch size (default 256)")
    demo.add_argument("--steps", type=positive, default=3, help="timed SGD steps per mode (default 3)")
    cli_plan.add_parser(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command line ``argv`` (default ``sys.argv[1:]``); returns the exit status."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # --help (0) or a usage error (2): return the status instead of exiting
        return exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 2)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    if args.command == "demo":
        from .demo import run_demo

        result = run_demo(depth=args.depth, width=args.width, batch=args.batch, steps=args.steps)
        return 0 if result["grads_match"] else 1
    if args.command == "plan":
        return cli_plan.run_plan(args)
    parser.error(f"unknown command {args.command!r}")  # unreachable: argparse checks the choices
    return 2


if __name__ == "__main__":
    sys.exit(main())
