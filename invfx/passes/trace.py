"""Pass 1: trace a model with torch.fx, keeping what cannot be traced as opaque leaves.

invfx.nn modules and the user's ``leaf_modules`` are leaves (called as a whole, recomputed as a whole); torch.nn
layers are leaves as fx makes them. A submodule whose forward cannot be traced (data-dependent control flow,
unsupported Python) is rolled back and kept as an opaque leaf; the reason is recorded, and the plan reports it.
Only when the root's own forward cannot be traced is it an error.

While tracing, ``torch.is_tensor`` answers for fx's proxies too (a proxy is never a tensor to Python): True for a
proxy of a tensor, False for one of a size, a number or a tuple, from what made it (:func:`proxy_kind`).
Models branch on it to wrap a tensor in a tuple (FrEIA's ``SequenceINN``: ``if torch.is_tensor(x): x = (x,)``);
answered False, the traced graph would index the tensor where the model indexes the tuple.
"""

from __future__ import annotations

import builtins
import contextlib
import inspect
import operator
import sys
from collections.abc import Iterable, Sequence

import torch
import torch.fx as fx
from torch import nn
from torch.amp.autocast_mode import autocast
from torch.autograd import grad_mode
from torch.fx._symbolic_trace import _assert_is_none
from torch.fx.node import has_side_effect

from ..errors import InvfxError, TraceError, first_line
from ..nn.module import Module as InvertibleModule
from ..runtime.grad_mode import enter_grad_mode, exit_grad_mode
from .exported import is_hugging_face_model, trace_exported

__all__ = ["trace", "InvfxTracer", "MODE_SWITCHES", "proxy_kind"]

#: the calls a traced graph switches grad mode or autocast with (never inside a region: see segments.py)
MODE_SWITCHES = frozenset({enter_grad_mode, exit_grad_mode, grad_mode._enter_inference_mode,
                           grad_mode._exit_inference_mode, torch.amp._enter_autocast, torch.amp._exit_autocast})
for _switch in MODE_SWITCHES:
    has_side_effect(_switch)  # (no dead-code pass may drop one: its result is read only by its exit)


class InvfxTracer(fx.Tracer):
    def __init__(self, leaf_modules: Iterable[type | nn.Module] = ()):
        super().__init__()
        # Buffers read as attributes are traced as get_attr nodes, not used as the tensors they are: an in-place
        # update of one (timm's BatchNormAct2d counts ``num_batches_tracked.add_(1)`` itself) ran once while
        # tracing, on the model's own buffer, and was missing from the graph, so the optimized model never
        # counted a batch and optimize had changed the model
        self.proxy_buffer_attributes = True
        leaf_modules = tuple(leaf_modules)
        self.leaf_types = tuple(m for m in leaf_modules if isinstance(m, type))
        self.leaf_instances = {id(m) for m in leaf_modules if isinstance(m, nn.Module)}
        self.opaque: dict[str, str] = {}  # qualified name -> why it could not be traced

    def create_arg(self, a):
        # A NumPy scalar (FrEIA's ``np.prod(dims) * scale``) is no argument fx can record, and its repr
        # (``np.float64(0.0)``) is no code the graph can run: it is recorded as the Python number it holds.
        numpy = sys.modules.get("numpy")  # (not a dependency: without it imported there is no NumPy scalar)
        if numpy is not None and isinstance(a, numpy.generic):
            a = a.item()
        return super().create_arg(a)

    def iter(self, obj):
        # A loop over a parameter or buffer (``for v in self.vectors``: FrEIA's Householder reflections) runs over
        # its rows, as many as it has now: its shape is the module's, not the data's.
        node = obj.node
        if node.op == "get_attr":
            value = _attribute(self.root, str(node.target))
            if isinstance(value, torch.Tensor) and value.dim() > 0:
                return iter([obj[i] for i in range(value.shape[0])])
        return super().iter(obj)

    def is_leaf_module(self, m: nn.Module, qualified_name: str) -> bool:
        # (a region of a model optimized before, inside this one, runs as it was planned)
        if isinstance(m, InvertibleModule) or id(m) in self.leaf_instances or qualified_name in self.opaque or \
                getattr(type(m), "invfx_region", False):
            return True
        if self.leaf_types and isinstance(m, self.leaf_types):
            return True
        return super().is_leaf_module(m, qualified_name)

    def call_module(self, m, forward, args, kwargs):
        name = self.path_of_module(m)
        if self.is_leaf_module(m, name):
            return super().call_module(m, forward, args, kwargs)
        last = self.graph._root.prev  # the newest node so far
        stack = dict(self.module_stack)
        calls = dict(self.num_calls)
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception as error:  # noqa: BLE001 - any failure inside makes the submodule opaque
            # roll back the nodes traced inside the failed submodule, newest first (their users go before them)
            while self.graph._root.prev is not last:
                self.graph.erase_node(self.graph._root.prev)
            self.module_stack.clear()
            self.module_stack.update(stack)
            self.num_calls.clear()
            self.num_calls.update(calls)
            self.opaque[name] = f"{type(error).__name__}: {first_line(error)}"
            return super().call_module(m, forward, args, kwargs)


