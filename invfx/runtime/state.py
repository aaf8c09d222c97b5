"""Global state a recomputation must replay: RNG streams, autocast, and buffers the forward mutates.

Each class captures in forward and replays in backward. They know nothing of regions or graphs.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator

import torch

from .storage import restore_storage

__all__ = ["RngState", "AutocastState", "BufferState", "hooks_silenced"]


class RngState:
    """CPU and CUDA random-number-generator state, so that dropout draws the same mask when rerun.

    CUDA state is captured for every CUDA device that the given tensors live on.
    """

    __slots__ = ("cpu", "cuda", "marks", "last")

    def __init__(self, tensors: Iterable[torch.Tensor] = (), devices: Iterable[int] | None = None):
        self.cpu = torch.get_rng_state()
        if devices is None:
            devices = sorted({t.device.index or 0 for t in tensors if t.device.type == "cuda"})
        self.cuda = {d: torch.cuda.get_rng_state(d) for d in devices}
        self.marks: dict[str, RngState] = {}  # states recorded at rng_mark() calls, by name
        self.last: RngState | None = None  # the state recorded last, if any

    def mark(self, name: str) -> "RngState":
        """The current state, recorded under ``name`` (see ``invfx.runtime.rng_mark``). Where no random number
        was drawn since the last one recorded, that one is shared: a dropout with p = 0 draws none, and a state
        (5 KB on CPU) per mark held to the end of a long region grew its memory with depth."""
        state = RngState(devices=list(self.cuda))
        last = self.last
        if last is None and state.same_as(self):
            state = self.last = self._alias()
        elif last is not None and state.same_as(last):
            state = last
        else:
            self.last = state
        self.marks[name] = state
        return state

    def _alias(self) -> "RngState":
        """The same state as a separate object sharing its tensors (``marks`` must not hold ``self``: a
        reference cycle would keep its 5 KB until the garbage collector ran)."""
        alias = RngState.__new__(RngState)
        alias.cpu, alias.cuda, alias.marks, alias.last = self.cpu, self.cuda, {}, None
        return alias

    def same_as(self, other: "RngState") -> bool:
        return torch.equal(self.cpu, other.cpu) and self.cuda.keys() == other.cuda.keys() and \
            all(torch.equal(state, other.cuda[d]) for d, state in self.cuda.items())

    def consumed(self) -> bool:
        """Whether any generator moved since the capture. One that did not need not be replayed, and not
        keeping its state (5 KB on CPU) per region keeps memory flat in depth."""
        if not torch.equal(self.cpu, torch.get_rng_state()):
            return True
        return any(not torch.equal(state, torch.cuda.get_rng_state(d)) for d, state in self.cuda.items())

    @contextlib.contextmanager
    def forked(self) -> Iterator["RngState"]:
        """Run a block that may call :meth:`set` without disturbing the caller's RNG streams."""
        with torch.random.fork_rng(devices=list(self.cuda), enabled=True):
            yield self

    def set(self) -> None:
        torch.set_rng_state(self.cpu)
        for device, state in self.cuda.items():
            torch.cuda.set_rng_state(state, device)


class AutocastState:
    """Whether (and to which dtype) autocast was on for CPU and CUDA when the forward ran.

    Backward runs in an engine thread with autocast off; recomputing without the forward's autocast would
    give different dtypes ("mat1 and mat2 must have the same dtype" in the peers).
    """

    __slots__ = ("devices", "cache")

    def __init__(self) -> None:
        device_types = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
        self.devices = [(d, torch.is_autocast_enabled(d), torch.get_autocast_dtype(d)) for d in device_types]
        self.cache = torch.is_autocast_cache_enabled()

    @property
    def enabled(self) -> bool:
        return any(enabled for _, enabled, _ in self.devices)

    def dtypes(self) -> list[torch.dtype]:
        """The dtypes autocast computed in (none when it was off)."""
        return [dtype for _, enabled, dtype in self.devices if enabled]

    def replayed(self) -> contextlib.AbstractContextManager[None]:
        """A block run with the forward's autocast state (nothing to do where it is the current one)."""
        if not self.enabled and not any(torch.is_autocast_enabled(d) for d, _, _ in self.devices):
            return contextlib.nullcontext()
        return self._replayed()

    @contextlib.contextmanager
    def _replayed(self) -> Iterator[None]:
        with contextlib.ExitStack() as stack:
            for device_type, enabled, dtype in self.devices:
                stack.enter_context(
                    torch.autocast(device_type, dtype=dtype, enabled=enabled, cache_enabled=self.cache))
            yield


