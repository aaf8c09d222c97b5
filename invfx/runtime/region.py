"""One mechanism for checkpointed and invertible regions.

A *region* is a function run so that autograd keeps almost nothing of its inside:

* ``checkpoint``: keep the region's inputs, recompute the region in backward.
* ``invertible``: keep the region's outputs, free the storage of the inputs the caller lists, rebuild the inputs
  from the outputs in backward (the inverse), put them back into the same storage, recompute, backprop.

Both go through :class:`RegionFunction` and a *replay*, the backward's recomputation. A replay receives a
:class:`ReplayContext` and returns the region's outputs, recomputed with grad from leaves the context hands out.
The default replays are "recompute from the kept inputs" and "invert, then recompute"; a fused replay (an
additive coupling computing ``F(x2)`` once for both the inverse ``x1 = y1 - F(x2)`` and the gradient) is just
another replay, so the fused backward needs no second mechanism.

Contract (what the runtime guarantees):

* outputs and every gradient equal plain autograd: parameters and other tensors the function reads are found
  on the autograd graph of the forward and become inputs of the region, so ``torch.autograd.grad`` and
  ``backward(inputs=...)`` work and nothing is accumulated twice;
* RNG (CPU and CUDA) and autocast state are replayed; buffers the forward mutated (BatchNorm running statistics)
  are updated once, by the forward;
* a freed tensor keeps its object, views and version counter; its storage is restored before any node that
  saved it can run, and restored without backward when the graph is dropped unused;
* a second ``backward`` with ``retain_graph=True`` works; double backward (``create_graph=True``) raises.

Caveats (what the caller guarantees):

* ``free`` lists only tensors that nobody reads between this forward and its backward. The runtime refuses
  anything that could alias other data (views, partial storages, parameters, buffers, outputs, other inputs),
  but it cannot see future readers: ``x + region(x)`` with ``x`` freed would read freed memory. The fx pass
  and :class:`invfx.nn.InvertibleSequential` prove their lists from the data flow.
* The function must not mutate its inputs in place, and must not read tensors that require grad and were
  computed outside it without passing them as arguments (an :class:`~invfx.RegionError` says so).
* A freed input is restored with the *rebuilt* values, exact up to the inverse's rounding, and every node
  that saved it reads those. Where a producer's backward is discontinuous in its saved output (``relu`` masks
  on ``output > 0``), the inverse must rebuild its zeros exactly (additive and affine couplings do; a linear
  solve does not), or the input must not be freed. The fx pass checks this; hand-written callers must.
* The inverse of a function with dropout must draw random numbers in the same order as the function does, or
  not at all; the RNG is reset to the forward's state before the inverse and again before the recomputation.
"""

from __future__ import annotations

import contextlib
import contextvars
import inspect
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, NoReturn, cast

import torch

from ..errors import InverseError, RegionError
from ..tolerances import tolerance_for
from . import dropout_masks, norm_stats
from .branches import BranchRecord, branch_scope, recording, replaying, unscoped
from .stash import OutputStash
from .state import AutocastState, BufferState, RngState, hooks_silenced
from .storage import free_blocker, free_storage, is_freed, restore_storage, storage_key

__all__ = ["Region", "Discovery", "ReplayContext", "RegionFunction", "checkpoint", "invertible_checkpoint",
           "run_region",
           "rng_mark", "rng_marks"]

#: A parameter at least this big gets its gradient into ``.grad`` the moment the engine has it, in a replay
#: (see :meth:`ReplayContext.differentiate`); smaller ones are handed on with the rest.
STREAM_BYTES = 64 * 1024

#: A parameter smaller than this gets its gradient from the engine when the region returns, as outside
#: regions. 0: every parameter's gradient goes into ``.grad`` as soon as the replay has it, because a region may
#: be a chain of many blocks, and the small gradients of every block held to its end grew its memory with depth
#: (a width-32 coupling stack: 8.8 KB a block).
DIRECT_BYTES = 0

CHECKPOINT = "checkpoint"
INVERTIBLE = "invertible"



class Discovery:
    """What the dry forward found, kept for a function whose graph does not change from call to call (the
    fx pass's regions): which outputs need grad and which parameters it reads. While the requires-grad flags
    of the inputs and of every ``candidates`` tensor (all the parameters the function could read) stay the
    same, later calls run the forward under no_grad instead of the dry run."""

    def __init__(self, candidates: Sequence[torch.Tensor]):
        self.candidates = list(candidates)
        self.key: tuple[tuple[bool, ...], tuple[bool, ...], bool] | None = None
        self.requires_grad: list[bool] = []
        self.params: list[torch.Tensor] = []
        self.accumulators: list[torch.autograd.graph.Node] = []

    def key_for(self, inputs: Sequence[torch.Tensor]) -> tuple[tuple[bool, ...], tuple[bool, ...], bool]:
        return (tuple(t.requires_grad for t in inputs), tuple(p.requires_grad for p in self.candidates),
                torch.is_autocast_enabled("cpu"))

    def __getstate__(self) -> dict[str, Any]:  # autograd nodes do not pickle; a copy rediscovers
        return {"candidates": self.candidates, "key": None, "requires_grad": [], "params": [],
                "accumulators": []}


def relative_error(got: torch.Tensor, expected: torch.Tensor, floor: float = 0.0) -> float:
    """max |got - expected| / max(max |expected|, ``floor``) (NaN or inf when either is not finite). ``floor``: the
    least scale to measure against (an expected value near zero is compared with what it was computed from)."""
    with torch.no_grad(), unscoped():  # (a check, not an op of the sub-network whose mark came last)
        # the inf-norm is one pass with no temporary (abs().max() is two passes and a temporary)
        scale = torch.linalg.vector_norm(expected, float("inf")).float().clamp_min(
            max(floor, torch.finfo(torch.float32).tiny))
        difference = torch.sub(got.detach().to(expected.dtype), expected)
        return float((torch.linalg.vector_norm(difference, float("inf")).float() / scale).item())