@contextlib.contextmanager
def _recording_mode_switches(tracer: fx.Tracer):
    """While tracing, record the context managers the model enters and leaves that switch grad mode
    (``torch.no_grad``, ``enable_grad``, ``set_grad_enabled``, ``inference_mode``, as ``with`` or decorator) or
    autocast (``torch.autocast``) as graph calls: fx would run them at trace time and record nothing. Each still
    switches at trace time too; the switches they make through one another (``no_grad`` calls
    ``set_grad_enabled``) are recorded once."""
    depth = [0]

    def recording(original, record):
        def method(self, *args):
            if depth[0]:
                return original(self, *args)
            depth[0] += 1
            try:
                result = original(self, *args)
                record(self, *args)
            finally:
                depth[0] -= 1
            return result
        return method

    def enter(function, mode_of, name):
        def record(manager, *args):
            # (autocast's arguments: its device, dtype and flags, as torch.amp._enter_autocast takes them)
            arguments = (mode_of(manager, *args),) if mode_of is not None else \
                (manager.device, manager.fast_dtype, manager._enabled, manager._cache_enabled)
            manager._invfx_switch = tracer.create_proxy("call_function", function, arguments, {}, name=name)
        return record

    def leave(function):
        def record(manager, *args):
            switch = getattr(manager, "_invfx_switch", None)
            if switch is not None:
                tracer.create_proxy("call_function", function, (switch,), {})
        return record

    patches = [
        (grad_mode.no_grad, "__enter__", enter(enter_grad_mode, lambda m: False, "no_grad")),
        (grad_mode.no_grad, "__exit__", leave(exit_grad_mode)),
        (grad_mode.enable_grad, "__enter__", enter(enter_grad_mode, lambda m: True, "enable_grad")),
        (grad_mode.enable_grad, "__exit__", leave(exit_grad_mode)),
        # set_grad_enabled switches when made (it works as a plain call too); leaving a ``with`` switches back
        (grad_mode.set_grad_enabled, "__init__", enter(enter_grad_mode, lambda m, mode: mode, "set_grad_enabled")),
        (grad_mode.set_grad_enabled, "__exit__", leave(exit_grad_mode)),
        (grad_mode.inference_mode, "__enter__", enter(grad_mode._enter_inference_mode, lambda m: m.mode,
                                                      "inference_mode")),
        (grad_mode.inference_mode, "__exit__", leave(grad_mode._exit_inference_mode)),
        (autocast, "__enter__", enter(torch.amp._enter_autocast, None, "autocast")),
        (autocast, "__exit__", leave(torch.amp._exit_autocast)),
    ]
    originals = [(cls, name, cls.__dict__[name]) for cls, name, _ in patches]
    try:
        for (cls, name, record), (_, _, original) in zip(patches, originals):
            setattr(cls, name, recording(original, record))
        yield
    finally:
        for cls, name, original in originals:
            setattr(cls, name, original)


# --- torch.is_tensor on proxies ----------------------------------------------------------------------------

TENSOR, TENSORS, OTHER = "tensor", "tensors", "other"  # what a proxy stands for; None: unknown

#: Tensor methods (and torch functions of the same name) that give no tensor: sizes, numbers, flags
_OTHER_CALLS = frozenset({
    "size", "dim", "ndimension", "numel", "nelement", "tolist", "item", "stride", "element_size", "is_contiguous",
    "is_floating_point", "is_complex", "is_nonzero", "data_ptr", "get_device", "storage_offset", "equal",
    "is_same_size", "has_names", "__len__", "__bool__", "__int__", "__float__", "__index__", "allclose",
    "is_tensor", "is_storage", "result_type", "can_cast", "promote_types"})