class BufferState:
    """Buffers (BatchNorm running statistics, counters) that the forward mutated in place.

    The forward's update is the one a training step should make. A recomputation in backward would make it a
    second time, so :meth:`preserved` snapshots the mutated buffers before the recomputation and writes the
    snapshot back after it.

    Buffers come in groups (the direct buffers of one module). A group counts as mutated when any member's
    version counter moved: BatchNorm updates its running mean and variance inside the kernel without a version
    bump, but bumps ``num_batches_tracked`` beside them. Only mutated groups pay for a snapshot. ``updated``:
    buffers known to be updated whatever their versions say (a BatchNorm traced through, whose running
    statistics ``F.batch_norm`` updates with no counter beside them): always snapshot.
    """

    __slots__ = ("groups", "versions", "updated")

    def __init__(self, owners: Iterable[torch.Tensor | torch.nn.Module], updated: Iterable[torch.Tensor] = ()):
        self.groups = list(_buffer_groups(owners))
        self.versions = [[b._version for b in group] for group in self.groups]
        self.updated = list(updated)

    def mutated(self) -> list[torch.Tensor]:
        """Buffers of the groups whose versions moved since construction (call right after the forward), and
        the buffers known to be updated."""
        found = [b for group, versions in zip(self.groups, self.versions)
                 if any(b._version != v for b, v in zip(group, versions)) for b in group]
        seen = {id(b) for b in found}
        return found + [b for b in self.updated if id(b) not in seen]

    @staticmethod
    def preserved(buffers: list[torch.Tensor]) -> contextlib.AbstractContextManager[None]:
        """A block after which ``buffers`` hold their values from before it."""
        return BufferState._preserved(buffers) if buffers else contextlib.nullcontext()

    @staticmethod
    @contextlib.contextmanager
    def _preserved(buffers: list[torch.Tensor]) -> Iterator[None]:
        snapshot = [b.detach().clone() for b in buffers]
        try:
            yield
        finally:
            # Through an alias: the restore must not look like a new in-place update to autograd.
            for buffer, value in zip(buffers, snapshot):
                restore_storage(buffer, buffer.untyped_storage().nbytes(), value)


def _buffer_groups(owners: Iterable[torch.Tensor | torch.nn.Module]) -> Iterator[list[torch.Tensor]]:
    seen: set[int] = set()
    for owner in owners:
        if isinstance(owner, torch.nn.Module):
            # (a module without children, the common owner, skips the modules() walk: it runs at every call)
            for module in owner.modules() if owner._modules else (owner,):
                group = [b for b in module._buffers.values() if b is not None and id(b) not in seen]
                seen.update(id(b) for b in group)
                if group:
                    yield group
        elif isinstance(owner, torch.Tensor) and id(owner) not in seen:
            seen.add(id(owner))
            yield [owner]


@contextlib.contextmanager
def hooks_silenced(tensors: Iterable[torch.Tensor]) -> Iterator[None]:
    """Tensor hooks of ``tensors`` (parameters) do not fire inside the block.

    A region's backward differentiates its recomputation with respect to the parameters and hands the
    gradients to the engine, which runs the parameters' hooks on them: they must not also fire in the inner
    differentiation (a hook that scales a gradient would scale it twice).
    """
    silenced = []
    for tensor in tensors:
        hooks = getattr(tensor, "_backward_hooks", None)
        if hooks:
            silenced.append((tensor, hooks))
            tensor._backward_hooks = type(hooks)()
    try:
        yield
    finally:
        for tensor, hooks in silenced:
            tensor._backward_hooks = hooks
