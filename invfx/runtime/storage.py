"""Freeing a tensor's storage in forward and putting its values back in backward.

A freed tensor keeps its Python object, its sizes, its views and its version counter; only the bytes behind
it go (``untyped_storage().resize_(0)``). Restoring resizes the same storage back and copies the rebuilt values
in through a fresh alias tensor, so:

* every object that refers to the tensor (the caller, its views, autograd nodes that saved it) sees the
  restored values, and
* the tensor's version counter does not move, so a node that saved it (``relu`` saves its output) still
  unpacks it in backward. Restoring through ``tensor.set_()`` or ``tensor.copy_()`` would bump it.

Reading a freed tensor segfaults, so freeing is the caller's promise that nobody reads it before the restore.
:func:`free_blocker` is the runtime's own, second line of defence: it refuses whatever could alias other live
data, whatever the caller claims.
"""

from __future__ import annotations

import torch

__all__ = ["free_blocker", "free_storage", "restore_storage", "storage_key", "is_freed"]


def storage_key(tensor: torch.Tensor) -> tuple[torch.device, int]:
    """Identity of the storage behind ``tensor`` (two tensors that share bytes share the key)."""
    return (tensor.device, tensor.untyped_storage().data_ptr())


def is_freed(tensor: torch.Tensor) -> bool:
    return tensor.numel() > 0 and tensor.untyped_storage().nbytes() == 0


def free_blocker(tensor: torch.Tensor) -> str | None:
    """Why ``tensor``'s storage may not be freed by itself, or None when it may.

    Only the storage-level facts are checked here; whether the storage is shared with an output, a parameter
    or another input is checked by the caller, who knows those tensors.
    """
    if isinstance(tensor, torch.nn.Parameter):
        return "a parameter"
    if type(tensor) is not torch.Tensor:
        return f"tensor subclass {type(tensor).__name__}"
    if tensor.layout is not torch.strided:
        return f"layout {tensor.layout}"
    if tensor.device.type == "meta":
        return "meta tensor"
    if tensor.numel() == 0:
        return "empty"
    if tensor._is_view():
        return "a view of another tensor (its base may be alive)"
    storage = tensor.untyped_storage()
    if storage.nbytes() == 0:
        return "already freed"
    if tensor.storage_offset() != 0 or _span_bytes(tensor) != storage.nbytes():
        return "does not span its whole storage (other tensors may use the rest)"
    if not storage.resizable():
        return "storage is not resizable (memory owned outside torch, e.g. numpy)"
    return None


def _span_bytes(tensor: torch.Tensor) -> int | torch.SymInt:
    """Bytes from the first to one past the last element the tensor can address."""
    if tensor.numel() == 0:
        return 0
    last = sum((size - 1) * stride for size, stride in zip(tensor.shape, tensor.stride()))
    return (tensor.storage_offset() + last + 1) * tensor.element_size()


def free_storage(tensor: torch.Tensor) -> int:
    """Drop the bytes of ``tensor``; returns how many were held (needed to restore)."""
    storage = tensor.untyped_storage()
    nbytes = storage.nbytes()
    storage.resize_(0)
    return nbytes


def restore_storage(tensor: torch.Tensor, nbytes: int, values: torch.Tensor | None = None) -> torch.Tensor:
    """Give ``tensor`` its ``nbytes`` back and fill it with ``values`` without touching its version counter.

    Returns the fresh alias it wrote through. Without ``values`` the bytes come back uninitialised, for a
    caller that writes the alias itself (``torch.cat(pieces, out=alias)`` saves a copy); values already in
    that storage are not copied again."""
    storage = tensor.untyped_storage()
    if storage.nbytes() != nbytes:
        storage.resize_(nbytes)
    alias = torch.empty(0, dtype=tensor.dtype, device=tensor.device)
    alias.set_(storage, tensor.storage_offset(), tensor.size(), tensor.stride())
    if values is not None and not (values.untyped_storage().data_ptr() == storage.data_ptr()
                                   and values.storage_offset() == tensor.storage_offset()
                                   and values.stride() == tensor.stride() and values.dtype == tensor.dtype):
        with torch.no_grad():
            alias.copy_(values)
    return alias