#: calls that give a tuple (or list) of tensors whatever their arguments
_TUPLE_CALLS = frozenset({
    "split", "chunk", "unbind", "tensor_split", "split_with_sizes", "unsafe_split", "unsafe_chunk", "hsplit",
    "vsplit", "dsplit", "sort", "topk", "kthvalue", "var_mean", "std_mean", "aminmax", "frexp", "cummax", "cummin",
    "slogdet", "qr", "svd", "eig", "eigh", "lu", "mode", "broadcast_tensors", "meshgrid", "lstsq", "lobpcg",
    "lu_factor", "geqrf", "histogram"})
#: calls that give a tuple when given a dimension (``x.max(1)``), else a tensor (``x.max()``, ``max(x, y)``)
_TUPLE_WITH_DIM = frozenset({"max", "min", "median", "nanmedian"})
#: calls that give a tuple when asked for more than the values (``return_inverse``, ``return_counts``)
_TUPLE_WITH_FLAGS = frozenset({"unique", "unique_consecutive"})
#: Tensor attributes that are not tensors
_OTHER_ATTRIBUTES = frozenset({
    "shape", "ndim", "dtype", "device", "layout", "is_cuda", "is_cpu", "is_meta", "is_sparse", "is_quantized",
    "is_leaf", "requires_grad", "names", "itemsize", "nbytes", "is_mkldnn", "is_nested", "output_nr", "_version"})
#: builtins and operators whose result is never a tensor
_OTHER_FUNCTIONS = frozenset({builtins.len, builtins.int, builtins.float, builtins.bool, builtins.str,
                              builtins.isinstance, builtins.hasattr, builtins.type, operator.not_, operator.is_,
                              operator.is_not, operator.contains, operator.truth})


def _attribute(root: nn.Module, target: str):
    """The parameter, buffer or plain attribute ``target`` names (``blocks.0.scale``), read past fx's patched
    ``Module.__getattr__``, which answers proxies while tracing; None if there is none."""
    *path, name = target.split(".")
    module = root
    for atom in path:
        module = module._modules.get(atom) if isinstance(module, nn.Module) else None
        if module is None:
            return None
    for store in (module._parameters, module._buffers, module.__dict__):
        if name in store:
            return store[name]
    return None


def _call_name(target) -> str | None:
    """A torch function's or Tensor method's name; None for anything else (a user's function, a builtin)."""
    if isinstance(target, str):
        return target
    module = getattr(target, "__module__", None) or ""
    if module == "torch" or module.startswith("torch.") or \
            getattr(target, "__self__", None) is torch._C._VariableFunctions:
        return getattr(target, "__name__", None)
    return None


def _module_kind(module: nn.Module) -> str | None:
    """What a leaf module's call gives: torch.nn's layers a tensor, but for those that return tuples."""
    if isinstance(module, (nn.RNNBase, nn.MultiheadAttention)):
        return None  # (a tuple, nested for an LSTM; attention's second item may be None)
    if getattr(module, "return_indices", False):  # max pools and unpools asked for their indices
        return TENSORS
    if type(module).__module__.startswith("torch.nn."):
        return TENSOR
    return None  # a user's leaf, an invfx.nn module, an opaque submodule: unknown


def proxy_kind(node: fx.Node, root: nn.Module, inputs: Sequence | None = None,
               cache: dict | None = None) -> str | None:
    """Whether the value ``node`` stands for while tracing is a tensor (TENSOR), a tuple or list of tensors
    (TENSORS) or something else (OTHER: a size, a number, a flag), from what made it; None where that cannot be
    told without running it (a user's leaf module, a user's function)."""
    cache = {} if cache is None else cache
    if node in cache:
        return cache[node]
    kind = _kind(node, root, inputs, cache)
    cache[node] = kind
    return kind


