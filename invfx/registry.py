"""The registry of known inverses: which calls can be undone, under what conditions, at what cost and risk.

A rule belongs to a forward target (a torch function, a Tensor method name, an ``operator`` function or an
``nn.Module`` type). For a call ``y = op(args)`` it recovers one argument (``solves``) from ``y`` and the
arguments it names as known. The fx pass asks :func:`rules_for` and evaluates :meth:`InverseRule.condition`
on the call; eager code and tests do the same with :meth:`OpCall.of`.

An inverse is an ordinary function whose arguments are the output, then the known arguments it needs (``bind``),
so that a rewritten graph can call it and print as readable code, e.g.
``x = invfx.inverses.arithmetic.add_solve_input(y, b, alpha=2)``. Rules sit beside the forward they invert, in
``invfx/inverses/``; users add their own with :func:`register_inverse`.
"""

from __future__ import annotations

import ast
import enum
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .errors import InverseError

__all__ = ["Risk", "OpCall", "InverseRule", "register_inverse", "rules_for", "find_rule", "all_rules", "snapshot",
           "restore",
           "provably_nonzero", "Param", "numel"]


class Risk(enum.Enum):
    """How much an inverse can amplify rounding errors."""

    EXACT = "exact"  # a permutation of values or an exact float identity ((a + b) - b == a for the same b)
    WELL_CONDITIONED = "well-conditioned"  # bounded amplification (division by a fixed non-zero constant)
    MAY_BLOW_UP = "may-blow-up"  # unbounded: division by data, atanh near +-1, a solve with a bad matrix

    def __str__(self) -> str:
        return self.value


class _Missing:
    def __repr__(self) -> str:
        return "MISSING"


MISSING = _Missing()


@dataclass(frozen=True)
class Param:
    """One parameter of a forward's signature: its name, and its default (MISSING: required)."""

    name: str
    default: Any = MISSING
    keyword_only: bool = False
    varargs: bool = False


def signature(*spec: str) -> tuple[Param, ...]:
    """A forward signature from strings: ``"input"``, ``"alpha=1"``, ``"*"`` (the rest are keyword-only),
    ``"*dims"`` (the remaining positional arguments as one tuple, as ``x.permute(0, 2, 1)`` passes them)."""
    params, keyword_only = [], False
    for item in spec:
        if item == "*":
            keyword_only = True
            continue
        if item.startswith("*"):
            params.append(Param(item[1:], MISSING, False, varargs=True))
            continue
        name, _, default = item.partition("=")
        params.append(Param(name, ast.literal_eval(default) if default else MISSING, keyword_only))
    return tuple(params)


class OpCall:
    """One call ``out = target(*args, **kwargs)``, seen by a rule's condition and bind.

    Argument values are whatever the caller has: tensors and constants in eager code, fx ``Node`` objects and
    constants in the fx pass. ``meta(name)`` gives ``(shape, dtype)`` of a tensor argument, ``producer(name)``
    the target of the call that produced it (None when unknown), ``module`` the module of a module call.
    """

    def __init__(self, target, bound: dict[str, Any], *, module: nn.Module | None = None,
                 out_meta: tuple | None = None, metas: dict[str, tuple] | None = None,
                 producers: dict[str, Any] | None = None, nonzero: Iterable[str] = ()):
        self.target = target
        self.bound = bound
        self.module = module
        self.out_meta = out_meta
        self._metas = metas or {}
        self._producers = producers or {}
        self._nonzero = frozenset(nonzero)  # tensor arguments the graph proves non-zero (0.1 * softplus(a))

    @classmethod
    def of(cls, target, args: Sequence = (), kwargs: dict | None = None, *, module: nn.Module | None = None,
           out=None, producers: dict[str, Any] | None = None, params: Sequence[Param] | None = None) -> "OpCall":
        """An eager call: tensors and constants. ``params`` defaults to the signature of target's rules."""
        if params is None:
            params = _signature_for(target)
        bound = bind_arguments(params, args, kwargs or {}, target)
        metas = {k: _meta(v) for k, v in bound.items() if _meta(v) is not None}
        return cls(target, bound, module=module, out_meta=_meta(out), metas=metas, producers=producers)

    def arg(self, name: str) -> Any:
        return self.bound[name]

    def meta(self, name: str) -> tuple | None:
        return self._metas.get(name)

    def shape(self, name: str) -> tuple[int, ...] | None:
        meta = self._metas.get(name)
        return None if meta is None else tuple(meta[0])

    def producer(self, name: str) -> Any:
        return self._producers.get(name)

    def proven_nonzero(self, name: str) -> bool:
        """Whether the graph proves tensor argument ``name`` non-zero through more than its producer (a non-zero
        number times the output of exp, sigmoid or softplus: see ``invfx.passes.solve``)."""
        return name in self._nonzero

    def __repr__(self) -> str:
        what = type(self.module).__name__ if self.module is not None else _target_name(self.target)
        return f"OpCall({what})"