@dataclass(frozen=True)
class Region:
    """What to run and how to undo it. Cheap to build; reusable across calls.

    ``inverse(outputs, saved) -> inputs``: ``outputs`` is the tuple of the function's outputs (non-tensors
    included), ``saved`` the frozenset of argument positions whose values are still in memory (they need not be
    rebuilt; whatever is returned there is ignored). It returns one entry per function argument.
    ``replay(ctx) -> outputs`` overrides the backward's recomputation (see :class:`ReplayContext`);
    ``rebuild(ctx)`` overrides how the inputs are put back (calling ``ctx.input(position, value)`` for each one
    not in memory) in the default replay and when a graph is dropped without backward.
    ``buffers``: buffers, or modules whose buffers, the function may update in place (BatchNorm statistics);
    they are kept from being updated a second time by the recomputation. ``keep`` (invertible mode): argument
    positions saved for backward like a checkpoint's inputs (values the inverse reads but does not rebuild).
    ``keep_ops`` (checkpoint mode): aten ops (``torch.ops.aten.convolution``) whose outputs the forward keeps
    for the recomputation, which takes them instead of running those ops again (selective activation
    checkpointing; see :mod:`invfx.runtime.stash`); with ``keep_marked``, only those the function runs between
    ``stash_begin()`` and ``stash_end()``. ``record_branches`` (invertible mode): the forward records what the
    branching ops of its marked sub-networks (relu, clamp, max pooling...) branched on, and the backward replays
    them, so that a sub-network recomputed on rebuilt inputs takes the forward's branches (see
    :mod:`invfx.runtime.branches`). ``dropout_masks`` (checkpoint mode): the forward keeps its CPU dropouts'
    masks, 1 bit per element, and the recomputation multiplies by them instead of drawing again (the same values;
    see :mod:`invfx.runtime.dropout_masks`); with ``dropouts_marked``, the function calls
    ``dropout_masks.dropout`` for every dropout it runs, and no torch-function mode catches ``F.dropout``.
    ``norms_marked`` (checkpoint mode): the function calls ``norm_stats.module_batch_norm`` for its BatchNorms;
    the forward keeps their batch statistics and the recomputation normalises with them instead of measuring
    again (the same values; see :mod:`invfx.runtime.norm_stats`).
    """

    function: Callable[..., Any]
    mode: str = CHECKPOINT
    inverse: Callable[[tuple[Any, ...], frozenset[int]], Sequence[Any]] | None = None
    replay: Callable[["ReplayContext"], Any] | None = None
    free: frozenset[int] = frozenset()
    keep: frozenset[int] = frozenset()
    rebuild: Callable[["ReplayContext"], None] | None = None
    discovery: "Discovery | None" = None
    buffers: tuple[torch.Tensor | torch.nn.Module, ...] = ()
    # buffers the function updates in place whatever their version counters say (BatchNorm's running statistics
    # where its F.batch_norm is called directly): kept from a second update by the recomputation, always
    updated: tuple[torch.Tensor, ...] = ()
    preserve_rng_state: bool = True
    name: str = "region"
    keep_ops: frozenset[Any] = frozenset()
    keep_marked: bool = False
    record_branches: bool = True
    dropout_masks: bool = True
    dropouts_marked: bool = False
    norms_marked: bool = False
    # the storages of the modules' parameters and buffers, which a stash tells calls apart by: found once, here,
    # not at every call (a pointer gone stale only makes the stash's check coarser, the same in both runs)
    stash_constants: frozenset[int] = field(init=False, repr=False, compare=False, default=frozenset())

    def __post_init__(self) -> None:
        if self.keep_ops:
            object.__setattr__(self, "stash_constants", _storage_pointers(self.buffers))
        if self.mode not in (CHECKPOINT, INVERTIBLE):
            raise RegionError(f"{self.name}: unknown mode {self.mode!r}")
        if self.mode == INVERTIBLE and self.inverse is None and self.rebuild is None:
            raise RegionError(f"{self.name}: an invertible region needs an inverse or a rebuild")
        if self.mode == CHECKPOINT and (self.free or self.keep):
            raise RegionError(f"{self.name}: a checkpoint region keeps all its inputs; free and keep are for "
                              "invertible regions")
        if self.keep_ops and self.mode != CHECKPOINT:
            raise RegionError(f"{self.name}: keep_ops is for checkpoint regions (an invertible region keeps nothing)")
        if self.free & self.keep:
            raise RegionError(f"{self.name}: arguments {sorted(self.free & self.keep)} are both freed and kept")


def checkpoint(function: Callable[..., Any], *args: Any, buffers: Iterable[torch.Tensor | torch.nn.Module] = (),
               preserve_rng_state: bool = True, name: str | None = None) -> Any:
    """Run ``function(*args)`` keeping only its inputs; recompute it in backward."""
    region = Region(function, CHECKPOINT, buffers=tuple(buffers), preserve_rng_state=preserve_rng_state,
                    name=name or _name_of(function))
    return run_region(region, args)


def invertible_checkpoint(function: Callable[..., Any], inverse: Callable[..., Any], *args: Any,
                          free: Iterable[int] | Literal[True] = (),
                          replay: Callable[[ReplayContext], Any] | None = None,
                          buffers: Iterable[torch.Tensor | torch.nn.Module] = (), preserve_rng_state: bool = True,
                          name: str | None = None) -> Any:
    """Run ``function(*args)`` keeping only its outputs; rebuild the inputs with ``inverse`` in backward.

    ``inverse(*outputs)`` (or ``inverse(*outputs, saved=...)`` if it takes ``saved``) returns the arguments.
    ``free`` lists argument positions whose storage may be released until backward (``True``: every tensor
    argument); see the module docstring for what the caller promises by listing one.
    """
    if free is True:
        free = [i for i, a in enumerate(args) if isinstance(a, torch.Tensor)]
    region = Region(function, INVERTIBLE, inverse=_adapt_inverse(inverse), replay=replay, free=frozenset(free),
                    buffers=tuple(buffers), preserve_rng_state=preserve_rng_state, name=name or _name_of(function))
    return run_region(region, args)


# ("record", RngState) while a region's forward runs, ("replay", RngState) while its backward replays it.
_RNG_MARKS: contextvars.ContextVar[tuple[str, RngState] | None] = contextvars.ContextVar("invfx_rng_marks",
                                                                                      default=None)


def rng_mark(name: str) -> None:
    """Mark where a random sub-network starts, so that an inverse or replay that runs sub-networks in another
    order than the function still draws each one's dropout mask from the forward's RNG state.

    In a region's forward it records the RNG state under ``name``; while the region is rebuilt in backward
    (inverse, replay or recomputation) it sets the RNG to that recorded state. Call it with the same name
    before the same sub-network in ``function`` and ``inverse``: for ``y1 = x1 + F(x2); y2 = x2 + G(y1)`` the
    inverse runs G before F. Names are unique within one region. Outside regions it does nothing.

    It also opens the sub-network's scope for branch records (:mod:`invfx.runtime.branches`): the relu masks
    and the like its forward took are replayed, by this name, when it is recomputed on rebuilt inputs.
    """
    branch_scope(name)
    current = _RNG_MARKS.get()
    if current is None:
        return
    phase, rng = current
    if phase == "record":
        if name in rng.marks:
            raise RegionError(f"rng_mark({name!r}) used twice in one region; names must be unique")
        rng.mark(name)
    elif name in rng.marks:
        rng.marks[name].set()