def _kind(node: fx.Node, root: nn.Module, inputs, cache) -> str | None:
    def of(value) -> str | None:
        if isinstance(value, fx.Node):
            return proxy_kind(value, root, inputs, cache)
        if isinstance(value, torch.Tensor):
            return TENSOR
        if isinstance(value, (tuple, list)) and value and all(of(v) == TENSOR for v in value):
            return TENSORS
        return OTHER

    if node.op == "placeholder":
        if inputs is None:
            return None
        index = [n for n in node.graph.nodes if n.op == "placeholder"].index(node)
        return of(inputs[index]) if index < len(inputs) else None
    if node.op == "get_attr":
        return TENSOR if isinstance(_attribute(root, str(node.target)), torch.Tensor) else None
    if node.op == "call_module":
        return _module_kind(root.get_submodule(node.target))
    target, args, kwargs = node.target, node.args, node.kwargs
    if node.op == "call_function":
        if target is getattr:
            base, name = args[0], args[1]
            if name in _OTHER_ATTRIBUTES:
                return OTHER
            return TENSOR if of(base) == TENSOR and name in ("T", "mT", "H", "mH", "data", "grad", "real",
                                                              "imag") else None
        if target is operator.getitem:
            container, index = of(args[0]), args[1]
            if container == TENSOR:
                return TENSOR
            if container == TENSORS:
                return TENSORS if isinstance(index, slice) else TENSOR
            return container  # (an item of a size is a number; unknown stays unknown)
        if target in _OTHER_FUNCTIONS:
            return OTHER
        if getattr(target, "__module__", None) in ("_operator", "operator"):  # arithmetic, comparisons
            kinds = [of(a) for a in (*args, *kwargs.values()) if isinstance(a, fx.Node)]
            if TENSOR in kinds:
                return TENSOR
            if kinds and all(k == OTHER for k in kinds):
                return OTHER
            if kinds and all(k == TENSORS for k in kinds) and target is operator.add:
                return TENSORS  # (tuple concatenation)
            return None
    name = _call_name(target)
    if name is None:
        return None
    if name in _OTHER_CALLS:
        return OTHER
    if name in _TUPLE_CALLS:
        return TENSORS
    if name in _TUPLE_WITH_DIM:
        tensor_args = sum(1 for a in args if of(a) == TENSOR)
        has_dim = "dim" in kwargs or len(args) > 1 and tensor_args == 1
        return TENSORS if has_dim else TENSOR
    if name in _TUPLE_WITH_FLAGS:
        flags = ("return_inverse", "return_counts")
        return TENSORS if any(kwargs.get(f) for f in flags) or len(args) > 2 else TENSOR
    return TENSOR  # (any other torch function or Tensor method gives a tensor)


@contextlib.contextmanager
def _answering_is_tensor(tracer: "InvfxTracer", inputs: Sequence | None):
    """``torch.is_tensor`` answers for proxies while tracing (see the module's docstring); where what a proxy
    stands for cannot be told, it raises, naming the value: an answer could trace the wrong branch."""
    original = torch.is_tensor
    cache: dict = {}

    def is_tensor(obj) -> bool:
        if not isinstance(obj, fx.Proxy):
            return original(obj)
        kind = proxy_kind(obj.node, tracer.root, inputs, cache)
        if kind is None:
            raise TraceError(f"torch.is_tensor({obj.node.name}): whether {_made_by(obj.node)} gives a tensor "
                             "cannot be told while tracing")
        return kind == TENSOR

    torch.is_tensor = is_tensor
    try:
        yield
    finally:
        torch.is_tensor = original


def _made_by(node: fx.Node) -> str:
    if node.op == "call_module":
        return f"module {node.target!r}"
    target = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", repr(node.target))
    return f"{target!r}"


@contextlib.contextmanager
def _refusing_traced_attributes():
    """A module that stores what its forward computes on itself (``self.w_perm = ...``, FrEIA's AllInOneBlock with
    ``learned_householder_permutation``) would keep fx's proxy there, and the traced graph would not record the
    store: tracing such a forward is refused (the module is kept as an opaque leaf, named in the plan), before
    anything is stored."""
    original = nn.Module.__setattr__

    def setattr_(module, name, value):
        if isinstance(value, fx.Proxy):
            raise TraceError(f"{type(module).__name__}.forward stores a value it computes as self.{name} (a "
                             "module attribute the traced graph cannot write)")
        original(module, name, value)

    nn.Module.__setattr__ = setattr_
    try:
        yield
    finally:
        nn.Module.__setattr__ = original