def _meta(value) -> tuple | None:
    if isinstance(value, torch.Tensor):
        return (tuple(value.shape), value.dtype)
    if isinstance(value, (tuple, list)) and value and all(isinstance(v, torch.Tensor) for v in value):
        return ([tuple(v.shape) for v in value], value[0].dtype)
    return None


def bind_arguments(params: Sequence[Param], args: Sequence, kwargs: dict, target=None) -> dict[str, Any]:
    """Match a call's arguments to a signature: every parameter gets a value (its default if not given)."""
    bound: dict[str, Any] = {}
    positional = [p for p in params if not p.keyword_only]
    if positional and positional[-1].varargs:
        head = len(positional) - 1
        rest = tuple(args[head:])
        if len(rest) == 1 and isinstance(rest[0], (tuple, list, torch.Size)):
            rest = tuple(rest[0])  # x.permute((0, 2, 1)) and x.permute(0, 2, 1) alike
        if rest or positional[-1].name not in kwargs:
            args = (*args[:head], rest)
    if len(args) > len(positional):
        raise InverseError(f"{_target_name(target)}: {len(args)} positional arguments for {len(positional)}")
    for param, value in zip(positional, args):
        bound[param.name] = value
    for name, value in kwargs.items():
        if name in bound or name not in {p.name for p in params}:
            raise InverseError(f"{_target_name(target)}: unexpected or repeated argument {name!r}")
        bound[name] = value
    for param in params:
        if param.name not in bound:
            if param.default is MISSING:
                raise InverseError(f"{_target_name(target)}: missing argument {param.name!r}")
            bound[param.name] = param.default
    return bound


def _target_name(target) -> str:
    if isinstance(target, str):
        return f"Tensor.{target}"
    if isinstance(target, type):
        return target.__name__
    module = getattr(target, "__module__", None) or ""
    name = getattr(target, "__name__", repr(target))
    return f"{module}.{name}" if module in ("operator", "torch") or module.startswith("torch.") else name


def numel(shape) -> int:
    return math.prod(shape) if shape is not None else 0


@dataclass(frozen=True)
class InverseRule:
    """How to undo one target: ``inverse(out, *extras, *args, **kwargs)`` with ``args, kwargs = bind(call)``
    recovers argument ``solves`` (a module rule takes the module first: ``inverse(module, out, ...)``).

    ``needs``: the tensor arguments that must be known (the solver provides them), ``condition(call)``: None
    when the call is invertible, else the reason it is not; ``cost(call)``: FLOPs of one inverse;
    ``risk``: how rounding errors can grow; ``extra_outputs``: for rules whose inverse needs values the
    forward does not return (batch statistics), a function computing ``(out, *extras)`` in place of the forward.
    """

    target: Any
    solves: str
    inverse: Callable[..., Any]
    bind: Callable[[OpCall], tuple[tuple, dict]]
    params: tuple[Param, ...] = ()
    needs: tuple[str, ...] = ()
    condition: Callable[[OpCall], str | None] = lambda call: None
    cost: Callable[[OpCall], float] = lambda call: 0.0
    risk: Risk = Risk.EXACT
    extra_outputs: Callable[..., tuple] | None = None
    module: bool = False
    name: str = ""

    def why_not(self, call: OpCall) -> str | None:
        """None when this rule applies to ``call``, else the reason (recorded in plans)."""
        try:
            return self.condition(call)
        except Exception as error:  # noqa: BLE001 - a condition that cannot decide refuses
            return f"condition of {self.name} could not be checked: {error}"

    def apply(self, call: OpCall, out, extras: Sequence = ()):
        """Evaluate the inverse eagerly on ``call`` (its known arguments as values) and the output ``out``."""
        args, kwargs = self.bind(call)
        head = (call.module,) if self.module else ()
        return self.inverse(*head, out, *extras, *args, **kwargs)

    def __repr__(self) -> str:
        return f"InverseRule({self.name}: {_target_name(self.target)} -> {self.solves}, {self.risk})"