@contextlib.contextmanager
def rng_marks(phase: str, rng: RngState | None) -> Iterator[None]:
    """Within the block, :func:`rng_mark` records into ``rng`` (phase "record") or replays from it
    ("replay"). Regions do this themselves; :meth:`invfx.nn.Module.check_inverse` uses it too."""
    token = _RNG_MARKS.set((phase, rng) if rng is not None else None)
    try:
        yield
    finally:
        _RNG_MARKS.reset(token)


def _name_of(function: Callable[..., Any]) -> str:
    return getattr(function, "__qualname__", None) or type(function).__name__


def _adapt_inverse(inverse: Callable[..., Any] | None) -> Callable[[tuple[Any, ...], frozenset[int]], Any] | None:
    if inverse is None:
        return None
    try:
        takes_saved = "saved" in inspect.signature(inverse).parameters
    except (TypeError, ValueError):
        takes_saved = False
    if takes_saved:
        return lambda outputs, saved: inverse(*outputs, saved=saved)
    return lambda outputs, saved: inverse(*outputs)


# ----------------------------------------------------------------------------------------------------------
# Forward


def run_region(region: Region, args: Sequence[Any]) -> Any:
    """Run ``region`` on ``args``; with grad disabled this is exactly ``region.function(*args)``."""
    if not torch.is_grad_enabled():
        return region.function(*args)
    args = tuple(args)
    positions = [i for i, a in enumerate(args) if isinstance(a, torch.Tensor)]
    inputs = [args[i] for i in positions]
    buffer_state = BufferState(region.buffers, region.updated)
    rng = RngState(inputs + [b for group in buffer_state.groups for b in group]) \
        if region.preserve_rng_state else None
    autocast = AutocastState()
    versions = [t._version for t in inputs]

    discovery = region.discovery
    key = discovery.key_for(inputs) if discovery is not None else None
    known = discovery is not None and discovery.key == key
    stash = OutputStash(region.keep_ops, region.stash_constants, region.name) if region.keep_ops else None
    stashing = _stash_scope(stash.recording(), region.keep_marked) if stash is not None else contextlib.nullcontext()
    branches = BranchRecord(region.name) if region.mode == INVERTIBLE and region.record_branches else None
    masks = dropout_masks.DropoutMasks(region.name) if region.mode == CHECKPOINT and region.dropout_masks else None
    statistics = norm_stats.NormStatistics(region.name) if region.mode == CHECKPOINT and region.norms_marked \
        else None
    records = _records(region, rng, stashing, branches, masks, statistics)
    if known:
        # the same graph with the same flags as the last call: what the dry run would find is known
        with torch.no_grad(), records:
            result = region.function(*args)
    else:
        # The dry run: grad on, so autograd tells which outputs need grad and which parameters were read, but
        # every tensor autograd would save is dropped at once, so it costs the memory of a no-grad run.
        leaves = [_leaf_like(t) for t in inputs]
        dry_args = list(args)
        for position, leaf in zip(positions, leaves):
            dry_args[position] = leaf
        first_node = _next_sequence_nr()
        with torch.enable_grad(), _dry_mode(region.name), records:
            result = region.function(*dry_args)

    for position, tensor, version in zip(positions, inputs, versions):
        if tensor._version != version:
            raise RegionError(f"{region.name}: modifies its argument {position} in place; a region must not "
                              "mutate its inputs (their values are needed to recompute it)")

    if rng is not None and not rng.consumed():
        rng = None  # the function drew no random numbers: nothing to replay
    structure = _Structure.of(result)
    outputs = structure.tensors(result)
    if stash is not None:
        stash.drop(outputs)
    if known:
        # (known: discovery is not None)
        requires_grad, params, accumulators = \
            discovery.requires_grad, discovery.params, discovery.accumulators  # type: ignore[union-attr]
        if len(requires_grad) != len(outputs):
            raise RegionError(f"{region.name}: the function returned {len(outputs)} tensors, earlier "
                              f"{len(requires_grad)}; a region with a discovery cache must not change its graph")
    else:
        requires_grad = [o.requires_grad for o in outputs]
    if not any(requires_grad):
        return structure.rebuild(result, [o.detach() for o in outputs])
    if not known:
        params, accumulators = _graph_leaves(outputs, leaves, first_node, region.name)
        if discovery is not None:
            discovery.key, discovery.requires_grad = key, requires_grad
            discovery.params, discovery.accumulators = params, accumulators
    call = _RegionCall(region, args, positions, inputs, params, structure, result, outputs, requires_grad, rng,
                       autocast, buffer_state.mutated())
    call.accumulators = accumulators
    call.stash = stash
    call.branches = branches if branches else None  # (nothing recorded: nothing to replay)
    call.masks = masks if masks else None
    call.statistics = statistics if statistics else None
    del result
    returned = cast("tuple[torch.Tensor, ...]",
                    RegionFunction.apply(call, *inputs, *params))  # type: ignore[no-untyped-call]
    node = next((t.grad_fn for t in returned if t.grad_fn is not None), None)
    if node is not None:
        node.register_prehook(call.take_output_grads)
    return structure.rebuild(call.non_tensor_result, returned)


@contextlib.contextmanager
def _records(region: Region, rng: RngState | None, stashing: Any, branches: BranchRecord | None,
             masks: dropout_masks.DropoutMasks | None, statistics: norm_stats.NormStatistics | None
             ) -> Iterator[None]:
    """What a region's forward records for its backward's replay: RNG marks, kept op outputs, branches, dropout
    masks and BatchNorm statistics (each None or empty where the region keeps none)."""
    with rng_marks("record", rng), stashing, recording(branches), \
            dropout_masks.recording(masks, region.dropouts_marked), norm_stats.recording(statistics):
        yield


def _leaf_like(tensor: torch.Tensor) -> torch.Tensor:
    leaf = tensor.detach()
    return leaf.requires_grad_() if tensor.requires_grad else leaf


@contextlib.contextmanager
def _dry_mode(name: str) -> Iterator[None]:
    def pack(_: torch.Tensor) -> None:
        return None

    def unpack(_: None) -> NoReturn:
        raise RegionError(f"{name}: the function computes gradients inside its forward, which a region cannot "
                          "run without keeping its activations")

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        yield


