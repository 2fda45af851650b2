"""What an operation takes on the wire, read from its handler's signature.

A service handler's parameters are its wire arguments: the name is the key in
``args``, the type hint says which msgpack types it accepts, a default makes it
optional. :func:`params_of` turns a handler into that description once, and
:func:`check_args` checks a request against it before the handler runs, so
every service refuses a missing, unknown or wrongly typed argument the same
way, in words any language can read:

* an unknown or missing argument is ``bad_request`` with ``details.arg``;
* a value of the wrong msgpack type is ``bad_request`` with ``details.arg``,
  ``details.expected`` (the msgpack types it accepts) and ``details.type`` (the
  msgpack type it got: ``nil``, ``bool``, ``int``, ``float``, ``str``, ``bin``,
  ``array``, ``map``);
* ``nil`` for an optional argument means "the default".

Only the outer type is checked here (``array``, not what the array holds); the
service checks the contents. The operations reference in ``docs/protocol.md``
is generated from the same description, so the two cannot disagree.
"""

from __future__ import annotations

import inspect
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from phantom_bus.errors import BadRequest
from phantom_bus.protocol import wire_type

_NO_DEFAULT: Any = inspect.Parameter.empty

# Python type -> (msgpack type names, Python types isinstance accepts).
_SIMPLE: dict[Any, tuple[tuple[str, ...], tuple[type, ...]]] = {
    str: (("str",), (str,)),
    bytes: (("bin",), (bytes,)),
    bool: (("bool",), (bool,)),
    int: (("int",), (int,)),
    float: (("float", "int"), (float, int)),
    type(None): (("nil",), (type(None),)),
    dict: (("map",), (dict,)),
    list: (("array",), (list, tuple)),
}


@dataclass(frozen=True, slots=True)
class Param:
    """One wire argument of an operation."""

    name: str
    #: msgpack type names accepted, in order; empty means any type.
    types: tuple[str, ...]
    required: bool
    default: Any
    _accept: tuple[type, ...]
    _no_bool: bool

    def accepts(self, value: Any) -> bool:
        """True if ``value`` (as decoded from msgpack) has a type this argument takes."""
        if not self._accept:
            return True
        if self._no_bool and value.__class__ is bool:
            return False
        return isinstance(value, self._accept)


class OpSpec:
    """The wire arguments of one operation; ``open`` if it takes any further keys."""

    __slots__ = ("by_name", "open", "params", "required")

    def __init__(self, params: tuple[Param, ...], open: bool = False) -> None:
        self.params = params
        self.open = open
        self.by_name = {p.name: p for p in params}
        self.required = tuple(p.name for p in params if p.required)

    def param(self, name: str) -> Param | None:
        """The argument called ``name``, or None."""
        return self.by_name.get(name)


def _wire(hint: Any) -> tuple[tuple[str, ...], tuple[type, ...]] | None:
    """msgpack names and Python types for a type hint; None means "any"."""
    if hint is Any or hint is inspect.Parameter.empty:
        return None
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        names: list[str] = []
        accept: list[type] = []
        for arm in typing.get_args(hint):
            sub = _wire(arm)
            if sub is None:
                return None
            names += [n for n in sub[0] if n not in names]
            accept += [t for t in sub[1] if t not in accept]
        return tuple(names), tuple(accept)
    base = origin if origin is not None else hint
    if base in _SIMPLE:
        return _SIMPLE[base]
    if isinstance(base, type) and issubclass(base, Mapping):
        return _SIMPLE[dict]
    if isinstance(base, type) and issubclass(base, Sequence) and not issubclass(base, str | bytes):
        return _SIMPLE[list]
    return None


def params_of(fn: Callable[..., Any]) -> OpSpec:
    """The wire arguments of handler ``fn`` (its keyword-passable parameters)."""
    sig = inspect.signature(fn)
    try:
        hints = typing.get_type_hints(fn)
    except Exception:  # an unresolvable hint: check names only
        hints = {}
    params: list[Param] = []
    open_ = False
    for p in sig.parameters.values():
        if p.kind is inspect.Parameter.VAR_KEYWORD:
            open_ = True
            continue
        if p.kind in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.POSITIONAL_ONLY):
            continue
        wire = _wire(hints.get(p.name, Any))
        names, accept = wire if wire is not None else ((), ())
        if p.default is None and names and "nil" not in names:
            names, accept = (*names, "nil"), (*accept, type(None))
        no_bool = bool(accept) and "bool" not in names
        params.append(Param(p.name, names, p.default is _NO_DEFAULT, p.default, accept, no_bool))
    return OpSpec(tuple(params), open_)


def check_args(label: str, spec: OpSpec, args: dict[str, Any]) -> dict[str, Any]:
    """The arguments to call the handler with, or BadRequest saying what is wrong.

    ``label`` names the operation in messages (``sharding.lookup``). A nil
    value for an optional argument that does not take nil is dropped, so the
    handler sees its default.
    """
    out = args
    by_name = spec.by_name
    # On every request's path: the common case (all fine) costs one dict lookup
    # and one isinstance per argument.
    for name, value in args.items():
        p = by_name.get(name)
        if p is None:
            if spec.open:
                continue
            takes = ", ".join(q.name for q in spec.params) or "no arguments"
            raise BadRequest(f"{label} has no argument '{name}'; it takes {takes}", arg=name)
        accept = p._accept
        if not accept or (isinstance(value, accept) and not (p._no_bool and value.__class__ is bool)):
            continue
        if value is None and not p.required:
            if out is args:
                out = dict(args)
            del out[name]
            continue
        got = wire_type(value)
        want = " or ".join(p.types)
        raise BadRequest(
            f"{label}: argument '{name}' must be {want}, got {got}",
            arg=name,
            expected=list(p.types),
            type=got,
        )
    for name in spec.required:
        if name not in args:
            p = by_name[name]
            raise BadRequest(f"{label} needs the argument '{name}' ({' or '.join(p.types) or 'any'})", arg=name)
    return out