_RULES: dict[Any, list[InverseRule]] = {}
_SIGNATURES: dict[Any, tuple[Param, ...]] = {}


def _key(target):
    return target


def _signature_for(target) -> tuple[Param, ...]:
    if isinstance(target, type):
        for klass in target.__mro__:
            if klass in _SIGNATURES:
                return _SIGNATURES[klass]
        return signature("input")
    if target in _SIGNATURES:
        return _SIGNATURES[target]
    raise InverseError(f"no inverse registered for {_target_name(target)}")


def rules_for(target) -> list[InverseRule]:
    """Rules registered for ``target``; for a module type, those of its closest registered base class."""
    if isinstance(target, type) and issubclass(target, nn.Module):
        for klass in target.__mro__:
            if klass in _RULES:
                return list(_RULES[klass])
        return []
    try:
        return list(_RULES.get(_key(target), ()))
    except TypeError:  # unhashable target
        return []


def find_rule(call: OpCall, solves: str, known: Iterable[str] = ()) -> tuple[InverseRule | None, list[str]]:
    """The first rule for ``call.target`` (or its module's type) that recovers ``solves`` with only ``known``
    arguments known and whose condition holds; else None and every reason a rule gave."""
    known = set(known)
    target = type(call.module) if call.module is not None else call.target
    reasons = []
    for rule in rules_for(target):
        if rule.solves != solves:
            continue
        missing = [n for n in rule.needs if n not in known]
        if missing:
            reasons.append(f"{rule.name}: needs {', '.join(missing)} known")
            continue
        reason = rule.why_not(call)
        if reason is None:
            return rule, reasons
        reasons.append(f"{rule.name}: {reason}")
    if not reasons:
        reasons.append(f"no rule recovers {solves!r} of {_target_name(target)}")
    return None, reasons


def all_rules() -> list[InverseRule]:
    return [rule for rules in _RULES.values() for rule in rules]


def snapshot() -> tuple[dict, dict]:
    """The registry's state, for :func:`restore` (tests that register rules put it back after)."""
    return {k: list(v) for k, v in _RULES.items()}, dict(_SIGNATURES)


def restore(state: tuple[dict, dict]) -> None:
    rules, signatures = state
    _RULES.clear()
    _RULES.update({k: list(v) for k, v in rules.items()})
    _SIGNATURES.clear()
    _SIGNATURES.update(signatures)


def writes_into(write):
    """Attach ``write(buffer, *args, **kwargs)`` to an inverse: the inverse computed straight into ``buffer``, the
    freed storage of the input it rebuilds (no temporary, no copy back), or None where it cannot (the inverse
    then runs as usual). The fused replay uses it for the step that makes a freed input. ``write`` must check
    that the result has ``buffer``'s shape, dtype and device: ``out=`` would resize or cast the buffer."""
    def attach(inverse):
        inverse.into = write
        return inverse
    return attach


