"""The modules an optimized model trains with: a region runs one segment of the model, checkpointed or
invertible, through the runtime (``invfx.runtime``); its fused backward is ``fused.FusedReplay``.

The passes (``invfx.passes``) make these modules; nothing here analyses or rewrites a graph. A region holds no
parameters of its own: its bodies call the model's submodules.
"""

from __future__ import annotations

import contextlib
import warnings
import weakref
from collections.abc import Iterable, Sequence

import torch
import torch.fx as fx
from torch import nn
from torch.nn.modules.module import _global_forward_hooks, _global_forward_pre_hooks

from ..errors import RegionError
from ..graphs import fetch_attr
from ..modes import Mode
from ..runtime import CHECKPOINT, INVERTIBLE, Region, ReplayContext, run_region
from ..runtime.region import Discovery
from ..runtime.stash import EXPENSIVE_OPS
from .body import (
    dropouts_called_directly,
    is_rng_mark,
    marked_body,
    may_drop,
    named_objects,
    norms_called_directly,
    portable_graph,
    updated_buffers,
)
from .fused import FusedReplay

__all__ = ["OptimizedModule", "BodyRegion", "CheckpointRegion", "InvertibleRegion", "regions_run_plain",
           "watch_registrations"]


# A parameter or buffer registered after optimize into a module a region reads (``load_state_dict(...,
# assign=True)``, ``module.weight = nn.Parameter(...)``) bumps this count, and each region checks it at its next
# call (:meth:`BodyRegion._rebind`). A region's bodies hold the tensors they read as attributes, and its caches
# hold its modules' parameters: without the check it computed with the old tensors and gave the new ones no
# gradient. The hooks go in with the first region, and count only registrations into the modules regions read
# (before, importing invfx installed them and every layer built anywhere made every region rebind).
_registrations = [0]
_watched_modules: "weakref.WeakSet[nn.Module]" = weakref.WeakSet()
_hooks = []


def _count_registration(module, name, value) -> None:
    if module in _watched_modules:
        _registrations[0] += 1  # (returns None: the registration itself goes on unchanged)


def watch_registrations(modules: Iterable[nn.Module]) -> None:
    """Count the parameters and buffers registered into ``modules`` from now on (see ``_registrations``)."""
    if not _hooks:
        _hooks.append(torch.nn.modules.module.register_module_parameter_registration_hook(_count_registration))
        _hooks.append(torch.nn.modules.module.register_module_buffer_registration_hook(_count_registration))
    _watched_modules.update(modules)


_plain_runs = [0]  # > 0 while the analysis runs the model with every region as plain code


@contextlib.contextmanager
def regions_run_plain():
    """Every region runs its forward as plain code meanwhile (nothing freed, nothing saved for a replay). The
    analysis ran the model under no_grad for that, but a model may enable grad inside its forward
    (``with torch.enable_grad():``): a region there freed the inputs the analysis went on to read (a segfault)."""
    _plain_runs[0] += 1
    try:
        yield
    finally:
        _plain_runs[0] -= 1


class OptimizedModule(fx.GraphModule):
    """A GraphModule that shares the original model's parameters and buffers (same ``state_dict`` keys) and
    runs its segments as invfx regions where the plan says so. ``plan`` (:class:`invfx.Plan`) describes them."""

    plan: object  # (invfx.report.Plan)


def _assign_attr(body: nn.Module, target: str, value) -> None:
    """``body.<target> = value``, whatever it was before (a parameter may have been replaced by a tensor)."""
    path, _, field = target.rpartition(".")
    parent = body.get_submodule(path) if path else body
    for store in (parent._parameters, parent._buffers, parent._modules, parent.__dict__):
        store.pop(field, None)
    setattr(parent, field, value)


