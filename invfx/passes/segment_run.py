"""Running the traced model on the example inputs segment by segment: what the analysis measures of each
segment (what it reads and makes, saves and computes, whether its inverse rebuilds its inputs), measured on the
graph it was found in, without making it a region first."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch.fx as fx

from .segments import Segment

__all__ = ["SegmentRun"]


class SegmentRun(fx.Interpreter):
    """An interpreter of the traced module that calls ``enter(name, inputs)`` before a segment's first node
    runs (``inputs``: the values of ``segment.inputs``) and ``leave(name, outputs)`` after its last node ran
    (``outputs``: the values of ``segment.outputs``). The segments are consecutive runs of compute nodes (as
    ``find_segments`` cuts them), so exactly one is running between an ``enter`` and its ``leave``. ``around(node)``,
    if given, is a context each node runs in."""

    def __init__(self, module: fx.GraphModule, segments: Mapping[str, Segment],
                 enter: Callable[[str, tuple[Any, ...]], None], leave: Callable[[str, tuple[Any, ...]], None],
                 around: Callable[[fx.Node], AbstractContextManager[Any]] | None = None) -> None:
        super().__init__(module)
        self.extra_traceback = False
        self._starts = {segment.nodes[0]: (name, segment) for name, segment in segments.items()}
        self._ends = {segment.nodes[-1]: (name, segment) for name, segment in segments.items()}
        self._enter, self._leave, self._around = enter, leave, around

    def run_node(self, node: fx.Node) -> Any:
        if node in self._starts:
            name, segment = self._starts[node]
            self._enter(name, tuple(self.env[n] for n in segment.inputs))
        with self._around(node) if self._around is not None else nullcontext():
            result = super().run_node(node)
        if node in self._ends:
            name, segment = self._ends[node]
            # (the interpreter stores the last node's value once this returns)
            self._leave(name, tuple(result if n is node else self.env[n] for n in segment.outputs))
        return result