def register_inverse(*targets, solves: str = "input", params: Sequence[str] | None = None,
                     args: Sequence[str] = (), bind: Callable[[OpCall], tuple[tuple, dict]] | None = None,
                     needs: Sequence[str] | None = None, condition: Callable[[OpCall], str | None] | None = None,
                     cost: Callable[[OpCall], float] | float | None = None, risk: Risk | str = Risk.EXACT,
                     extra_outputs: Callable[..., tuple] | None = None, module: bool = False):
    """Decorator: register ``inverse`` as the way to recover argument ``solves`` of every target.

    ``params``: the forward's signature as strings (``("input", "other", "*", "alpha=1")``), shared by all
    targets; defaults to ``("input",)`` (or what an earlier rule registered for the target). ``args``: names of
    the forward's arguments passed after the output, in order (tensors among them are ``needs`` unless
    ``needs`` says otherwise); or ``bind(call) -> (args, kwargs)`` for anything derived. ``module=True``: the
    targets are module types and the inverse takes the module first: ``inverse(module, out, ...)``. A rule
    registered for an op that already has built-in rules is tried before them (it overrides them).

    ::

        @invfx.register_inverse(torch.sinh, risk="well-conditioned", cost=lambda call: 4 * numel(call.out_meta[0]))
        def sinh_inverse(out):
            return torch.asinh(out)
    """
    risk = Risk(risk) if isinstance(risk, str) else risk
    if cost is None:
        cost_fn = _elementwise_cost(1)
    elif callable(cost):
        cost_fn = cost
    else:
        cost_fn = lambda call, _c=float(cost): _c  # noqa: E731

    unique = []
    for target in targets:  # F.pixel_shuffle is torch.pixel_shuffle: register each object once
        if not any(target is t for t in unique):
            unique.append(target)

    def decorate(inverse):
        for target in unique:
            if params is not None:
                sig = signature(*params)
            else:
                try:
                    sig = _signature_for(target)
                except InverseError:
                    sig = signature("input")
            _SIGNATURES.setdefault(target, sig)
            binder = bind or (lambda call, _names=tuple(args): (tuple(call.arg(n) for n in _names), {}))
            rule = InverseRule(
                target=target, solves=solves, inverse=inverse, bind=binder, params=sig, module=module,
                needs=tuple(needs) if needs is not None else tuple(a for a in args if a != solves),
                condition=condition or (lambda call: None), cost=cost_fn, risk=risk,
                extra_outputs=extra_outputs, name=inverse.__name__)
            rules = _RULES.setdefault(_key(target), [])
            if _is_builtin(rule):
                rules.append(rule)
            else:  # a user's rule is tried before the built-in ones: registering one for a known op overrides
                rules.insert(next((i for i, r in enumerate(rules) if _is_builtin(r)), len(rules)), rule)
        return inverse

    return decorate


def _is_builtin(rule: InverseRule) -> bool:
    return getattr(rule.inverse, "__module__", "").startswith("invfx.inverses.")


def _elementwise_cost(flops_per_element: float):
    def cost(call: OpCall) -> float:
        shape = call.out_meta[0] if call.out_meta else None
        if shape and isinstance(shape, list):  # a tuple output
            return flops_per_element * sum(numel(s) for s in shape)
        return flops_per_element * numel(shape)
    return cost


# ----------------------------------------------------------------------------------------------------------
# facts the conditions need

#: producers whose output is never zero (in exact arithmetic; float underflow is the risk class's business)
NONZERO_PRODUCERS: set[Any] = {torch.exp, "exp", torch.sigmoid, "sigmoid", torch.nn.functional.softplus,
                               torch.special.expit, torch.nn.Softplus, torch.nn.Sigmoid}


def provably_nonzero(call: OpCall, name: str) -> str | None:
    """None when argument ``name`` is provably non-zero: a non-zero number, a tensor made by a producer that
    cannot give zero (exp, sigmoid, softplus), or one the graph proves non-zero (``0.1 * softplus(a)``,
    ``-exp(s)``); else why not."""
    value = call.arg(name)
    if isinstance(value, bool):
        return f"{name} is a boolean"
    if isinstance(value, (int, float)):
        return None if value != 0 and math.isfinite(value) else f"{name} is {value}"
    if call.proven_nonzero(name):
        return None
    producer = call.producer(name)
    if producer is not None and (producer in NONZERO_PRODUCERS or
                                 (isinstance(producer, type) and issubclass(producer, (nn.Sigmoid, nn.Softplus)))):
        return None
    return f"{name} may be zero (not a non-zero constant nor made of the outputs of exp/sigmoid/softplus)"