class BodyRegion(nn.Module):
    """A segment of an optimized model run as one runtime region (the base of both kinds).

    Holds no parameters of its own: its bodies call the model's submodules, so ``state_dict`` is the model's.
    In training with grad enabled it runs as a region; otherwise (eval, no_grad) its forward is plain code.
    """

    invfx_region = True  # (traced as a leaf: see trace.InvfxTracer)
    _BODIES: tuple[str, ...] = ("forward_body",)
    # A GraphModule pickles as code and is re-traced on load, which loses the nodes' meta (the fused replay's
    # bookkeeping) and would trace into helpers: bodies travel as graphs instead, with the objects they name.
    _CARRIED_META = ("invfx_value", "invfx_recompute", "invfx_inverts", "tensor_meta")

    def __init__(self, name: str, forward_body: fx.GraphModule, num_inputs: int, modules: Sequence[nn.Module],
                 source: str):
        super().__init__()
        # Bodies are plain attributes, not submodules: their children are the model's own modules, registered
        # once under their original names.
        object.__setattr__(self, "forward_body", forward_body)
        object.__setattr__(self, "_modules_used", tuple(modules))
        self.region_name = name
        self.source = source
        self.num_inputs = num_inputs
        self.mode = Mode.CHECKPOINT  # or SELECTIVE, or KEEP: plain code (the plan's choice)
        # selective: the calls (node names) whose outputs it keeps, the plan's choice; None: every call that may be
        self.kept_calls: frozenset[str] | None = None

    def forward(self, *inputs):
        if self.__dict__.get("_epoch") != _registrations[0]:
            self._rebind()
        if self.mode == Mode.KEEP or not (self.training and torch.is_grad_enabled()) or _plain_runs[0]:
            return self.forward_body(*inputs)
        if _hooked(self._modules_used):
            # A forward hook on a module called inside the region sees values computed there: without a graph
            # (a loss on a feature taken by a hook silently lost its gradient) or with the dry run's graph
            # (backward failed). FSDP2's fully_shard works by such hooks (its parameters got no gradient). Plain
            # code is right for all of them; no memory is saved while the hooks are there.
            warnings.warn(f"{self._label}: forward hooks are registered on modules it calls "
                          f"({_hooked_names(self)}); it runs as plain code (saving no memory) while they are",
                          stacklevel=2)
            return self.forward_body(*inputs)
        return run_region(self._region(), inputs)

    def _apply(self, fn, recurse=True):
        # ``.to(dtype)``, ``.double()``, ``.cuda()`` put new buffer tensors into their modules' ``_buffers`` without
        # a registration (parameters are converted in place): the next call rebinds the bodies to them, else a
        # region traced through a BatchNorm (timm's BatchNormAct2d) reads the old float32 running statistics
        result = super()._apply(fn, recurse)
        object.__setattr__(self, "_epoch", None)
        return result

    def _region(self) -> Region:
        if self.mode == Mode.SELECTIVE:
            # the outputs of its convolutions, matrix products and attention are kept for the recomputation,
            # which runs only the cheap ops between them (invfx.runtime.stash)
            calls = self.__dict__.get("kept_calls")  # (absent from a region pickled before it existed: every call)
            body, direct, norms = self._body(calls)
            return self._cached_region((CHECKPOINT, Mode.SELECTIVE, calls), lambda: Region(
                function=body, mode=CHECKPOINT, discovery=self.discovery,
                buffers=self._modules_used, updated=self._updated_buffers, name=self._label, keep_ops=EXPENSIVE_OPS,
                keep_marked=True, dropout_masks=self._may_drop(), dropouts_marked=direct, norms_marked=norms))
        body, direct, norms = self._body(None, selective=False)
        return self._cached_region(CHECKPOINT, lambda: Region(
            function=body, mode=CHECKPOINT, discovery=self.discovery, buffers=self._modules_used,
            updated=self._updated_buffers, name=self._label, dropout_masks=self._may_drop(), dropouts_marked=direct,
            norms_marked=norms))

    def _may_drop(self) -> bool:
        """Whether its forward may run a dropout whose mask a checkpoint keeps (else it records none)."""
        return any(may_drop(self.forward_body, node) for node in self.forward_body.graph.nodes)

    def _body(self, calls: frozenset[str] | None, selective: bool = True) -> tuple[fx.GraphModule, bool, bool]:
        """The body a checkpoint runs, whether it calls its dropouts' record itself and whether it calls its
        BatchNorms' (made once per choice): selective, with the calls whose outputs it keeps marked; its
        dropouts called directly where the graph shows them all; its BatchNorms through the statistics' record."""
        key = (selective, calls)
        made = self.__dict__.get("_marked")  # (dropped by _derive when the bodies change, never pickled)
        if made is None or made[0] != key:
            body = marked_body(self.forward_body, calls) if selective else self.forward_body
            direct = dropouts_called_directly(body)
            body, dropouts_marked = (body, False) if direct is None else (direct, self._may_drop())
            body, norms_marked = norms_called_directly(body)
            made = (key, (body, dropouts_marked, norms_marked))
            object.__setattr__(self, "_marked", made)
        return made[1]

    def _cached_region(self, key, make) -> Region:
        """The Region for this call, made once per configuration (a Region is immutable; making one and
        checking it at every call of every block added up)."""
        key = (key, self._label, id(self.discovery), id(self.forward_body))
        cache = self.__dict__.get("_regions")
        if cache is None or cache[0] != key:
            cache = (key, make())
            object.__setattr__(self, "_regions", cache)
        return cache[1]

    def _derive(self) -> None:
        """State computed from the bodies: the dry-run cache (which parameters the forward reads)."""
        candidates = {id(p): p for m in self._modules_used for p in m.parameters()}
        for node in self.forward_body.graph.nodes:
            if node.op == "get_attr":
                value = fetch_attr(self.forward_body, node.target)
                if isinstance(value, torch.Tensor):
                    candidates[id(value)] = value
        object.__setattr__(self, "discovery", Discovery(list(candidates.values())))
        object.__setattr__(self, "_updated_buffers", updated_buffers(self.forward_body))
        self.__dict__.pop("_marked", None)  # (made again from the bodies as they are now)
        object.__setattr__(self, "_parameter_ids", self._current_parameter_ids())
        watch_registrations(m for used in self._modules_used for m in used.modules())
        watch_registrations(owner for owner, _ in self.__dict__.get("_owners", {}).values())
        object.__setattr__(self, "_epoch", _registrations[0])

    def _current_parameter_ids(self) -> tuple[int, ...]:
        return tuple(id(p) for m in self._modules_used for p in m.parameters())

    def _rebind(self) -> None:
        """After a parameter or buffer was registered anywhere: give each attribute the bodies read the object
        its owner module holds now, and work the caches out again (which parameters the region reads, the
        fused replay's schedule) when any of them, or a parameter of the region's modules, changed."""
        changed = False
        for (key, target), (owner, field) in self.__dict__.get("_owners", {}).items():
            current, body = getattr(owner, field, None), self.__dict__[key]
            if fetch_attr(body, target) is not current:
                _assign_attr(body, target, current)
                changed = True
        if changed or self._current_parameter_ids() != self.__dict__.get("_parameter_ids"):
            self._derive()
        object.__setattr__(self, "_epoch", _registrations[0])

    def __getstate__(self):
        state = dict(self.__dict__)
        state.pop("fused_replay", None)
        state.pop("discovery", None)
        state.pop("_regions", None)
        state.pop("_marked", None)
        state.pop("_updated_buffers", None)  # (found again from the bodies on loading)
        for key in self._BODIES:
            body = state.pop(key)
            state[key + "_graph"] = (portable_graph(body.graph, self._CARRIED_META), named_objects(body),
                                     type(body).__name__)
        return state

    def __setstate__(self, state):
        bodies = {key: state.pop(key + "_graph") for key in self._BODIES}
        super().__setstate__(state)
        for key, (graph, objects, class_name) in bodies.items():
            object.__setattr__(self, key, fx.GraphModule(objects, graph, class_name))
        self._derive()

    @property
    def code(self) -> str:
        return self.forward_body.code

    @property
    def _label(self) -> str:
        return f"{self.region_name} ({self.source})" if self.source else self.region_name


