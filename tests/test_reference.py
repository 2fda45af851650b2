"""The operations reference in docs/protocol.md is generated from the code and must match it."""

from __future__ import annotations

from pathlib import Path

import pytest

from services import reference

DOC = Path(__file__).resolve().parent.parent / "docs" / "protocol.md"
REGENERATE = "python -m services.reference --write docs/protocol.md"


@pytest.fixture(scope="module")
def actual() -> dict:
    return reference.actual_operations()


def test_every_answered_operation_is_declared_and_every_declared_one_is_answered(actual: dict) -> None:
    assert reference.drift(actual) == [], "declare the operation in services/reference.py"


def test_the_protocol_document_holds_the_current_operations_reference(actual: dict) -> None:
    text = DOC.read_text()
    assert reference.render_into(text, reference.markdown(actual)) == text, f"run `{REGENERATE}`"


def test_the_reference_names_each_argument_with_its_msgpack_types(actual: dict) -> None:
    tables = reference.markdown(actual)
    row = next(line for line in tables.splitlines() if line.startswith("| `lookup` "))
    assert "`key` str or bin, **required**" in row and '`keyspace` str, default "default"' in row
    assert "`no_such_keyspace`" in row


def test_a_changed_argument_changes_the_reference(actual: dict) -> None:
    changed = {**actual, "sharding": dict(actual["sharding"])}
    changed["sharding"]["lookup"] = actual["sharding"]["map"]
    assert reference.markdown(changed) != reference.markdown(actual)


def test_an_undeclared_operation_is_reported(actual: dict) -> None:
    extra = {**actual, "balancer": {**actual["balancer"], "brand_new": actual["balancer"]["stats"]}}
    assert reference.drift(extra) == ["balancer.brand_new is answered but not declared"]
