"""Inverses of ops that only move values: flips, rolls, permutations, reshapes, cat/stack and their splits,
pixel (un)shuffle, and the modules that wrap them. All exact."""

import operator

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InverseError
from ..registry import register_inverse, writes_into


def _input_shape(call):
    shape = call.shape("input")
    if shape is None:
        raise InverseError(f"{call}: the input's shape is unknown")
    return shape


def _batch_free_shape(call):
    """The input's shape with its first dimension left to the data (-1): the shapes seen when the graph was
    annotated are an example's, and the batch size may change. Were another dimension to change too, the reshape
    fails loudly (and the runtime checks every rebuilt input's shape)."""
    shape = _input_shape(call)
    return (-1, *shape[1:]) if len(shape) > 0 else shape


def _reshape_rule(*targets, params):
    register_inverse(*targets, params=params, bind=lambda call: ((_batch_free_shape(call),), {}), needs=(),
                     cost=0)(reshape_inverse)


def reshape_inverse(out, shape):
    """Undo any reshape (view, reshape, flatten, unflatten, squeeze, unsqueeze) from the input's shape."""
    return out.reshape(shape)


_reshape_rule(torch.reshape, params=("input", "shape"))
_reshape_rule("reshape", "view", params=("input", "*shape"))
_reshape_rule(torch.flatten, "flatten", params=("input", "start_dim=0", "end_dim=-1"))
_reshape_rule(torch.unflatten, "unflatten", params=("input", "dim", "sizes"))
_reshape_rule(torch.squeeze, "squeeze", params=("input", "dim=None"))
_reshape_rule(torch.unsqueeze, "unsqueeze", params=("input", "dim"))
@register_inverse(nn.Flatten, nn.Unflatten, module=True, bind=lambda call: ((_batch_free_shape(call),), {}),
                  cost=0)
def flatten_module_inverse(module, out, shape):
    return out.reshape(shape)


@register_inverse("contiguous", params=("input", "memory_format=None"), cost=0)
@register_inverse(torch.clone, "clone", params=("input", "*", "memory_format=None"), cost=0)
def identity_inverse(out):
    return out


@register_inverse(nn.Identity, module=True, cost=0)
def identity_module_inverse(module, out):
    return out


@register_inverse(torch.flip, params=("input", "dims"), args=("dims",), needs=(), cost=0)
@register_inverse("flip", params=("input", "*dims"), args=("dims",), needs=(), cost=0)  # x.flip(0, 1)
def flip_inverse(out, dims):
    return torch.flip(out, dims)


@register_inverse(torch.roll, "roll", params=("input", "shifts", "dims=None"), args=("shifts", "dims"), needs=(),
                  cost=0)
def roll_inverse(out, shifts, dims=None):
    back = -shifts if isinstance(shifts, int) else tuple(-s for s in shifts)
    return torch.roll(out, back, dims)


def _inverse_permutation(dims):
    dims = [int(d) for d in dims]
    rank = len(dims)
    inverse = [0] * rank
    for position, dim in enumerate(dims):
        inverse[dim % rank] = position
    return tuple(inverse)


@register_inverse(torch.permute, params=("input", "dims"),
                  bind=lambda call: ((_inverse_permutation(call.arg("dims")),), {}), cost=0)
@register_inverse("permute", params=("input", "*dims"),
                  bind=lambda call: ((_inverse_permutation(call.arg("dims")),), {}), cost=0)
def permute_inverse(out, inverse_dims):
    return out.permute(inverse_dims)


@register_inverse(torch.transpose, "transpose", torch.swapaxes, "swapaxes", params=("input", "dim0", "dim1"),
                  args=("dim0", "dim1"), needs=(), cost=0)
def transpose_inverse(out, dim0, dim1):
    return out.transpose(dim0, dim1)


@register_inverse(torch.t, "t", params=("input",), cost=0)
def t_inverse(out):
    return out.t()


# cat/stack <-> split/chunk/unbind; a tuple output is read item by item through operator.getitem


def _split_sizes(call):
    shapes = call.meta("tensors")
    if shapes is None:
        raise InverseError(f"{call}: the shapes of the concatenated tensors are unknown")
    shapes = shapes[0]
    dim = call.arg("dim")
    rank = len(shapes[0])
    return [shape[dim % rank] for shape in shapes], dim


def _cat_into(buffer, pieces, dim):
    """``torch.cat(pieces, dim, out=buffer)`` when the result has the buffer's shape, dtype and device."""
    if not pieces or not all(isinstance(p, torch.Tensor) and p.dtype == buffer.dtype and p.device == buffer.device
                             and p.dim() == buffer.dim() for p in pieces):
        return None
    dim = dim + buffer.dim() if dim < 0 else dim
    others = buffer.shape[:dim], buffer.shape[dim + 1:]
    if any((p.shape[:dim], p.shape[dim + 1:]) != others for p in pieces) or \
            sum(p.shape[dim] for p in pieces) != buffer.shape[dim]:
        return None
    return torch.cat(pieces, dim, out=buffer)


@register_inverse(torch.cat, torch.concat, torch.concatenate, solves="tensors", params=("tensors", "dim=0"),
                  bind=lambda call: (_split_sizes(call), {}), cost=0)
def cat_inverse(out, sizes, dim=0):
    return list(torch.split(out, sizes, dim))


