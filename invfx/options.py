"""The knobs of ``invfx.optimize`` that are not the plan's inputs: how far its searches go."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["OptimizeOptions"]


@dataclass(frozen=True)
class OptimizeOptions:
    """``invfx.optimize(model, x, options=OptimizeOptions(...))``; the defaults suit models of a few thousand
    nodes on a CPU."""

    max_segment_nodes: int = 256  # the longest segment the solver is asked for (and the longest chain)
    max_solve_attempts: int = 24  # failed solves from one start before the segment finder gives up on it
    calibration_rounds: int = 6  # replans after measuring, where a budgeted plan's measured peak misses
    chains: bool = True  # merge runs of invertible regions into one region each
    # what the planner minimizes within the budget: "time", each segment's recomputation as measured on the example
    # (node by node, a few runs: BatchNorm and ReLU take as long as a convolution on a CPU, which FLOPs miss), or
    # "flops", counted (the same plan on every machine and every run)
    compute: str = "time"
    # invertible regions record the branches (relu masks, clamp ranges, max-pool argmaxes) their recomputed
    # sub-networks take, so that gradients are plain autograd's where rounding in a rebuild moves a value across
    # a threshold (invfx.runtime.branches); False saves that time and memory (measured on a Glow-style flow with
    # ReLU coupling nets, depth 32: 2.37x plain's step with them, 2.05x without) for gradients exact only where
    # no such value flips
    exact_branches: bool = True
    # each nn.Dropout the model calls saves its mask for backward, a byte an element, instead of its float noise
    # (torch's CPU dropout saves the noise: 4 bytes an element in float32), with the same values and gradients
    # (invfx.passes.lean_dropout); not done under memory_budget=1.0 or with keep the only mode
    lean_dropout: bool = True
    # a LayerNorm's or GELU's output that Linear calls save for backward is rebuilt from its input when backward
    # needs it (invfx.passes.recompute_saved): on the benchmark transformer 6 of a block's 18 MiB for about 1 ms
    # of its backward; under a budget, only where the plan needs the memory; not done where lean_dropout is not
    recompute_saved: bool = True

    def __post_init__(self):
        if self.compute not in ("time", "flops"):
            from .errors import InvfxError

            raise InvfxError(f"invfx.OptimizeOptions: compute must be 'time' or 'flops', got {self.compute!r}")
        for name in ("max_segment_nodes", "max_solve_attempts", "calibration_rounds"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < (0 if name == "calibration_rounds"
                                                                                 else 1):
                from .errors import InvfxError

                raise InvfxError(f"invfx.OptimizeOptions: {name} must be a positive whole number, got {value!r}")
