"""The cost model, measured on the example inputs, one :class:`~invfx.planner.SegmentCost` per segment.

The traced model runs one training forward on the example inputs (:class:`SegmentRun`), under
``torch.autograd.graph.saved_tensors_hooks``: each tensor autograd saves is charged to the segment running at
the time (by storage, so a tensor saved twice, or saved by two ops, counts once), and a
``torch.utils.flop_counter.FlopCounterMode`` counts each segment's FLOPs. From that:

* ``saved_bytes``: what keeping the region costs from forward to backward, beyond its inputs and outputs
  (``saves_input`` / ``saves_output`` say whether those are saved too, by a conv reading its input or a relu
  its output);
* ``transient_bytes``: its backward's working memory beyond that, estimated as its largest node's output and
  largest input (a gradient in and one out; an add's second input takes the same gradient, no new one);
* ``flops``: counted matmul and convolution FLOPs plus one per element an op writes (elementwise work);
* ``inverse_flops``: the registry rules' stated cost of the rebuild, for invertible regions;
* ``branch_bytes``: what an invertible region keeps so that its sub-networks, recomputed on rebuilt inputs, take
  the forward's branches (relu masks at 1 bit per element: :mod:`invfx.runtime.branches`), measured by recording
  them as the runtime does; ``RegionCosts.branches`` says which ops, by segment;
* ``stash_levels``: what a selective checkpoint of it may keep, call by call: the outputs of which of its
  convolutions, matrix products and attention calls, measured by keeping each as the runtime does, with the
  FLOPs (and, timed, the seconds) each takes, which its recomputation then skips. Offered to the planner as the
  Pareto frontier of subsets (:mod:`invfx.stash_levels`): for each amount of memory, the calls that save most.
* ``rebuilt_bytes``: what its Linear calls no longer keep of the LayerNorm and GELU outputs they read
  (:mod:`invfx.runtime.recompute_saved`), as the runtime lets go of them; timed, ``rebuild_seconds``: those
  producers' forward time, which rebuilding them takes in backward;
* ``mask_bytes``: what a checkpoint of it keeps of its dropouts' masks (:mod:`invfx.runtime.dropout_masks`),
  measured by recording them as the runtime does; timed, ``replay_seconds``: what the records of a checkpoint
  save its recomputation (each recorded dropout's, and each BatchNorm's whose batch statistics it keeps,
  :mod:`invfx.runtime.norm_stats`: its forward time, less its replay's, less what recording adds to the forward).

What is saved outside every measured segment (a head reading the last one's output) is the same in every plan: it
comes back as ``outside_bytes``. The run leaves the model as it was: buffers and the RNG are restored.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.fx as fx
from torch.utils.flop_counter import FlopCounterMode

from ..modes import Mode
from ..planner import SegmentCost, StashLevel
from ..regions.body import calls_batch_norm, keeps_output, may_drop
from ..regions.fused import tensors_in
from ..runtime import dropout_masks, norm_stats, recompute_saved
from ..runtime.branches import BranchRecord, recording
from ..runtime.stash import EXPENSIVE_OPS, OutputStash
from ..runtime.storage import storage_key
from ..stash_levels import stash_frontier
from .annotate import node_bytes, numel
from .example import example_run
from .rewrite import InvertibleRegion
from .segment_run import SegmentRun
from .segments import Segment

__all__ = ["RegionCosts", "measure_costs"]


@dataclass
class RegionCosts:
    costs: list[SegmentCost]  # in the order the regions run
    outside_bytes: int  # saved outside every region: the same whatever the plan
    # an invertible segment's recorded branches by op (``{"relu": 2}``), where it has any
    branches: dict[str, dict[str, int]] = dataclasses.field(default_factory=dict)
    # per segment, each call a selective checkpoint may keep, alone: its bytes kept, FLOPs and seconds skipped
    stash_calls: dict[str, dict[str, StashLevel]] = dataclasses.field(default_factory=dict)


def measure_costs(module: fx.GraphModule, example_inputs: Sequence, segments: Mapping[str, Segment],
                  regions: Mapping[str, InvertibleRegion], allowed: Mapping[str, frozenset[Mode]],
                  inverse_flops: Mapping[str, float | None], freeable: Mapping[str, bool],
                  timed: bool = False, branches: bool = True) -> RegionCosts:
    """Measure each of ``segments`` (by name; the others run too, charged to no segment) of ``module`` (the
    traced model) on ``example_inputs``.

    ``regions`` are the invertible segments' regions (their fused backward's working memory is measured);
    ``allowed``, ``inverse_flops`` and ``freeable`` (by segment name) are what the graph passes decided: the
    modes a segment may take, the cost of its rebuild (None: not invertible) and whether it may free an input.
    ``timed``: also time each node (:func:`node_seconds`), so that the planner weighs measured time.
    ``branches``: invertible regions will record their sub-networks' branches (their bytes are measured).
    """
    order: list[str] = []
    records: dict[str, dict] = {}
    constant = {storage_key(t) for t in list(module.parameters()) + list(module.buffers())}
    current: list[str | None] = [None]
    outside: dict = {}
    recorded: dict[str, tuple] = {}  # an invertible segment's example arguments, to measure its fused backward

    def pack(tensor: torch.Tensor):
        if tensor.device.type != "meta" and tensor.numel():
            key = storage_key(tensor)
            if key not in constant:
                target = records[current[0]]["saved"] if current[0] is not None else outside
                target[key] = tensor.untyped_storage().nbytes()
        return tensor

    def enter(name: str, args: tuple) -> None:
        if name in regions:
            recorded.setdefault(name, tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args))
        order.append(name)
        record = records.setdefault(name, {"saved": {}})
        record["inputs"] = {storage_key(a): a.untyped_storage().nbytes() for a in tensors_in(args)}
        record["counter"] = FlopCounterMode(display=False)
        record["counter"].__enter__()
        if Mode.SELECTIVE in allowed[name]:  # (what each call's stash would hold: kept as the runtime keeps it)
            record["calls"] = {}
        if allowed[name] & {Mode.CHECKPOINT, Mode.SELECTIVE}:  # (its dropouts' masks, kept as the runtime keeps them)
            record["masks"] = dropout_masks.DropoutMasks(name)
            record["masking"] = dropout_masks.recording(record["masks"])
            record["masking"].__enter__()
        current[0] = name

    @contextlib.contextmanager
    def kept_call(calls: dict, node: fx.Node):
        stash, counter = OutputStash(EXPENSIVE_OPS, name=node.name), FlopCounterMode(display=False)
        calls[node.name] = (stash, counter)
        with counter, stash.recording():
            yield

    def around(node: fx.Node):
        """What a selective region keeps is recorded where it would keep it, call by call: around its marked
        calls, with the FLOPs each takes (what its recomputation skips where it is kept)."""
        record = records.get(current[0]) if current[0] is not None else None
        if record is not None and "calls" in record and keeps_output(module, node):
            return kept_call(record["calls"], node)
        return contextlib.nullcontext()

    def leave(name: str, outputs: tuple) -> None:
        record = records[name]
        if "calls" in record:
            items = {}
            for call, (stash, counter) in record.pop("calls").items():
                stash.drop(tensors_in(outputs))  # (as the runtime does: a region's outputs are recomputed)
                # a kept output written in place later is recomputed anyway: keeping it saves nothing sure
                if stash.nbytes and not stash.mutated:
                    items[call] = (stash.nbytes, float(counter.get_total_flops()))
                stash.clear()
            record["stash_calls"] = items
        if "masking" in record:
            record.pop("masking").__exit__(None, None, None)
            record["mask_bytes"] = record.pop("masks").nbytes
        record["counter"].__exit__(None, None, None)
        record["flops"] = record.pop("counter").get_total_flops()
        record["outputs"] = {storage_key(o): o.untyped_storage().nbytes() for o in tensors_in(outputs)}
        current[0] = None

    def released(value: torch.Tensor) -> None:
        """A RecomputedInput would have let go of ``value`` here (the runtime rebuilds it in backward)."""
        record = records[current[0]] if current[0] is not None else None
        nbytes = (record["saved"] if record is not None else outside).pop(storage_key(value), None)
        if record is not None and nbytes is not None:
            record["rebuilt"] = record.get("rebuilt", 0) + nbytes

    try:
        with example_run(module, example_inputs, requires_grad=True) as inputs, torch.enable_grad(), \
                torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), recompute_saved.measuring(released):
            SegmentRun(module, segments, enter, leave, around).run(*inputs)
            measured = {name: _fused_working_bytes(regions[name], args, constant, branches)
                        for name, args in recorded.items()}
    finally:
        for record in records.values():  # (the forward failed inside a segment)
            if "masking" in record:
                record.pop("masking").__exit__(None, None, None)
            if "counter" in record:
                record.pop("counter").__exit__(None, None, None)

    fused = {name: working for name, (working, _, _) in measured.items()}
    recorded_bytes = {name: nbytes for name, (_, nbytes, _) in measured.items()}
    costs = []
    stash_calls: dict[str, dict[str, StashLevel]] = {}
    replays: dict[str, float] = {}
    seconds = node_seconds(module, example_inputs, replays=replays) if timed and order else {}
    normalising = {n.name for n in module.graph.nodes if calls_batch_norm(module, n)}
    caller = {storage_key(x) for x in inputs if isinstance(x, torch.Tensor)}
    for name in dict.fromkeys(order):
        record, segment = records[name], segments[name]
        saved = dict(record["saved"])
        saves_input = any(saved.pop(k, None) is not None for k in list(record["inputs"]))
        saves_output = any(saved.pop(k, None) is not None for k in list(record["outputs"]))
        body = segment.nodes
        # which calls a selective checkpoint of it may keep: the best choices for each amount of memory
        calls = {call: StashLevel(nbytes, flops, seconds.get(call, 0.0), (call,))
                 for call, (nbytes, flops) in record.get("stash_calls", {}).items()}
        stash_calls[name] = calls
        levels, whole = stash_frontier([[call] for call in calls.values()], by_seconds=bool(seconds))
        largest = max((node_bytes(n) + max((node_bytes(a) for a in n.all_input_nodes if a.op != "get_attr"), default=0)
                       for n in body), default=0)
        costs.append(SegmentCost(
            name=name,
            input_bytes=sum(b for k, b in record["inputs"].items() if k not in caller),
            output_bytes=sum(record["outputs"].values()),
            saved_bytes=sum(saved.values()),
            transient_bytes=largest,
            invertible_bytes=fused.get(name),
            forward_transient_bytes=largest,
            saves_input=saves_input,
            saves_output=saves_output,
            flops=float(record["flops"] + sum(numel(n) for n in body)),
            inverse_flops=inverse_flops.get(name) if name in regions else None,
            input_freeable=freeable.get(name, False),
            modes=allowed[name],
            branch_bytes=recorded_bytes.get(name, 0),
            seconds=sum(seconds.get(n.name, 0.0) for n in body) if seconds else None,
            mask_bytes=record.get("mask_bytes", 0),
            # (a dropout's replay only where its mask was recorded; a BatchNorm's wherever it is recomputed)
            replay_seconds=max(sum(replays.get(n.name, 0.0) for n in body
                                   if record.get("mask_bytes") or n.name in normalising), 0.0),
            rebuilt_bytes=record.get("rebuilt", 0),
            # (each rebuild runs its LayerNorm or GELU again in backward)
            rebuild_seconds=sum(seconds.get(n.args[0].name, 0.0) for n in body if _rebuilds(module, n))
            if record.get("rebuilt") else 0.0,
            stash_levels=levels, stash_levels_whole=whole))
    for i, cost in enumerate(costs):
        if not cost.allowed_modes:  # (selective asked for alone, where the segment keeps no op's output)
            costs[i] = dataclasses.replace(cost, modes=frozenset({Mode.KEEP}))
    # The planner's chain has one size per boundary: a region reads what the previous one made (values that
    # skip a region, read two regions later, are charged to the boundary they leave from).
    for i in range(1, len(costs)):
        if costs[i].input_bytes != costs[i - 1].output_bytes:
            costs[i] = dataclasses.replace(costs[i], input_bytes=costs[i - 1].output_bytes)
    return RegionCosts(costs, sum(outside.values()), {name: ops for name, (_, _, ops) in measured.items() if ops},
                       stash_calls)



def _fused_working_bytes(region: InvertibleRegion, args: tuple, constant: set,
                         branches_recorded: bool = True) -> tuple[int, int, dict[str, int]]:
    """What an invertible region's fused backward holds at most besides its boundary values: the activations
    of one recomputed sub-network (they live one at a time) or of one node differentiated alone. Measured by
    running its forward body on the example arguments, charging what autograd saves to the node saving it.
    With it, the bytes of the branches its forward records (held from its forward to its backward), and which
    ops they are (``{"relu": 2}``)."""
    current: list[str | None] = [None]
    saved_by: dict[str, dict] = {}

    def pack(tensor: torch.Tensor):
        if current[0] is not None and tensor.numel():
            key = storage_key(tensor)
            if key not in constant:
                saved_by.setdefault(current[0], {})[key] = tensor.untyped_storage().nbytes()
        return tensor

    class Charging(fx.Interpreter):
        def run_node(self, n):
            current[0] = n.meta.get("invfx_value", n.name)
            try:
                return super().run_node(n)
            finally:
                current[0] = None

    leaves = [a.detach().requires_grad_(a.is_floating_point()) if isinstance(a, torch.Tensor) else a
              for a in args]
    branches = BranchRecord(region.region_name)
    with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), \
            recording(branches if branches_recorded else None):
        Charging(region.forward_body).run(*leaves)
    if region.fused_replay is None:  # (unfused: the whole forward body is recomputed with grad at once)
        units = [set(saved_by)]
    else:
        units = [set(c.values) for c in region.fused_replay.components]
    grouped = set().union(*units) if units else set()
    units += [{value} for value in saved_by if value not in grouped]
    largest = 0
    for unit in units:
        saved: dict = {}
        for value in unit:
            saved.update(saved_by.get(value, {}))  # (a tensor two of its nodes save counts once)
        largest = max(largest, sum(saved.values()))
    return largest, branches.nbytes, branches.summary()


#: Forward runs timed per node (after one untimed warm-up run); each node's time is the least of them: noise
#: on a shared CPU only adds time, and the median of three still let two of eight identical transformer blocks
#: measure 30-50 % slower than the others (which moved plans), where the least of five kept all eight within 1 %.
TIMED_RUNS = 5


def _rebuilds(module: fx.GraphModule, node: fx.Node) -> bool:
    """Whether ``node`` calls a RecomputedInput (its first argument the output it rebuilds, its producer's)."""
    return node.op == "call_module" and isinstance(module.get_submodule(node.target), recompute_saved.RecomputedInput)


class _NodeTimer(fx.Interpreter):
    """Runs the module, adding each node's wall time to ``seconds[node.name]`` (synchronizing CUDA around it).
    Each of ``dropping`` (node names) that runs a dropout a checkpoint records the mask of runs twice more,
    recording the mask and then replaying it, adding those times to ``replays[node.name]``; so does each of
    ``normalising``, a BatchNorm whose batch statistics a checkpoint records (:mod:`invfx.runtime.norm_stats`)."""

    def __init__(self, module: fx.GraphModule, seconds: dict[str, list[float]], cuda: bool,
                 dropping: Collection[str] = (), replays: dict[str, list[tuple[float, float]]] | None = None,
                 normalising: Collection[str] = ()) -> None:
        super().__init__(module)
        self.extra_traceback = False
        self.seconds, self.cuda, self.dropping, self.normalising = seconds, cuda, dropping, normalising
        self.replays = {} if replays is None else replays

    def _timed(self, node: fx.Node, run=None):
        if self.cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        result = super().run_node(node) if run is None else run()
        if self.cuda:
            torch.cuda.synchronize()
        return result, time.perf_counter() - start

    def run_node(self, node: fx.Node):
        if node.op in ("placeholder", "output", "get_attr"):
            return super().run_node(node)
        result, elapsed = self._timed(node)
        self.seconds.setdefault(node.name, []).append(elapsed)
        if node.name in self.dropping:
            self._time_replay(node, dropout_masks.DropoutMasks(node.name), dropout_masks.recording,
                              dropout_masks.replaying)
        elif node.name in self.normalising:
            args, kwargs = self.fetch_args_kwargs_from_env(node)
            if node.op == "call_module":
                args = (self.fetch_attr(node.target), *args)
            function = norm_stats.module_batch_norm if node.op == "call_module" else norm_stats.batch_norm
            # (recording updates the running statistics a second time: example_run restores them)
            self._time_replay(node, norm_stats.NormStatistics(node.name), norm_stats.recording,
                              norm_stats.replaying, lambda: function(*args, **kwargs))
        return result

    def _time_replay(self, node: fx.Node, record, recording, replaying, run=None) -> None:
        """``node`` run twice more, ``recording`` into ``record`` and then ``replaying`` it, those times added to
        ``replays[node.name]`` (where it recorded anything)."""
        with recording(record):
            _, recorded = self._timed(node, run)
        if record:
            with replaying(record):
                _, replayed = self._timed(node, run)
            self.replays.setdefault(node.name, []).append((recorded, replayed))


def node_seconds(module: fx.GraphModule, example_inputs: Sequence, runs: int = TIMED_RUNS,
                 replays: dict[str, float] | None = None) -> dict[str, float]:
    """Least wall seconds (of ``runs``) of each compute node of ``module`` in a forward with grad on
    ``example_inputs``, as a recomputation runs it (BatchNorm and the like: memory-bound ops that FLOPs
    undercount by orders of magnitude on a CPU). The model is left as it was (:func:`example_run`).

    ``replays``, where given, gets for each node running a dropout whose mask a checkpoint records
    (:mod:`invfx.runtime.dropout_masks`), and each BatchNorm whose batch statistics it records
    (:mod:`invfx.runtime.norm_stats`), the time that record saves a recomputation, from the least times of
    the node run as it is (``t``), recording (``r``) and replaying (``p``): ``t - p - (r - t)`` (the
    recomputation runs the replay instead of the node, and the forward pays the record's overhead)."""
    seconds: dict[str, list[float]] = {}
    recorded: dict[str, list[tuple[float, float]]] = {}
    cuda = any(t.is_cuda for t in (*module.parameters(), *(x for x in example_inputs if isinstance(x, torch.Tensor))))
    # (masks are recorded on CPU only)
    dropping = set() if replays is None or cuda else {n.name for n in module.graph.nodes if may_drop(module, n)}
    normalising = set() if replays is None else {n.name for n in module.graph.nodes if calls_batch_norm(module, n)}
    with example_run(module, example_inputs, requires_grad=True) as inputs, torch.enable_grad():
        for run in range(runs + 1):  # (run 0 is a warm-up: its times are dropped)
            timer = _NodeTimer(module, seconds if run else {}, cuda, dropping, recorded if run else {}, normalising)
            timer.run(*inputs)
    least = {name: min(values) for name, values in seconds.items()}
    if replays is not None:
        for name, pairs in recorded.items():
            record, replay = min(r for r, _ in pairs), min(p for _, p in pairs)
            replays[name] = least[name] - replay - (record - least[name])
    return least