def _defaults_not_given(model: nn.Module, num_inputs: int | None) -> dict[str, object]:
    """The forward's parameters after the ``num_inputs`` given that have defaults: traced as those constants
    (``forward(x, mask=None)`` with only ``x``: ``x * mask`` would be traced as a product of two inputs and fail
    on the example). A parameter without a default that is not given is an error naming it."""
    if num_inputs is None:
        return {}
    parameters = [p for p in inspect.signature(model.forward).parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    missing = [p.name for p in parameters[num_inputs:] if p.default is p.empty]
    if missing:
        raise InvfxError(f"invfx.optimize: {type(model).__name__}.forward needs {', '.join(missing)}, which "
                         f"example_inputs ({num_inputs} given) does not hold; pass every argument without a default, "
                         "in order")
    return {p.name: p.default for p in parameters[num_inputs:]}


def trace(model: nn.Module, leaf_modules: Iterable[type | nn.Module] = (), num_inputs: int | None = None,
          inputs: Sequence | None = None) -> tuple[fx.GraphModule, dict[str, str], dict[str, object]]:
    """``model`` as a GraphModule sharing its parameters, the opaque submodules with the reasons, and the
    forward's parameters traced as constants (those with defaults after the ``num_inputs`` given). ``inputs``
    (the example inputs) tell ``torch.is_tensor`` which inputs are tensors; without them it cannot tell. A
    Hugging Face model (``transformers.PreTrainedModel``), which torch.fx cannot trace, is exported instead
    (``exported.py``; that needs ``inputs``)."""
    if inputs is not None and num_inputs is None:
        num_inputs = len(inputs)
    if not isinstance(model, nn.Module):
        raise TraceError(f"invfx.optimize needs an nn.Module, got {type(model).__name__}")
    if is_hugging_face_model(model) and inputs is not None:
        return _trace_hugging_face(model, tuple(leaf_modules), inputs)
    tracer = InvfxTracer(leaf_modules)
    attributes = set(vars(model))
    constants = _defaults_not_given(model, num_inputs)
    try:
        with _recording_mode_switches(tracer), _answering_is_tensor(tracer, inputs), _refusing_traced_attributes():
            graph = tracer.trace(model, concrete_args=constants or None)
        module = fx.GraphModule(tracer.root, graph, type(model).__name__)
    except Exception as error:  # noqa: BLE001
        raise TraceError(f"{type(model).__name__} (the root module) cannot be traced by torch.fx: "
                         f"{type(error).__name__}: {first_line(error)}") from error
    finally:
        # fx stores a tensor made in forward (``torch.tensor(2.0)``) on the model as ``_tensor_constant0``: the
        # GraphModule has its own reference; the model is left as it was
        for name in set(vars(model)) - attributes:
            if name.startswith("_tensor_constant"):
                delattr(model, name)
    if constants:
        _guards_first(module.graph)
        module.recompile()
    return module, dict(tracer.opaque), constants


def _trace_hugging_face(model: nn.Module, leaf_modules: tuple, example_inputs: Sequence[object]
                        ) -> tuple[fx.GraphModule, dict[str, str], dict[str, object]]:
    """A ``PreTrainedModel`` through torch.export, its forward's first ``len(example_inputs)`` parameters given
    (optimize puts a dict example in that order)."""
    if leaf_modules:
        raise InvfxError(f"invfx.optimize: leaf_modules cannot be kept whole in {type(model).__name__}: a Hugging "
                         "Face model is traced by torch.export, which records the ops inside every module")
    constants = _defaults_not_given(model, len(example_inputs))
    parameters = [p.name for p in inspect.signature(model.forward).parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    return trace_exported(model, parameters[:len(example_inputs)], example_inputs), {}, constants


def _guards_first(graph: fx.Graph) -> None:
    """fx checks at each call that a parameter traced as a constant still has that value (``_assert_is_none``,
    ``torch._assert(mask_1 == 2.0)``), between the placeholders. Every placeholder goes first, then the checks
    (each marked ``invfx_guard``: no region holds one), then the model's nodes."""
    nodes = list(graph.nodes)
    guards = [n for n in nodes if n.op == "call_function" and n.target in (_assert_is_none, torch._assert)]
    pending = list(guards)
    while pending:  # (and what computes their conditions: ``mask_1 == 2.0``)
        node = pending.pop()
        node.meta["invfx_guard"] = True
        pending.extend(a for a in node.all_input_nodes if a.op != "placeholder" and "invfx_guard" not in a.meta)
    placeholders = [n for n in nodes if n.op == "placeholder"]
    anchor = next(n for n in nodes if n.op != "placeholder" and "invfx_guard" not in n.meta)
    for node in placeholders + [n for n in nodes if "invfx_guard" in n.meta]:
        anchor.prepend(node)
    graph.lint()