@register_inverse(torch.stack, solves="tensors", params=("tensors", "dim=0"), args=("dim",), needs=(), cost=0)
def stack_inverse(out, dim=0):
    return list(torch.unbind(out, dim))


@register_inverse(torch.split, "split", params=("input", "split_size_or_sections", "dim=0"), args=("dim",),
                  needs=(), cost=0)
@register_inverse(torch.chunk, "chunk", params=("input", "chunks", "dim=0"), args=("dim",), needs=(), cost=0)
@register_inverse(torch.tensor_split, "tensor_split", params=("input", "indices_or_sections", "dim=0"),
                  args=("dim",), needs=(), cost=0)
@writes_into(lambda buffer, out, dim=0: _cat_into(buffer, list(out), dim))
def split_inverse(out, dim=0):
    return torch.cat(list(out), dim)


@register_inverse(torch.unbind, "unbind", params=("input", "dim=0"), args=("dim",), needs=(), cost=0)
def unbind_inverse(out, dim=0):
    return torch.stack(list(out), dim)


class TupleItem:
    """What inverting ``item = parts[index]`` gives: one known item of a tuple; the solver assembles the tuple
    once every item is known (see :func:`assemble_tuple`)."""

    __slots__ = ("index", "value")

    def __init__(self, index: int, value):
        self.index, self.value = index, value


def _tuple_item_condition(call):
    index = call.arg("index")
    if not isinstance(index, int):
        return f"index {index!r} is not an integer: only whole items of a tuple are tracked"
    return None


@register_inverse(operator.getitem, params=("input", "index"), args=("index",), needs=(),
                  condition=_tuple_item_condition, cost=0)
def tuple_item_inverse(out, index):
    return TupleItem(index, out)


# a fixed permutation by indexing: ``x[:, perm]`` with ``perm`` a buffer (FrEIA's PermuteRandom)


def _fixed_permutation(call):
    """``(dim, perm)`` when the index is full slices then a fixed integer tensor that permutes that dimension;
    else the reason it is not."""
    index = call.arg("index")
    items = index if isinstance(index, tuple) else (index,)
    tensors = [i for i, item in enumerate(items) if isinstance(item, torch.Tensor)]
    if len(tensors) != 1:
        return "the index is not one fixed tensor (an attribute) among slices"
    dim = tensors[0]
    if any(item != slice(None) for i, item in enumerate(items) if i != dim):
        return "the index slices more than one dimension"
    perm, shape = items[dim], call.shape("input")
    if shape is None or dim >= len(shape):
        return "the input's shape is unknown"
    if perm.dtype not in (torch.int64, torch.int32) or perm.dim() != 1 or perm.numel() != shape[dim]:
        return f"index is a {tuple(perm.shape)} {perm.dtype} tensor, not a permutation of dimension {dim}"
    if not torch.equal(torch.sort(perm.detach().cpu()).values, torch.arange(shape[dim], dtype=perm.dtype)):
        return "the index tensor is not a permutation (a value repeats or is missing)"
    return dim, perm


def _permutation_condition(call):
    found = _fixed_permutation(call)
    return found if isinstance(found, str) else None


def _permutation_bind(call):
    index = call.arg("index")
    items = index if isinstance(index, tuple) else (index,)
    dim = next(i for i, item in enumerate(items) if not isinstance(item, slice))
    return (dim, items[dim]), {}


@register_inverse(operator.getitem, params=("input", "index"), bind=_permutation_bind, needs=(),
                  condition=_permutation_condition, cost=0)
def index_permutation_inverse(out, dim, perm):
    """x from ``out = x[:, perm]`` (``perm`` a permutation of the indexed dimension): ``x[:, perm] = out``."""
    return out.new_empty(out.shape).index_copy_(dim, perm.to(out.device), out)


def assemble_tuple(items, length: int) -> tuple:
    """The tuple whose items ``TupleItem``s give; every index in ``range(length)`` must be present."""
    values = {item.index % length: item.value for item in items}
    missing = [i for i in range(length) if i not in values]
    if missing:
        raise InverseError(f"tuple items {missing} were not recovered")
    return tuple(values[i] for i in range(length))


# pixel (un)shuffle


@register_inverse(torch.pixel_shuffle, params=("input", "upscale_factor"), args=("upscale_factor",), needs=(),
                  cost=0)
def pixel_shuffle_inverse(out, upscale_factor):
    return F.pixel_unshuffle(out, upscale_factor)


@register_inverse(torch.pixel_unshuffle, params=("input", "downscale_factor"), args=("downscale_factor",),
                  needs=(), cost=0)
def pixel_unshuffle_inverse(out, downscale_factor):
    return F.pixel_shuffle(out, downscale_factor)


@register_inverse(nn.PixelShuffle, module=True, cost=0)
def pixel_shuffle_module_inverse(module, out):
    return F.pixel_unshuffle(out, module.upscale_factor)


@register_inverse(nn.PixelUnshuffle, module=True, cost=0)
def pixel_unshuffle_module_inverse(module, out):
    return F.pixel_shuffle(out, module.downscale_factor)

__all__ = ["reshape_inverse", "identity_inverse", "flip_inverse", "roll_inverse", "permute_inverse",
           "transpose_inverse", "t_inverse", "cat_inverse", "stack_inverse", "split_inverse", "unbind_inverse",
           "TupleItem", "tuple_item_inverse", "index_permutation_inverse", "assemble_tuple", "pixel_shuffle_inverse",
           "pixel_unshuffle_inverse"]