def _next_sequence_nr() -> int:
    """Sequence number the next autograd node of this thread will get."""
    get: Callable[[], int] | None = getattr(torch._C._autograd, "_get_sequence_nr", None)
    if get is not None:
        return get()
    probe = torch.zeros((), requires_grad=True) * 1
    return probe.grad_fn._sequence_nr() + 1  # type: ignore[union-attr]  # (it requires grad: it has a grad_fn)


# (Any: torch's stubs do not describe AccumulateGrad nodes, nor their .variable)
_ACCUMULATE_GRAD: type[Any] = type(
    torch.zeros((), requires_grad=True).expand(1).grad_fn.next_functions[0][0])  # type: ignore[union-attr]


def _graph_leaves(outputs: Sequence[torch.Tensor], own_leaves: Sequence[torch.Tensor], first_node: int,
                  name: str) -> tuple[list[torch.Tensor], list[torch.autograd.graph.Node]]:
    """Tensors requiring grad that the function read without getting them as arguments (its parameters).

    Walks the dry run's graph from the outputs. A node older than the dry run belongs to the caller's graph: the
    function read a non-leaf tensor that requires grad through a closure, which a region cannot differentiate.
    """
    own = {id(leaf) for leaf in own_leaves}
    found: dict[int, torch.Tensor] = {}
    accumulators: dict[int, torch.autograd.graph.Node] = {}
    seen: set[int] = set()
    stack = [o.grad_fn for o in outputs if o.grad_fn is not None]
    while stack:
        node = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        if isinstance(node, _ACCUMULATE_GRAD):
            variable = node.variable
            if id(variable) not in own:
                found.setdefault(id(variable), variable)
                accumulators.setdefault(id(variable), node)
            continue
        if node._sequence_nr() < first_node:
            raise RegionError(
                f"{name}: reads a tensor that requires grad and was computed outside the region "
                f"(reached through {node.name()}); pass it as an argument instead of capturing it")
        stack.extend(n for n, _ in node.next_functions if n is not None)
    return list(found.values()), [accumulators[k] for k in found]


def _holds_tensor(value: object) -> bool:
    if isinstance(value, torch.Tensor):
        return True
    if isinstance(value, (tuple, list)):
        return any(_holds_tensor(v) for v in value)
    if isinstance(value, dict):
        return any(_holds_tensor(v) for v in value.values())
    return False


class _Structure:
    """Where the tensors sit in a function's result (a tensor, or a tuple/list of anything)."""

    __slots__ = ("kind", "slots", "length")

    def __init__(self, kind: str | type[tuple[Any, ...] | list[Any]], slots: list[int], length: int) -> None:
        self.kind, self.slots, self.length = kind, slots, length

    @classmethod
    def of(cls, result: object) -> _Structure:
        if isinstance(result, torch.Tensor):
            return cls("tensor", [0], 1)
        if isinstance(result, (tuple, list)):
            for item in result:
                if isinstance(item, (tuple, list, dict)) and _holds_tensor(item):
                    raise RegionError("a region must return tensors at the top level of its result (a tensor or a "
                                      "tuple/list of tensors and other values), not nested in "
                                      f"{type(item).__name__}s: their gradients would be lost")
            slots = [i for i, r in enumerate(result) if isinstance(r, torch.Tensor)]
            return cls(type(result), slots, len(result))
        raise RegionError(f"a region must return a tensor or a tuple/list, not {type(result).__name__}")

    def tensors(self, result: Any) -> list[torch.Tensor]:
        return [result] if self.kind == "tensor" else [result[i] for i in self.slots]

    def items(self, result: Any) -> tuple[Any, ...]:
        return (result,) if self.kind == "tensor" else tuple(result)

    def rebuild(self, result: Any, tensors: Sequence[torch.Tensor | None]) -> Any:
        if self.kind == "tensor":
            return tensors[0]
        items = list(result)
        for slot, tensor in zip(self.slots, tensors):
            items[slot] = tensor
        return self.kind(items)  # type: ignore[operator]  # (a tuple or list type: not "tensor")


# ----------------------------------------------------------------------------------------------------------
# One call of a region: what backward needs


