"""Small facts about torch.fx graphs that the passes and the regions both read."""

from __future__ import annotations

__all__ = ["fetch_attr", "is_tensor_meta", "tuple_metas", "metas_in", "leaves"]


def fetch_attr(module, target: str):
    """The attribute a get_attr or call_module target names (``"blocks.3.weight"``)."""
    value = module
    for part in target.split("."):
        value = getattr(value, part)
    return value


def is_tensor_meta(meta) -> bool:
    """A TensorMetadata (itself a NamedTuple: test for it before testing for tuples of them)."""
    return hasattr(meta, "shape") and hasattr(meta, "dtype")


def tuple_metas(node) -> list | None:
    """The metadata of each item when ``node`` makes a tuple (chunk, split), else None."""
    meta = node.meta.get("tensor_meta")
    if meta is None or is_tensor_meta(meta) or not isinstance(meta, (tuple, list)):
        return None
    return list(meta)


def leaves(value, is_leaf) -> list:
    """The items of ``value`` for which ``is_leaf`` holds, nested tuples, lists, dicts and slices included, in
    order (a leaf is tested before its container: TensorMetadata is a NamedTuple; a slice's bounds may be values:
    ``a[:, :n]`` with ``n = x.shape[1]``)."""
    if is_leaf(value):
        return [value]
    if isinstance(value, slice):
        return leaves((value.start, value.stop, value.step), is_leaf)
    if isinstance(value, (tuple, list)):
        return [leaf for item in value for leaf in leaves(item, is_leaf)]
    if isinstance(value, dict):
        return [leaf for item in value.values() for leaf in leaves(item, is_leaf)]
    return []


def metas_in(meta) -> list:
    """Every TensorMetadata in a node's ``tensor_meta``."""
    return leaves(meta, is_tensor_meta)
