"""``invfx.nn.Module``: the InvTorch API for hand-written invertible modules, backed by the invfx runtime.

Subclass it and write ``function(*inputs, strict=None)`` and ``inverse(*outputs, saved=())`` instead of
``forward``. Two flags choose how the module trains: ``checkpoint`` (recompute in backward instead of keeping
activations) and ``invertible`` (keep only the outputs and rebuild the inputs with the inverse).

Differences from InvTorch, each for safety:

* A module frees an input only when the caller proves nobody reads it before backward: inside
  :class:`~invfx.nn.InvertibleSequential` (for the links of its chain), under :func:`free` (the caller's
  explicit promise), or in a graph rewritten by :func:`invfx.optimize`. A lone call never frees the caller's
  tensors: ``x + block(x)`` segfaults in InvTorch and memcnn.
* ``seed`` defaults to True: a recomputation with another dropout mask gives silently wrong gradients.
* ``strict`` is optional: which outputs need grad is discovered automatically by the runtime (a dry forward),
  so a ``function`` that ignores ``strict`` still trains correctly. ``check_function`` reports whether it
  honours it.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator

import torch
from torch import nn

from ..errors import InvfxError
from ..runtime import CHECKPOINT, INVERTIBLE, Region, rng_marks, run_region
from ..runtime.state import RngState
from ..utils import pack

__all__ = ["Module", "free", "mode"]

_FREEABLE: contextvars.ContextVar[tuple] = contextvars.ContextVar("invfx_freeable", default=())


@contextlib.contextmanager
def free(*tensors: torch.Tensor) -> Iterator[None]:
    """Let invertible modules called in this block free the storage of ``tensors`` until backward.

    The caller promises that nothing reads them between the forward and the backward (the backward puts them
    back). Safer uses need no promise: :class:`InvertibleSequential` and :func:`invfx.optimize` prove it.
    """
    token = _FREEABLE.set(_FREEABLE.get() + tensors)
    try:
        yield
    finally:
        _FREEABLE.reset(token)


def _freeable_positions(inputs) -> frozenset[int]:
    allowed = _FREEABLE.get()
    if not allowed:
        return frozenset()
    return frozenset(i for i, x in enumerate(inputs) if isinstance(x, torch.Tensor)
                     and any(x is t for t in allowed))


class Module(nn.Module):
    """Base invertible module: ``inputs == self.inverse(*self.function(*inputs))``.

    ``num_function_outputs`` / ``num_inverse_outputs`` (None: all; n > 0: the first n; n < 0: all but the last
    -n) say how many outputs ``forward`` returns; the rest are extra outputs that only the inverse needs
    (BatchNorm's batch statistics), kept for backward but not returned.
    """

    is_container = False  # containers are skipped by a recursive mode()
    num_function_outputs: int | None = None
    num_inverse_outputs: int | None = None
    replay = None  # a fused replay (see invfx.runtime.ReplayContext); None: invert, then recompute

    def __init__(self):
        super().__init__()
        self._checkpoint = True
        self._invertible = True
        self.seed = True
        self._reversed = False

    # -- what subclasses write ---------------------------------------------------------------------------------

    def function(self, *inputs, strict=None):
        """Compute the outputs from the inputs."""
        raise NotImplementedError(f"{type(self).__name__} does not define function()")

    def inverse(self, *outputs, saved=()):
        """Compute the inputs from the outputs; positions in ``saved`` are in memory and need not be rebuilt."""
        raise NotImplementedError(f"{type(self).__name__} does not define inverse()")

    # -- running -----------------------------------------------------------------------------------------------

    def forward(self, *inputs):
        if not (self.checkpoint and torch.is_grad_enabled()):
            return self.process_outputs(*pack(self.call_function(*inputs)))
        invertible = self.invertible
        region = Region(
            function=self.call_function,
            mode=INVERTIBLE if invertible else CHECKPOINT,
            inverse=self._region_inverse if invertible else None,
            replay=self.replay if invertible and not self.reversed else None,
            free=_freeable_positions(inputs) if invertible else frozenset(),
            buffers=(self,),
            preserve_rng_state=self.seed,
            name=self._region_name(),
        )
        return self.process_outputs(*pack(run_region(region, inputs)))

    def _region_inverse(self, outputs, saved):
        return self.call_inverse(*outputs, saved=saved)

    def _region_name(self) -> str:
        return f"{type(self).__name__} (invfx.nn.Module)"

    @property
    def call_function(self):
        """``function``, or ``inverse`` when the module is reversed."""
        return self.inverse if self.reversed else self.function

    @property
    def call_inverse(self):
        """``inverse``, or ``function`` when the module is reversed."""
        return self.function if self.reversed else self.inverse

    @property
    def num_outputs(self) -> int | None:
        return self.num_inverse_outputs if self.reversed else self.num_function_outputs

    def process_outputs(self, *outputs):
        """Drop the extra outputs (see the class docstring); a single remaining output is returned bare."""
        count = self.num_outputs
        if count is not None:
            if count == 0:
                raise InvfxError(f"{type(self).__name__}: num_outputs must be None or non-zero")
            outputs = outputs[:count]
        return outputs[0] if len(outputs) == 1 else outputs

    # -- flags -------------------------------------------------------------------------------------------------

    @property
    def checkpoint(self) -> bool:
        """Recompute in backward instead of keeping activations (False: a plain module)."""
        return self._checkpoint

    @checkpoint.setter
    def checkpoint(self, value: bool) -> None:
        self._checkpoint = bool(value)
        if not value:
            self._invertible = False

    @property
    def invertible(self) -> bool:
        """Keep only the outputs and rebuild the inputs with the inverse (implies ``checkpoint``)."""
        return self._checkpoint and self._invertible

    @invertible.setter
    def invertible(self, value: bool) -> None:
        self._invertible = bool(value)
        if value:
            self._checkpoint = True

    @property
    def reversible(self) -> bool:
        """Whether ``function`` and ``inverse`` may swap roles (override to return True)."""
        return False

    @property
    def reversed(self) -> bool:
        return self._reversed

    @reversed.setter
    def reversed(self, value: bool) -> None:
        self.reverse(value)

    def reverse(self, mode: bool | None = None) -> "Module":
        """Swap function and inverse (``mode`` None toggles). Returns self."""
        target = not self._reversed if mode is None else bool(mode)
        if target and not self.reversible:
            raise InvfxError(f"{type(self).__name__} is not reversible (its `reversible` property is False)")
        self._reversed = target
        return self

    @contextlib.contextmanager
    def temp_mode(self, **flags) -> Iterator["Module"]:
        """Set ``checkpoint`` / ``invertible`` / ``seed`` / ``reversed`` on this module for a block."""
        with mode(self, recurse=False, **flags):
            yield self

    # -- checks ------------------------------------------------------------------------------------------------

    def check_function(self, *inputs) -> bool:
        """Whether ``function(..., strict=True)`` under no_grad marks the outputs that need grad exactly as a
        run with grad does, and gives the same values (with the same RNG state)."""
        state = torch.get_rng_state()
        with torch.no_grad():
            strict = pack(self.call_function(*inputs, strict=True))
        torch.set_rng_state(state)
        with torch.enable_grad():
            leaves = [x.detach().requires_grad_(x.requires_grad) if isinstance(x, torch.Tensor) else x
                      for x in inputs]
            real = pack(self.call_function(*leaves))
        return len(strict) == len(real) and all(
            _same(a, b) and (not isinstance(a, torch.Tensor) or a.requires_grad == b.requires_grad)
            for a, b in zip(strict, real))

    def check_inverse(self, *inputs, rtol: float = 1e-3, atol: float = 1e-5) -> bool:
        """Whether ``inverse(*function(*inputs))`` gives back the inputs (under no_grad, with the RNG state and the
        :func:`~invfx.runtime.rng_mark` states of the function replayed for the inverse). The caller's RNG
        streams are left as they were."""
        rng = RngState(inputs)
        with torch.random.fork_rng(devices=list(rng.cuda)), torch.no_grad():
            with rng_marks("record", rng):  # sub-networks marked with rng_mark draw the same masks in both
                outputs = pack(self.call_function(*inputs))
            rng.set()
            with rng_marks("replay", rng):
                rebuilt = pack(self.call_inverse(*outputs, saved=()))
        return len(rebuilt) >= len(inputs) and all(
            _same(a, b, rtol, atol) for a, b in zip(inputs, rebuilt) if isinstance(a, torch.Tensor))

    def extra_repr(self) -> str:
        text = f"reversed={self.reversed}, checkpoint={self.checkpoint}"
        if self.checkpoint:
            text += f", invertible={self.invertible}, seed={self.seed}"
        return text


def _same(a, b, rtol=1e-5, atol=1e-8) -> bool:
    if isinstance(a, torch.Tensor) != isinstance(b, torch.Tensor):
        return False
    if not isinstance(a, torch.Tensor):
        return a == b
    return a.shape == b.shape and torch.allclose(a.detach(), b.detach().to(a.dtype), rtol=rtol, atol=atol)


_FLAGS = ("checkpoint", "invertible", "seed", "reversed")


@contextlib.contextmanager
def mode(module: nn.Module, *, recurse: bool = True, **flags) -> Iterator[nn.Module]:
    """Temporarily set flags (``checkpoint``, ``invertible``, ``seed``, ``reversed``) on every
    :class:`invfx.nn.Module` in ``module``'s tree but containers (or on ``module`` alone with ``recurse=False``).

    ``with invfx.nn.mode(model, checkpoint=False): ...`` runs the model plainly; everything is put back after.
    """
    unknown = set(flags) - set(_FLAGS)
    if unknown:
        raise InvfxError(f"invfx.nn.mode: unknown flags {sorted(unknown)}; known: {list(_FLAGS)}")
    if flags.get("checkpoint") is False and flags.get("invertible"):
        raise InvfxError("invfx.nn.mode: invertible=True needs checkpoint=True")
    # Containers keep their own flags under a recursive call: turning a whole InvertibleSequential into one
    # region is a different memory plan, not a mode of its blocks. Set a container's flags directly.
    targets = [m for m in module.modules() if isinstance(m, Module) and not m.is_container] if recurse else \
        [module] if isinstance(module, Module) else []
    saved = [(m, m._checkpoint, m._invertible, m.seed, m._reversed) for m in targets]
    try:
        for m in targets:
            # order matters: checkpoint=False clears invertible, invertible=True sets checkpoint
            for name in sorted(flags, key=lambda n: (n != "checkpoint")):
                setattr(m, name, flags[name])
        yield module
    finally:
        for m, checkpoint, invertible, seed, reversed_ in saved:
            m._checkpoint, m._invertible, m.seed, m._reversed = checkpoint, invertible, seed, reversed_

