"""The memory plan ``invfx.optimize`` returns as ``opt.plan``: a typed row per segment and the report
(``print(opt.plan)``, ``opt.plan.to_dict()``)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from tabulate import tabulate

from .modes import Mode
from .stash_levels import LEVEL_LIMIT
from .units import format_bytes, format_flops

__all__ = ["Plan", "PlanRow"]


@dataclass
class PlanRow:
    """One segment of the plan. Reads as a mapping too (``row["mode"]``), as rows did when they were dicts."""

    name: str  # the region running it (``inv_blocks_3``), or ``(module)`` for a segment kept as plain code
    region: str | None  # the region that runs it: its own, or the chain it is a link of; None when kept
    nodes: int  # graph nodes in the segment
    mode: Mode
    kept_bytes: int  # what it keeps for backward in its mode
    recompute_flops: float  # what its backward recomputes
    risk: str | None  # the inverse's numerical risk and the reconstruction error measured on the example
    why: str  # why this mode (and what the others would cost)
    saved_bytes: int | None = None  # what plain autograd saves inside it
    input_bytes: int = 0
    flops: float | None = None  # its forward
    inverse_flops: float | None = None
    freed_bytes: int = 0  # inputs it frees (invertible)
    reconstruction_error: float | None = None
    inputs: list[str] = field(default_factory=list)
    freed: list[str] = field(default_factory=list)
    kept_ops: list[str] = field(default_factory=list)  # selective: the calls whose outputs it keeps
    recomputed_ops: list[str] = field(default_factory=list)  # selective: the calls its backward runs again
    # invertible: what its sub-networks' branching ops took, kept for their recomputation on rebuilt inputs
    branch_bytes: int = 0
    branch_ops: dict[str, int] = field(default_factory=dict)  # those ops by kind: {"relu": 2}
    # checkpoint and selective: its dropouts' masks, 1 bit per element, so that its recomputation draws nothing
    mask_bytes: int = 0

    def __getitem__(self, key: str):
        if key not in self.__dataclass_fields__:
            raise KeyError(key)
        return getattr(self, key)

    def get(self, key: str, default=None):
        return getattr(self, key, default) if key in self.__dataclass_fields__ else default

    def keys(self):
        return self.__dataclass_fields__.keys()

    def to_dict(self) -> dict:
        row = dataclasses.asdict(self)
        row["mode"] = str(self.mode)
        return row


class Plan:
    """The memory plan: a row per segment (name, nodes, mode, kept bytes, recompute cost, numerical risk, why),
    the totals (estimated peak against plain, extra compute), what could not be traced, and, once
    :func:`invfx.measure` has run on the optimized module, the measured peak and time beside the estimates."""

    # where the plan weighed measured time: its extra time and the forward's, at the example's size (class
    # defaults: a plan pickled before they were measured has neither)
    extra_seconds: float | None = None
    forward_seconds: float | None = None

    def __init__(self, rows: list[PlanRow], opaque: dict[str, str], chain=None, outside_bytes: int = 0,
                 budget=None, forward_flops: float = 0.0, calibration: dict | None = None,
                 constants: dict | None = None, forward_seconds: float | None = None,
                 thinned_stashes: list[str] | None = None, lean_dropouts: dict[str, int] | None = None,
                 recomputed_saved: dict[str, int] | None = None):
        self.rows = rows
        self.opaque = opaque
        self.constants = dict(constants or {})  # forward parameters traced as their defaults (not given)
        self.budget = budget
        self.estimated_peak = (chain.peak + outside_bytes) if chain is not None else None
        self.plain_peak = (chain.plain_peak + outside_bytes) if chain is not None else None
        self.extra_flops = chain.extra_flops if chain is not None else 0.0
        self.forward_flops = forward_flops
        self.extra_seconds = getattr(chain, "extra_seconds", None)
        self.forward_seconds = forward_seconds
        self.exact = getattr(chain, "exact", True)
        # segments whose choices of calls to keep (selective) were thinned before planning (invfx.stash_levels)
        self.thinned_stashes = list(thinned_stashes or [])
        # the LeanDropouts standing for the model's nn.Dropout modules, and what they save (invfx.passes.lean_dropout)
        self.lean_dropouts = dict(lean_dropouts or {})
        # the Linear calls that save their LayerNorm / GELU input as how to rebuild it (invfx.passes.recompute_saved)
        self.recomputed_saved = dict(recomputed_saved or {})
        self.measurements: list = []
        self.calibration = calibration  # the example step measured when planning under a budget
        self.gradient_check = None  # what invfx.check compared (optimize's check_gradients)

    def record_measurement(self, measurement) -> None:
        """Called by :func:`invfx.measure` on the optimized module: the report shows the latest one."""
        self.measurements.append(measurement)

    def to_dict(self) -> dict:
        measured = self.measurements[-1].to_dict() if self.measurements else None
        # (rows of a plan pickled by 0.1.0 are dicts)
        segments = [r.to_dict() if isinstance(r, PlanRow) else dict(r) for r in self.rows]
        return {"segments": segments, "opaque": dict(self.opaque),
                "traced_as_constants": {k: repr(v) for k, v in self.constants.items()}, "budget": self.budget,
                "estimated_peak_bytes": self.estimated_peak, "plain_peak_bytes": self.plain_peak,
                "extra_flops": self.extra_flops, "forward_flops": self.forward_flops, "exact": self.exact,
                "stash_levels_thinned": list(getattr(self, "thinned_stashes", [])),
                "lean_dropouts": dict(getattr(self, "lean_dropouts", {})),
                "recomputed_saved": dict(getattr(self, "recomputed_saved", {})),
                "extra_seconds": self.extra_seconds, "forward_seconds": self.forward_seconds,
                "measured": measured, "calibration": self.calibration,
                "gradient_check": self.gradient_check.to_dict() if self.gradient_check else None}

    def __str__(self) -> str:
        headers = ["segment", "nodes", "mode", "kept", "recompute", "risk", "why"]
        table = [[r["name"], r["nodes"], r["mode"], format_bytes(r["kept_bytes"]), format_flops(r["recompute_flops"]),
                  r["risk"] or "", r["why"]] for r in self.rows]
        text = tabulate(table, headers, tablefmt="github")
        counts = {m: sum(r["mode"] == m for r in self.rows) for m in Mode}
        text += "\n\n" + ", ".join(f"{counts[m]} {m}" for m in Mode) + f" of {len(self.rows)} segments"
        if self.budget is not None:
            text += f" (memory budget {_budget(self.budget)})"
        links: dict[str, list] = {}
        for r in self.rows:
            if r.get("region") and r["region"] != r["name"]:
                links.setdefault(r["region"], []).append(r)
        for chain, rows in links.items():  # (rows of plans pickled by 0.1.0 are dicts: read them as mappings)
            mode = rows[0]["mode"]
            kept = "only its last outputs are kept" if mode == Mode.INVERTIBLE else \
                "only its input is kept" + (" and its kept ops' outputs" if mode == Mode.SELECTIVE else "") + \
                ", and its backward recomputes them all at once"
            text += (f"\n{chain}: {rows[0]['name']} to {rows[-1]['name']} run as one region ({len(rows)} segments; "
                     f"{kept})")
        if self.estimated_peak is not None:
            ratio = self.estimated_peak / self.plain_peak if self.plain_peak else 1.0
            extra = self.extra_flops / self.forward_flops if self.forward_flops else 0.0
            text += (f"\nestimated peak {format_bytes(self.estimated_peak)} vs plain {format_bytes(self.plain_peak)} "
                     f"({ratio:.2f}x) at the example's size; extra compute {format_flops(self.extra_flops)} FLOPs "
                     f"({extra:.0%} of a forward)")
            extra_seconds, forward_seconds = self.extra_seconds, self.forward_seconds
            if extra_seconds is not None and forward_seconds:
                text += (f"; planned on measured time: +{extra_seconds * 1e3:.1f} ms "
                         f"({extra_seconds / forward_seconds:.0%} of a forward's {forward_seconds * 1e3:.1f} ms)")
            if not self.exact:
                text += " (the planner thinned its search: within the budget, maybe not the cheapest)"
            thinned = getattr(self, "thinned_stashes", [])  # (absent from a plan pickled before it existed)
            if thinned:
                text += (f"\nselective: the choices of calls to keep were thinned to {LEVEL_LIMIT} per segment in "
                         f"{len(thinned)} segments ({', '.join(thinned[:3])}{' ...' if len(thinned) > 3 else ''}): "
                         "optimal among those, maybe not among all")
        lean = getattr(self, "lean_dropouts", {})  # (absent from a plan pickled before it existed)
        if lean:
            text += (f"\ndropouts: {len(lean)} nn.Dropout modules keep a 1-byte mask for backward instead of their "
                     f"float noise ({format_bytes(sum(lean.values()))} less at the example's size; the same values "
                     "and gradients)")
        rebuilt = getattr(self, "recomputed_saved", {})
        if rebuilt:
            text += (f"\nsaved as recipes: {len(rebuilt)} Linear calls keep no copy of the LayerNorm or GELU output "
                     f"they read, rebuilt from its input in backward ({format_bytes(sum(rebuilt.values()))} less at "
                     "the example's size; the same values and gradients)")
        if self.calibration:
            c = self.calibration
            text += (f"\nchecked on the example: measured peak {format_bytes(c['peak_bytes'])} vs plain "
                     f"{format_bytes(c['plain_bytes'])} ({c['peak_bytes'] / c['plain_bytes']:.2f}x; budget "
                     f"{format_bytes(c['target_bytes'])})")
        if self.gradient_check is not None:
            text += f"\n{self.gradient_check}"
        if self.measurements:
            m = self.measurements[-1]
            line = f"\nmeasured: peak {format_bytes(m.peak_bytes)}, step {m.step_seconds * 1e3:.1f} ms"
            if getattr(m, "baseline", None) is not None:
                line += (f"; plain {format_bytes(m.baseline.peak_bytes)}, {m.baseline.step_seconds * 1e3:.1f} ms "
                         f"(peak {m.peak_ratio:.2f}x, time {m.time_ratio:.2f}x)")
            text += line
        for name, reason in self.opaque.items():
            text += f"\nnot traced (kept as one opaque module): {name}: {reason}"
        if self.constants:
            given = ", ".join(f"{k}={v!r}" for k, v in self.constants.items())
            text += (f"\ntraced with {given} (the defaults; example_inputs did not give them): calls must leave "
                     "them so; pass them in example_inputs to trace them as inputs")
        return text

    __repr__ = __str__


def _budget(budget) -> str:
    return f"{budget:g} of plain" if isinstance(budget, float) else format_bytes(budget)
