"""The agent's incarnation grows on every start, even when its file is lost."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from phantom_bus.errors import BadRequest
from services.agent.incarnation import (
    incarnation_path,
    next_incarnation,
    persist_incarnation,
    read_incarnation,
)

T0 = 1_732_600_000_000  # a wall clock in ms


def test_first_start_uses_the_clock_and_records_it(tmp_path: Path) -> None:
    assert next_incarnation(tmp_path, "node-1", T0) == T0
    assert read_incarnation(tmp_path, "node-1") == T0
    assert incarnation_path(tmp_path, "node-1").read_text() == f"{T0}\n"


def test_every_restart_gets_a_higher_number(tmp_path: Path) -> None:
    values = [next_incarnation(tmp_path, "node-1", T0 + 1000 * i) for i in range(5)]
    assert values == sorted(set(values))


def test_restart_within_one_millisecond_still_grows(tmp_path: Path) -> None:
    first = next_incarnation(tmp_path, "node-1", T0)
    assert next_incarnation(tmp_path, "node-1", T0) == first + 1


def test_clock_going_backwards_does_not_reuse_a_number(tmp_path: Path) -> None:
    first = next_incarnation(tmp_path, "node-1", T0)
    assert next_incarnation(tmp_path, "node-1", T0 - 3_600_000) == first + 1


def test_lost_file_falls_back_to_the_clock_which_is_still_higher(tmp_path: Path) -> None:
    first = next_incarnation(tmp_path, "node-1", T0)
    incarnation_path(tmp_path, "node-1").unlink()
    assert next_incarnation(tmp_path, "node-1", T0 + 5) > first


@pytest.mark.parametrize("content", ["", "garbage", "-5", "12.5", "9" * 30, "\xff"])
def test_corrupt_file_is_treated_as_missing(tmp_path: Path, content: str) -> None:
    path = incarnation_path(tmp_path, "node-1")
    path.parent.mkdir(parents=True)
    path.write_bytes(content.encode("latin-1"))
    assert next_incarnation(tmp_path, "node-1", T0) == T0
    assert read_incarnation(tmp_path, "node-1") == T0


def test_each_node_id_has_its_own_file(tmp_path: Path) -> None:
    next_incarnation(tmp_path, "node-1", T0 + 100)
    assert next_incarnation(tmp_path, "node-2", T0) == T0
    assert incarnation_path(tmp_path, "a:b").name == "a%3Ab.incarnation"
    assert next_incarnation(tmp_path, "a:b", T0) == T0


def test_write_leaves_no_temporary_files(tmp_path: Path) -> None:
    for i in range(3):
        next_incarnation(tmp_path, "node-1", T0 + i)
    assert os.listdir(incarnation_path(tmp_path, "node-1").parent) == ["node-1.incarnation"]


def test_unwritable_directory_is_an_error_not_a_silent_reuse(tmp_path: Path) -> None:
    blocker = tmp_path / "data"
    blocker.write_text("a file where the data directory should be")
    with pytest.raises(OSError):
        next_incarnation(blocker, "node-1", T0)


@pytest.mark.parametrize("node_id", ["", "../etc", "a/b", "x" * 129])
def test_invalid_node_id_is_refused(tmp_path: Path, node_id: str) -> None:
    with pytest.raises(BadRequest):
        next_incarnation(tmp_path, node_id, T0)


def test_runtime_refutation_is_kept_for_the_next_start(tmp_path: Path) -> None:
    first = next_incarnation(tmp_path, "node-1", T0)
    persist_incarnation(tmp_path, "node-1", first + 50)
    persist_incarnation(tmp_path, "node-1", first + 10)  # lower: ignored
    assert read_incarnation(tmp_path, "node-1") == first + 50
    assert next_incarnation(tmp_path, "node-1", T0 + 20) == first + 51


# -- what the agent does with membership's acks ---------------------------------------------------------


@pytest.mark.parametrize(
    ("ack", "expected"),
    [
        # Whatever the path, one past the higher of ours and membership's, at once.
        ({"code": "stale_incarnation", "incarnation": T0 + 10**7, "refute": True}, T0 + 10**7 + 1),
        ({"code": "declared_dead", "incarnation": T0 + 10**7, "refute": True}, T0 + 10**7 + 1),
        ({"code": "ok", "incarnation": T0, "refute": True, "suspected": True}, T0 + 1),
        ({"code": "declared_dead", "incarnation": T0, "refute": True}, T0 + 1),
        ({"code": "has_left", "incarnation": T0}, T0 + 1),
        # Nothing to refute.
        ({"code": "ok", "incarnation": T0, "refute": False}, None),
        ({"code": "duplicate", "incarnation": T0}, None),
        ({"code": "unknown_node", "incarnation": None}, None),
        ({"code": "incarnation_ahead", "incarnation": T0 - 5}, None),
        ({"ok": False, "error": {"code": "bad_request"}}, None),
        # A garbled number is not followed.
        ({"code": "stale_incarnation", "incarnation": True}, T0 + 1),
        ({"code": "stale_incarnation", "incarnation": 2**63 - 1}, None),
    ],
)
def test_refutation_jumps_past_what_membership_holds(ack: dict[str, object], expected: int | None) -> None:
    from services.agent.incarnation import refutation

    assert refutation(T0, ack) == expected