class _RegionCall:
    """The state of one forward of a region, held by the autograd node until backward (never a tensor with
    history, so no reference cycle through the graph)."""

    accumulators: list[torch.autograd.graph.Node]  # the parameters' AccumulateGrad nodes, set by run_region
    stash: OutputStash | None = None  # a selective checkpoint's kept op outputs, set by run_region
    branches: BranchRecord | None = None  # what its sub-networks' branching ops took, set by run_region
    masks: dropout_masks.DropoutMasks | None = None  # a checkpoint's dropout masks, set by run_region
    statistics: norm_stats.NormStatistics | None = None  # a checkpoint's BatchNorm statistics, set by run_region

    def __init__(self, region: Region, args: tuple[Any, ...], positions: list[int], inputs: list[torch.Tensor],
                 params: list[torch.Tensor], structure: _Structure, result: Any, outputs: list[torch.Tensor],
                 requires_grad: list[bool], rng: RngState | None, autocast: AutocastState,
                 mutated_buffers: list[torch.Tensor]) -> None:
        self.region = region
        self.name = region.name
        self.positions = positions
        self.position_slot = {p: k for k, p in enumerate(positions)}
        self.template = tuple(None if isinstance(a, torch.Tensor) else a for a in args)
        self.input_meta = [(t.shape, t.dtype, t.device, t.requires_grad) for t in inputs]
        self.num_params = len(params)
        self.structure = structure
        # Non-tensor outputs are kept as they are; tensor slots are filled from the saved outputs in backward.
        self.non_tensor_result = structure.rebuild(result, [None] * len(outputs)) if structure.kind != "tensor" \
            else None
        self.outputs, self.output_alias = _outputs_for_return(outputs, inputs)
        self.output_shapes = [o.shape for o in outputs]
        self.requires_grad = requires_grad
        self.rng = rng
        self.autocast = autocast
        self.mutated_buffers = mutated_buffers
        self.freed: dict[int, tuple[torch.Tensor, int]] = {}  # slot -> (alias sharing the storage, nbytes)
        self.not_freed: dict[int, str] = {}  # position -> why the runtime refused to free it
        self.weak_inputs: dict[int, tuple[weakref.ref[torch.Tensor], int]] = {}  # slot -> (weakref, version)
        self.kept_positions = sorted(p for p in region.keep if p in self.position_slot)
        self.param_keys = {storage_key(p) for p in params}
        self.buffer_keys = {storage_key(b) for b in mutated_buffers}
        # the gradients of the outputs, between the node's pre-hook and its backward
        self.pending: tuple[torch.Tensor | None, ...] | None = None

    # -- forward, inside RegionFunction.forward --------------------------------------------------------------

    def release_inputs(self, inputs: Sequence[torch.Tensor]) -> bool:
        """Free the inputs the region may free; remember the others weakly (invertible mode). Returns whether
        anything was freed."""
        wanted = {self.position_slot[p] for p in self.region.free if p in self.position_slot}
        for p in self.region.free:
            if p not in self.position_slot:
                self.not_freed[p] = "not a tensor argument"
        kept_keys = {storage_key(o) for o in self.outputs} | self.param_keys | self.buffer_keys
        kept_keys |= {storage_key(inputs[k]) for k in range(len(inputs)) if k not in wanted}
        freed_keys: dict[tuple[torch.device, int], int] = {}
        for slot in sorted(wanted):
            tensor = inputs[slot]
            key = storage_key(tensor)
            reason = free_blocker(tensor) if key not in freed_keys else None
            if reason is None and key in kept_keys:
                reason = "shares its storage with an output, a parameter, a buffer or a kept input"
            if reason is not None:
                self.not_freed[self.positions[slot]] = reason
                continue
            if key not in freed_keys:
                freed_keys[key] = free_storage(tensor)
            self.freed[slot] = (tensor.detach(), freed_keys[key])
        kept = {self.position_slot[p] for p in self.kept_positions}
        for slot, tensor in enumerate(inputs):
            if slot not in self.freed and slot not in kept:
                self.weak_inputs[slot] = (weakref.ref(tensor), tensor._version)
        return bool(self.freed)

    # -- backward ----------------------------------------------------------------------------------------------

    def take_output_grads(self, grad_outputs: tuple[torch.Tensor | None, ...]) -> tuple[None, ...]:
        """The node's pre-hook: takes the gradients of the outputs out of the engine's hands.

        The engine holds the gradients it passes to a node until the node returns; a region's backward lasts
        as long as the backward of all its sub-networks, and the gradient of its output (one activation) is
        dead after the first of them. Taken here, the replay lets go of each as soon as it is used up. Node
        pre-hooks run after every tensor hook and ``retain_grad`` has seen the gradients (a pre-hook a user
        registers on the region's node itself would see None)."""
        self.pending = grad_outputs
        return (None,) * len(grad_outputs)

    def backward(self, saved: tuple[torch.Tensor, ...],
                 grad_outputs: tuple[torch.Tensor | None, ...]) -> tuple[torch.Tensor | None, ...]:
        region = self.region
        replay = region.replay or (_replay_checkpoint if region.mode == CHECKPOINT else _replay_inverse)
        context = ReplayContext(self, saved)
        pending = self.pending
        if pending is not None:  # (taken by the pre-hook: the engine passed None)
            grad_outputs, self.pending = pending, None
        context.grad_outputs = grad_outputs
        del grad_outputs, pending  # (the replay drops each as soon as it is used up)
        context.direct_params = self._direct_params(context.params)
        rng = self.rng.forked() if self.rng is not None else contextlib.nullcontext()
        with rng, self.autocast.replayed(), BufferState.preserved(self.mutated_buffers), \
                rng_marks("replay", self.rng), replaying(self.branches):
            context.reset_rng()
            with torch.enable_grad():
                result = replay(context)
            grads = self._gradients(context, result)
        self.freed.clear()
        return grads

    def _direct_params(self, params: Sequence[torch.Tensor]) -> set[int]:
        """Parameters whose gradient a replay may add into ``.grad`` itself, as soon as it has it.

        Only in a ``backward()`` that will accumulate into them anyway (the engine will run their AccumulateGrad
        node: not under ``autograd.grad``, not left out by ``backward(inputs=...)``), and only plain dense
        parameters with no tensor hooks (a hook must see the gradient). For a gradient the replay put into
        ``.grad`` itself the node returns None, and the engine's AccumulateGrad runs with nothing to add, so its
        post-accumulate hooks fire once, after the gradient is in ``.grad`` (a replay may also hand a
        parameter's gradient on as usual). Holding every gradient of a region to its end would cost its
        parameters' size (8 MiB for a width-1024 coupling; in a chain, every block's).
        """
        direct: set[int] = set()
        will_execute, plain = torch._C._will_engine_execute_node, (torch.Tensor, torch.nn.Parameter)
        for param, node in zip(params, getattr(self, "accumulators", ())):
            if type(param) not in plain or not param.requires_grad or param._backward_hooks or param.is_sparse:
                continue
            if DIRECT_BYTES and param.numel() * param.element_size() < DIRECT_BYTES:
                continue
            grad = param.grad
            if grad is not None and (grad.is_sparse or grad.shape != param.shape or grad.dtype != param.dtype):
                continue
            try:
                if will_execute(node):
                    direct.add(id(param))
            except RuntimeError:  # autograd.grad: gradients are returned, never accumulated
                return set()
        return direct

    def _provided_gradients(self, context: ReplayContext, result: Any) -> tuple[torch.Tensor | None, ...]:
        """The replay computed the gradients itself (a staged replay): check and hand them on."""
        inputs, params = context.gradients  # type: ignore[misc]  # (_gradients calls it only when set)
        if result is not None and context.output_tensors is not None:
            recomputed = self.structure.tensors(result)
            self._check_reconstruction(recomputed, context.output_tensors)
        input_grads = [inputs.get(p) if meta[3] else None for p, meta in zip(self.positions, self.input_meta)]
        return tuple(input_grads) + tuple(params.get(id(p)) for p in context.params)

    def _check_reconstruction(self, recomputed: Sequence[torch.Tensor | None], saved: Sequence[torch.Tensor],
                              first_index: int = 0, what: str | None = None) -> None:
        """The recomputation from rebuilt inputs must give back the outputs the forward kept.

        It costs a comparison (the two sides exist anyway) and turns a wrong inverse, an inverse blown up by
        ill-conditioning, or a function that is not deterministic into an error instead of wrong gradients.
        """
        for index, (output, kept) in enumerate(zip(recomputed, saved), start=first_index):
            if output is None:
                continue  # not recomputed (no gradient flowed through it)
            if not (output.is_floating_point() and kept.is_floating_point()) or output.shape != kept.shape:
                continue
            tolerance = tolerance_for(kept.dtype, self.autocast.dtypes())
            if tolerance is None or kept.numel() == 0:
                continue
            error = relative_error(output, kept)
            if not error <= tolerance:  # also catches NaN
                raise InverseError(
                    f"{self.name}: recomputing {what or f'output {index}'} from the rebuilt inputs gives a relative "
                    "error of "
                    f"{error:.3g} (tolerance {tolerance:g} for {kept.dtype}); the inverse is wrong, blows up "
                    "numerically, or the function is not deterministic (randomness with seed=False). The "
                    "gradients would be wrong: use checkpoint mode for this region")

    def _gradients(self, context: ReplayContext, result: Any) -> tuple[torch.Tensor | None, ...]:
        if context.gradients is not None:
            return self._provided_gradients(context, result)
        # (set by backward; a replay drops it only once it has set the gradients itself)
        grad_outputs: tuple[torch.Tensor | None, ...] = context.grad_outputs  # type: ignore[assignment]
        try:
            recomputed = self.structure.tensors(result)
        except (IndexError, TypeError, RegionError):
            recomputed = None
        if recomputed is None or len(recomputed) != len(grad_outputs):
            raise RegionError(f"{self.name}: the recomputation returned a different structure than the forward")
        roots, root_grads = [], []
        for output, grad, shape in zip(recomputed, grad_outputs, self.output_shapes):
            if grad is None:
                continue
            if output.shape != shape:
                raise RegionError(f"{self.name}: the recomputation gave an output of shape {tuple(output.shape)}, "
                                  f"the forward {tuple(shape)}; the function must be deterministic")
            if output.requires_grad:
                roots.append(output)
                root_grads.append(grad)
        leaves = [context.input(p) if meta[3] else None for p, meta in zip(self.positions, self.input_meta)]
        found_inputs, found_params = context.differentiate(roots, root_grads, [x for x in leaves if x is not None],
                                                           context.params)
        del roots, root_grads
        if context.output_tensors is not None:
            # after the gradient, when the recomputation's graph is gone: the check's temporary does not add to
            # the backward's peak
            self._check_reconstruction(recomputed, context.output_tensors)
        it = iter(found_inputs)
        input_grads = [next(it) if leaf is not None else None for leaf in leaves]
        return tuple(input_grads) + tuple(found_params)


