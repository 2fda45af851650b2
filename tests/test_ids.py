"""The one node-id rule."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from phantom_bus.errors import BadRequest
from phantom_bus.ids import MAX_NODE_ID, check_node_id, is_node_id


@pytest.mark.parametrize("good", ["node-1", "n", "7", "db7.rack3", "10.0.0.7:5432", "a_b", "x" * MAX_NODE_ID])
def test_ordinary_ids_pass_unchanged(good: str) -> None:
    assert check_node_id(good) == good


@pytest.mark.parametrize(
    ("bad", "says"),
    [
        ("", "empty"),
        ("node#1", "'#' is not allowed"),
        ("node\n", "'\\n' is not allowed"),
        ("node 1", "' ' is not allowed"),
        ("a/b", "'/' is not allowed"),
        ("-rf", "start with a letter or a digit"),
        (".hidden", "start with a letter or a digit"),
        ("nöde", "'ö' is not allowed"),
        ("x" * (MAX_NODE_ID + 1), "more than 128"),
        (42, "expected a string"),
        (None, "expected a string"),
    ],
)
def test_bad_ids_are_refused_with_the_reason(bad: object, says: str) -> None:
    with pytest.raises(BadRequest) as err:
        check_node_id(bad, what="agent node id")
    assert says in str(err.value) and "agent node id" in str(err.value)


@given(st.text(max_size=140))
def test_the_rule_and_the_check_agree(text: str) -> None:
    if is_node_id(text):
        assert check_node_id(text) == text
        assert text.strip() == text and "\n" not in text and len(text) <= MAX_NODE_ID
    else:
        with pytest.raises(BadRequest):
            check_node_id(text)
