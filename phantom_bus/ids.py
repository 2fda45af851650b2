"""The one rule for node ids (and other names that become keys, log fields and file names).

A node id is 1 to 128 characters of ``A-Z a-z 0-9 . _ : -`` starting with a
letter or a digit: ``node-1``, ``db7.rack3``, ``10.0.0.7:5432``. Such an id is
safe as a store key segment, a file name, a log field and a shell word, and
cannot be mistaken for an option (``-x``) or a hidden file (``.x``).
Whitespace, newlines, ``/``, ``#`` and every other character are refused.
"""

from __future__ import annotations

import re
from typing import Any

from phantom_bus.errors import BadRequest

MAX_NODE_ID = 128
_NODE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")


def is_node_id(value: Any) -> bool:
    """Whether ``value`` follows the node-id rule."""
    return isinstance(value, str) and _NODE_ID.fullmatch(value) is not None


def check_node_id(value: Any, what: str = "node id") -> str:
    """``value`` if it follows the node-id rule, else :class:`BadRequest` naming ``what`` and the rule."""
    if is_node_id(value):
        return str(value)
    if not isinstance(value, str):
        problem = f"expected a string, got {type(value).__name__}"
    elif not value:
        problem = "it is empty"
    elif len(value) > MAX_NODE_ID:
        problem = f"it has {len(value)} characters, more than {MAX_NODE_ID}"
    elif not value[0].isascii() or not value[0].isalnum():
        problem = "it must start with a letter or a digit"
    else:
        bad = next(ch for ch in value if not (ch.isascii() and (ch.isalnum() or ch in "._:-")))
        problem = f"{bad!r} is not allowed"
    raise BadRequest(
        f"bad {what} {value!r}: {problem} (1-{MAX_NODE_ID} characters of A-Z a-z 0-9 . _ : -, "
        "starting with a letter or digit)",
        value=repr(value),
    )