def _outputs_for_return(outputs: Sequence[torch.Tensor],
                        inputs: Sequence[torch.Tensor]) -> tuple[list[torch.Tensor], list[int | None]]:
    """Detached outputs to hand back from the autograd function, and for each the input slot it aliases.

    An output sharing storage with an input (an identity stream, a reshape) is returned as a *view* of that
    input (made in ``RegionFunction.forward``), so that a later region sees a view and never frees the input's
    bytes under its owner. An output sharing storage with an earlier output is copied (rare; freeing one must
    not free the other).
    """
    slot: int | None
    slot_by_key: dict[tuple[torch.device, int], int] = {}
    for slot, tensor in enumerate(inputs):
        if tensor.numel():
            slot_by_key.setdefault(storage_key(tensor), slot)
    returned, alias, seen = [], [], set()
    for output in outputs:
        detached = output.detach()
        key = storage_key(detached)
        slot = slot_by_key.get(key) if detached.numel() else None
        if slot is None and detached.numel() and key in seen:
            detached = detached.clone()
            key = storage_key(detached)
        seen.add(key)
        returned.append(detached)
        alias.append(slot)
    return returned, alias


class RegionFunction(torch.autograd.Function):
    """The autograd node of a region. Its inputs: the region's tensor arguments, then the parameters found."""

    @staticmethod
    def forward(ctx: Any, call: _RegionCall, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        ctx.call = call
        ctx.set_materialize_grads(False)
        inputs = tensors[:len(call.positions)]
        params = tensors[len(call.positions):]
        # An output aliasing an input becomes a view of that input made here, so autograd records it as one.
        outputs = [o if slot is None else inputs[slot].as_strided(o.size(), o.stride(), o.storage_offset())
                   for o, slot in zip(call.outputs, call.output_alias)]
        non_differentiable = [o for o, r in zip(outputs, call.requires_grad) if not r]
        if non_differentiable:
            ctx.mark_non_differentiable(*non_differentiable)
        if call.region.mode == CHECKPOINT:
            ctx.save_for_backward(*inputs, *params)
        else:
            kept = [inputs[call.position_slot[p]] for p in call.kept_positions]
            ctx.save_for_backward(*outputs, *kept, *params)
            if call.release_inputs(inputs):
                # held by the node only (no cycle), so it fires as soon as the graph is dropped
                ctx.guard = _RestoreOnDrop(call, [t.detach() for t in (*outputs, *kept, *params)])
        call.outputs = None  # type: ignore[assignment]  # the saved tensors hold them from here
        return tuple(outputs)

    @staticmethod
    def backward(ctx: Any, *grad_outputs: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
        call: _RegionCall = ctx.call
        if torch.is_grad_enabled():
            raise RegionError(f"{call.name}: double backward (create_graph=True) through an invfx region is not "
                              "supported; run this part plainly (checkpoint=False) to differentiate twice")
        # (as torch's once_differentiable, but with an error that names the region)
        try:
            saved = ctx.saved_tensors
        except RuntimeError as error:
            if "inplace" in str(error) or "in-place" in str(error):
                # (autograd's version check: a tensor the region saved, an output it rebuilds its inputs from or
                # an input it keeps, was written into after the forward)
                raise RegionError(f"{call.name}: a tensor this region saved for backward (one of its outputs, or an "
                                  "input it keeps) was modified in place after the region ran, so its inputs "
                                  "cannot be rebuilt or recomputed from it; write into a copy (y = y.clone()) or "
                                  "use an out-of-place op") from error
            raise RegionError(f"{call.name}: backward through a region a second time; pass retain_graph=True "
                              "to the first backward") from error
        grads = call.backward(saved, grad_outputs)
        # The inputs are back: nothing is left to restore if the graph is dropped, and the restored storages are
        # no longer ours to hold (call.backward let them go): whoever saved them decides how long they live. A
        # second backward (retain_graph) rebuilds them again from the outputs.
        guard = getattr(ctx, "guard", None)
        if guard is not None:
            guard.disarm()
        return (None,) + grads


# ----------------------------------------------------------------------------------------------------------
# Backward: the replay


class ReplayContext:
    """What a replay may use to recompute a region in backward.

    * ``outputs``: the forward's outputs (invertible mode), detached, as the function returned them;
    * ``saved``: argument positions whose values are still in memory (no need to rebuild them);
    * ``input(position, value=None)``: the leaf standing for that argument in the recomputation. For an argument
      that is not in memory, ``value`` is its rebuilt value: it is written back into the original storage (for
      a freed input) and the leaf aliases it. Call it once per argument before using the leaf; later calls
      return the same leaf;
    * ``reset_rng()``: put the RNG back to the forward's state (no-op if the region does not preserve it);
    * ``call_function()``: the function on the leaves of every argument (all must be available);
    * ``inverse(saved=None)``: the region's inverse on the outputs;
    * ``params``: the parameters the forward read (the node's extra inputs).

    A replay returns the outputs recomputed with grad, and the runtime differentiates them. A replay may instead
    differentiate itself (the fx pass's staged replay does, to hold one sub-network's graph at a time): it reads
    ``grad_outputs``, sets ``gradients = (input grads by position, parameter grads by id)``, may add the
    gradients of parameters in ``direct_params`` into their ``.grad`` itself (the node then returns None for
    them), checks recomputed outputs with ``check_output(index, tensor)`` or returns them (None for those it did
    not recompute).
    """

    def __init__(self, call: _RegionCall, saved: tuple[torch.Tensor, ...]):
        self._call = call
        self.grad_outputs: tuple[torch.Tensor | None, ...] | None = None  # the gradients of the outputs, in backward
        self.direct_params: set[int] = set()  # parameters whose gradients may go into .grad directly
        # A replay may compute the gradients itself and set (input grads by position, parameter grads by id);
        # it then returns the recomputed outputs (None where it recomputed none) for the reconstruction check.
        self.gradients: tuple[Mapping[int, torch.Tensor | None], Mapping[int, torch.Tensor | None]] | None = None
        self._leaves: dict[int, Any] = {}
        self._buffers: set[int] = set()  # slots whose storage input_buffer gave back, awaiting their value
        self._checkpointed = call.region.mode == CHECKPOINT
        split = len(saved) - call.num_params
        saved, self.params = saved[:split], saved[split:]
        self._saved_inputs: tuple[torch.Tensor, ...] | None
        self.outputs: tuple[Any, ...] | None
        self.output_tensors: tuple[torch.Tensor, ...] | None
        if self._checkpointed:
            self._saved_inputs = saved
            self.outputs = self.output_tensors = None
        else:
            self._saved_inputs = None
            kept = len(call.kept_positions)
            saved, kept_values = saved[:len(saved) - kept], saved[len(saved) - kept:]
            self._kept = {call.position_slot[p]: v for p, v in zip(call.kept_positions, kept_values)}
            self.output_tensors = saved
            self.outputs = call.structure.items(call.structure.rebuild(call.non_tensor_result, list(saved)))
        self.saved = frozenset(p for p in call.positions if self._available(call.position_slot[p]) is not None) \
            | frozenset(p for p, a in enumerate(call.template) if p not in call.position_slot)

    def _available(self, slot: int) -> torch.Tensor | None:
        call = self._call
        if self._checkpointed:
            return self._saved_inputs[slot]  # type: ignore[index]  # (set in checkpoint mode)
        if slot in self._kept:
            return self._kept[slot]
        if slot in call.freed:
            alias, _ = call.freed[slot]
            return None if is_freed(alias) else alias
        if slot not in call.weak_inputs:
            return None  # freed, restored by an earlier backward and let go: rebuild it
        ref, version = call.weak_inputs[slot]
        tensor = ref()
        if tensor is None or tensor._version != version or is_freed(tensor):
            return None
        return tensor

    def input(self, position: int, value: Any = None) -> Any:
        if position in self._leaves:
            return self._leaves[position]
        call = self._call
        if position not in call.position_slot:
            return call.template[position]
        slot = call.position_slot[position]
        shape, dtype, device, requires_grad = call.input_meta[slot]
        tensor = self._available(slot) if slot not in self._buffers else None
        if tensor is None:
            if not isinstance(value, torch.Tensor):
                raise InverseError(f"{call.name}: argument {position} is not in memory and the inverse did not "
                                   f"rebuild it (got {type(value).__name__})")
            if value.shape != shape:
                raise InverseError(f"{call.name}: the inverse rebuilt argument {position} with shape "
                                   f"{tuple(value.shape)}, expected {tuple(shape)}")
            if slot in call.freed:
                alias, nbytes = call.freed[slot]
                restore_storage(alias, nbytes, value)
                tensor = alias
            else:
                tensor = value.detach().to(dtype=dtype, device=device)
        leaf = tensor.detach()
        if requires_grad:
            leaf.requires_grad_()
        self._leaves[position] = leaf
        return leaf

    def input_buffer(self, position: int) -> torch.Tensor | None:
        """For a freed argument still to be rebuilt: its own storage given back, uninitialised, as a tensor of
        its shape, for a replay to write the rebuilt value into (then ``input(position, buffer)`` copies
        nothing). None for any other argument."""
        call = self._call
        slot = call.position_slot.get(position)
        if position in self._leaves or slot is None or slot not in call.freed or \
                self._available(slot) is not None:
            return None
        alias, nbytes = call.freed[slot]
        self._buffers.add(slot)
        return restore_storage(alias, nbytes)

    def check_value(self, recomputed: torch.Tensor, expected: torch.Tensor, what: str) -> None:
        """Check a value recomputed from rebuilt ones against the value it must equal (a replay verifying each
        inverse step where it happens: ``op(rebuilt, known) == out``)."""
        self._call._check_reconstruction([recomputed], [expected], what=what)

    def check_output(self, index: int, recomputed: torch.Tensor) -> None:
        """Check one recomputed output against the kept one now (a replay that computes the gradients itself
        and does not want to hold every recomputed output to the end)."""
        if self.output_tensors is not None:
            self._call._check_reconstruction([recomputed], [self.output_tensors[index]], first_index=index)

    def differentiate(self, roots: Sequence[torch.Tensor], root_grads: Sequence[torch.Tensor],
                      inputs: Sequence[torch.Tensor],
                      params: Sequence[torch.Tensor]) -> tuple[list[torch.Tensor | None], list[torch.Tensor | None]]:
        """``torch.autograd.grad`` of ``roots`` (with ``root_grads``) with respect to ``inputs`` and ``params``:
        (input gradients, parameter gradients).

        The parameters' own hooks do not fire here (the engine runs them once, on what the node hands on). The
        gradient of a parameter in ``direct_params`` goes into its ``.grad`` the moment the engine has it, and
        None is returned for it: ``autograd.grad`` would otherwise hold every parameter gradient of the
        recomputation to its end (a weight gradient is often as big as an activation).
        """
        inputs, params = list(inputs), list(params)
        if not roots or not (inputs or params):
            return [None] * len(inputs), [None] * len(params)
        # (a hook costs microseconds: small parameters' gradients are held to the end, which costs nothing)
        direct = [p for p in params if id(p) in self.direct_params and p.numel() * p.element_size() >= STREAM_BYTES]
        with hooks_silenced(params):
            handles = [p.register_hook(_into_grad_hook(p)) for p in direct]  # type: ignore[no-untyped-call]
            try:
                found = torch.autograd.grad(list(roots), inputs + params, list(root_grads), allow_unused=True)
            finally:
                for handle in handles:
                    handle.remove()
        streamed = {id(p) for p in direct}
        param_grads = [None if id(p) in streamed else g for p, g in zip(params, found[len(inputs):])]
        return list(found[:len(inputs)]), param_grads

    def reset_rng(self) -> None:
        if self._call.rng is not None:
            self._call.rng.set()

    def call_function(self) -> Any:
        call = self._call
        args = [self.input(p) for p in range(len(call.template))]
        return call.region.function(*args)

    def inverse(self, saved: frozenset[int] | None = None) -> Sequence[Any]:
        call = self._call
        saved = self.saved if saved is None else saved
        with torch.no_grad():
            # (a replay calls it only for a region with an inverse, whose outputs are kept: invertible mode)
            rebuilt = call.region.inverse(self.outputs, saved)  # type: ignore[misc, arg-type]
        if isinstance(rebuilt, torch.Tensor):
            rebuilt = (rebuilt,)
        if len(rebuilt) != len(call.template):
            raise InverseError(f"{call.name}: the inverse returned {len(rebuilt)} values for "
                               f"{len(call.template)} arguments")
        return rebuilt


def _replay_checkpoint(context: ReplayContext) -> Any:
    call = context._call
    stash, masks, statistics = call.stash, call.masks, call.statistics
    stashing = _stash_scope(stash.replaying(), call.region.keep_marked) if stash is not None \
        else contextlib.nullcontext()
    try:
        with stashing, dropout_masks.replaying(masks, call.region.dropouts_marked), \
                norm_stats.replaying(statistics):
            return context.call_function()
    finally:
        # (a second backward recomputes everything, draws its dropouts again from the restored generator and
        # measures its BatchNorms' statistics again, the forward's, whose running statistics are restored)
        if stash is not None:
            stash.clear()
        if masks is not None:
            masks.clear()
        if statistics is not None:
            statistics.clear()


def _stash_scope(mode: Any, marked: bool) -> Any:
    """``mode`` on for the whole function, or only where it marks (``Region.keep_marked``)."""
    return OutputStash.marked(mode) if marked else mode


def _storage_pointers(buffers: Sequence[torch.Tensor | torch.nn.Module]) -> frozenset[int]:
    """The storages of the given tensors and of the given modules' parameters and buffers."""
    found: list[torch.Tensor] = []
    for item in buffers:
        if isinstance(item, torch.nn.Module):
            found += [*item.parameters(), *item.buffers()]
        else:
            found.append(item)
    return frozenset(t.untyped_storage().data_ptr() for t in found if t.untyped_storage().nbytes())


def _rebuild_inputs(context: ReplayContext) -> None:
    """Put back every argument that is not in memory: the region's ``rebuild``, or its inverse."""
    call = context._call
    if call.region.rebuild is not None:
        call.region.rebuild(context)
        return
    missing = [p for p in call.positions if p not in context.saved]
    if missing:
        rebuilt = context.inverse()
        for position in missing:
            context.input(position, rebuilt[position])


def _replay_inverse(context: ReplayContext) -> Any:
    _rebuild_inputs(context)
    context.reset_rng()
    return context.call_function()


class _RestoreOnDrop:
    """Puts freed inputs back if the graph is dropped without a backward (a forward for evaluation, an
    exception between forward and backward): freed memory must never outlive the graph that owns it."""

    def __init__(self, call: _RegionCall, saved: list[torch.Tensor]) -> None:
        self.call: _RegionCall | None = call
        # what the node saved (outputs, kept inputs, parameters), detached
        self.saved: list[torch.Tensor] | None = saved

    def disarm(self) -> None:
        self.call = self.saved = None

    def __del__(self) -> None:
        # (getattr: torch.compile's tracing can make the object without running __init__)
        call, saved = getattr(self, "call", None), getattr(self, "saved", None)
        if call is None or saved is None:
            return
        self.disarm()
        try:
            if any(is_freed(t) for t in saved):
                return  # a later region freed them too and could not restore them: nothing to rebuild from
            context = ReplayContext(call, tuple(saved))
            rng = call.rng.forked() if call.rng is not None else contextlib.nullcontext()
            with rng, call.autocast.replayed(), torch.no_grad(), rng_marks("replay", call.rng), \
                    replaying(call.branches), BufferState.preserved(call.mutated_buffers):
                context.reset_rng()
                _rebuild_inputs(context)  # writes the rebuilt values into the freed storages
        except Exception:  # noqa: BLE001 - a destructor must not raise; the data could not be rebuilt
            pass


def add_into_grad(param: torch.Tensor, grad: torch.Tensor) -> None:
    """``param.grad += grad``, as the engine's AccumulateGrad would, without its hooks. A first gradient is
    copied, never adopted: the engine may hand the same tensor to another consumer."""
    add_into_grads((param,), (grad,))


def add_into_grads(params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor]) -> None:
    """:func:`add_into_grad` for several parameters at once."""
    into, added = [], []
    with torch.no_grad():
        for param, grad in zip(params, grads):
            accumulated = param.grad
            if accumulated is None:
                param.grad = grad.detach().clone(memory_format=torch.contiguous_format)
            else:
                into.append(accumulated)
                added.append(grad)
        if into:  # (one call for a sub-network's parameters: a Python add_ each cost more than the adds)
            torch._foreach_add_(into, added)


def _into_grad_hook(param: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    # What autograd.grad keeps in place of the gradient: a zero expanded to its shape (no memory), made once per
    # shape. The hook runs between two big kernels, where every Python step is slow (its caches are cold): it
    # does the least it can. (The engine runs hooks with grad mode off.)
    key = (tuple(param.shape), param.dtype, param.device)
    zero = _ZEROS.get(key)
    if zero is None:
        zero = _ZEROS[key] = torch.zeros((), dtype=param.dtype, device=param.device).expand(param.shape)

    def into_grad(grad: torch.Tensor) -> torch.Tensor:
        accumulated = param.grad
        if accumulated is None or torch.is_grad_enabled():
            add_into_grad(param, grad)
        else:
            accumulated.add_(grad)
        return zero

    return into_grad


_ZEROS: dict[tuple[tuple[int, ...], torch.dtype, torch.device], torch.Tensor] = {}