class CheckpointRegion(BodyRegion):
    """A checkpointed segment: keeps its inputs, recomputes its forward in backward (BatchNorm statistics are
    updated once, the forward's RNG state is replayed)."""

    def __init__(self, name: str, forward_body: fx.GraphModule, num_inputs: int, modules: Sequence[nn.Module],
                 source: str):
        super().__init__(name, forward_body, num_inputs, modules, source)
        self._derive()

    def extra_repr(self) -> str:
        return f"{self.source or self.region_name}: {self.num_inputs} inputs, {self.mode}"


class InvertibleRegion(BodyRegion):
    """One invertible segment of an optimized model: frees its inputs in forward, rebuilds them from its
    outputs in backward (fused with the backward: each recomputed sub-network runs once)."""

    _BODIES = ("forward_body", "rebuild_body")

    def __init__(self, name: str, forward_body: fx.GraphModule, rebuild_body: fx.GraphModule,
                 num_inputs: int, rebuilt: Sequence[int], kept: Sequence[int], free: Sequence[int],
                 modules: Sequence[nn.Module], source: str):
        super().__init__(name, forward_body, num_inputs, modules, source)
        object.__setattr__(self, "rebuild_body", rebuild_body)
        self.rebuilt = tuple(rebuilt)
        self.kept = tuple(kept)
        self.free = tuple(free)
        self.fused = True  # False: rebuild, then recompute every sub-network again (for comparison)
        self.mode = Mode.INVERTIBLE  # or CHECKPOINT, SELECTIVE, or KEEP (plain code): the plan's choice
        self._derive()

    @property
    def invertible(self) -> bool:
        return self.mode == Mode.INVERTIBLE

    @invertible.setter
    def invertible(self, value: bool) -> None:
        self.mode = Mode.INVERTIBLE if value else Mode.KEEP

    def _derive(self) -> None:
        super()._derive()
        try:
            replay, why = FusedReplay(self.forward_body, self.rebuild_body, self.rebuilt, self.kept), None
        except RegionError as error:
            # (a sub-network's backward would have to run in two parts: rebuild, then recompute the whole
            # forward instead, which is right for any graph and costs one more evaluation of it)
            replay, why = None, str(error)
        object.__setattr__(self, "fused_replay", replay)
        object.__setattr__(self, "unfused_because", why)

    @property
    def rebuild_code(self) -> str:
        return self.rebuild_body.code

    def extra_repr(self) -> str:
        if self.mode != Mode.INVERTIBLE:
            return super().extra_repr()
        return (f"{self.source or self.region_name}: {self.num_inputs} inputs, rebuilds {list(self.rebuilt)}, "
                f"keeps {list(self.kept)}, frees {list(self.free)}")

    def _region(self) -> Region:
        if self.mode != Mode.INVERTIBLE:
            return super()._region()
        # A forward hook that saw a value this region frees (on the module that made it, read it, or a view of it)
        # may have kept it: the user would read freed memory (a segfault). Then this call frees nothing.
        free = () if _hooked(self.__dict__.get("_watched", ())) else self.free
        record = getattr(self, "record_branches", True)  # (False: OptimizeOptions(exact_branches=False))
        return self._cached_region(
            (INVERTIBLE, self.fused, tuple(free), tuple(self.kept), id(self.fused_replay), record),
            lambda: Region(function=self.forward_body, mode=INVERTIBLE, rebuild=self._rebuild,
                           record_branches=record,
                           discovery=self.discovery,
                           replay=self.fused_replay if self.fused and self.fused_replay is not None else None,
                           free=frozenset(free), keep=frozenset(self.kept), buffers=self._modules_used,
                           updated=self._updated_buffers,
                           name=self._label))

    def _rebuild(self, ctx: ReplayContext) -> None:
        outputs = ctx.outputs if isinstance(ctx.outputs, tuple) else (ctx.outputs,)
        kept = [ctx.input(p).detach() for p in self.kept]
        with torch.no_grad():
            rebuilt = self.rebuild_body(*[o.detach() if isinstance(o, torch.Tensor) else o for o in outputs], *kept)
        for position, value in zip(self.rebuilt, rebuilt):
            ctx.input(position, value)


def _hooked(modules: Sequence[nn.Module]) -> bool:
    """Whether a forward hook (global, or on one of ``modules``) runs, and so may keep a reference to the values
    those modules read and make."""
    return _global_hooks() or any(_own_hooks(m) for m in modules)


def _global_hooks() -> bool:
    return bool(_global_forward_hooks or _global_forward_pre_hooks)


def _own_hooks(module: nn.Module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks)


def _hooked_names(region: "BodyRegion") -> str:
    body = region.forward_body
    names = []
    if _global_hooks():  # (they see every module it calls: say which, by the model's own top-level names)
        called = dict.fromkeys(n.target.split(".")[0] for n in body.graph.nodes
                               if n.op == "call_module" and not is_rng_mark(body, n))
        names.append("global hooks, on the modules it calls in " + ", ".join(called))
    for node in body.graph.nodes:
        if node.op == "call_module" and _own_hooks(body.get_submodule(node.target)):
            names.append(f"{node.target} ({type(body.get_submodule(node.target)).__name__})")
    return ", ".join(dict.fromkeys(names))
