"""Wire arguments read from handler signatures, and the checks made with them."""

from __future__ import annotations

from typing import Any

import pytest

from phantom_bus.errors import BadRequest
from phantom_bus.opspec import check_args, params_of
from phantom_bus.protocol import wire_type


def handler(
    key: str | bytes,
    keyspace: str = "default",
    count: int | None = None,
    weight: float = 1.0,
    flag: bool = False,
    rates: dict[str, float] | None = None,
    keys: list[str] | None = None,
    anything: Any = None,
) -> None:
    """A handler with one argument of each kind."""


SPEC = params_of(handler)


def refusal(args: dict[str, Any]) -> dict[str, Any]:
    with pytest.raises(BadRequest) as info:
        check_args("svc.op", SPEC, args)
    return {"message": info.value.message, **info.value.details}


def test_types_are_msgpack_names() -> None:
    types = {p.name: p.types for p in SPEC.params}
    assert types["key"] == ("str", "bin")
    assert types["count"] == ("int", "nil")
    assert types["weight"] == ("float", "int")
    assert types["rates"] == ("map", "nil") and types["keys"] == ("array", "nil")
    assert types["anything"] == ()
    assert [p.name for p in SPEC.params if p.required] == ["key"]


@pytest.mark.parametrize(
    ("value", "name"),
    [(None, "nil"), (True, "bool"), (3, "int"), (1.5, "float"), ("x", "str"), (b"x", "bin"),
     ([1], "array"), ({"a": 1}, "map")],
)  # fmt: skip
def test_wire_type_names_every_msgpack_type(value: Any, name: str) -> None:
    assert wire_type(value) == name


def test_a_wrong_type_names_argument_expected_and_got() -> None:
    got = refusal({"key": "k", "keyspace": 5})
    assert (got["arg"], got["expected"], got["type"]) == ("keyspace", ["str"], "int")
    assert got["message"] == "svc.op: argument 'keyspace' must be str, got int"


def test_bool_is_not_an_int_and_int_is_a_float() -> None:
    assert refusal({"key": "k", "count": True})["type"] == "bool"
    assert check_args("svc.op", SPEC, {"key": "k", "weight": 2}) == {"key": "k", "weight": 2}
    assert refusal({"key": "k", "flag": 1})["type"] == "int"


def test_nil_for_an_optional_argument_means_its_default() -> None:
    assert check_args("svc.op", SPEC, {"key": "k", "keyspace": None}) == {"key": "k"}
    assert refusal({"key": None})["arg"] == "key"


def test_unknown_and_missing_arguments_are_named() -> None:
    assert refusal({"key": "k", "kye": 1})["arg"] == "kye"
    missing = refusal({"keyspace": "x"})
    assert missing["arg"] == "key" and "needs the argument 'key'" in missing["message"]


def test_any_accepts_every_type_and_inner_types_are_left_to_the_service() -> None:
    assert check_args("svc.op", SPEC, {"key": b"k", "anything": [{"x": None}], "keys": [1, 2]})
