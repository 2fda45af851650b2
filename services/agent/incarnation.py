"""The agent's incarnation: a number that is higher after every restart.

Discovery and membership order everything an agent says by its incarnation,
so a restarted agent must never come back with a number it, or an earlier
run, already used: its beacons would be dropped as stale, and an old
suspicion could not be refuted.

Two sources guarantee that together:

* a small file per node id next to the agent's data, holding the last value
  handed out; the next start returns at least that plus one, even if the
  wall clock jumped backwards;
* the wall clock in milliseconds: if the file is lost (new disk, wiped data
  directory), a value derived from the time is still higher than any value
  an earlier run got, as long as the clock has not gone back past it. Each
  earlier value was itself at most the time of its start (or one more than a
  stored value, which only wins when two starts share a millisecond).

The file is replaced atomically (temporary file, fsync, ``os.replace``, fsync
of the directory), so a crash mid-write leaves either the old or the new value,
never a torn one. An unreadable file is treated as missing: the clock term
still gives a safe value.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import quote

from loguru import logger

from services.discovery.beacon import MAX_INCARNATION, check_node_id

INCARNATION_DIR = "agent"
"""Directory under the data directory that holds the incarnation files."""


def incarnation_path(data_dir: Path, node_id: str) -> Path:
    """The file that holds the last incarnation of ``node_id`` under ``data_dir``."""
    # Node ids may contain ':' which some file systems refuse; quote it.
    return Path(data_dir) / INCARNATION_DIR / f"{quote(node_id, safe='')}.incarnation"


def read_incarnation(data_dir: Path, node_id: str) -> int | None:
    """The stored incarnation of ``node_id``, or None if missing or unreadable."""
    path = incarnation_path(data_dir, node_id)
    try:
        text = path.read_text(encoding="ascii").strip()
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as exc:
        logger.warning("incarnation file {} unreadable ({}); using the clock", path, exc)
        return None
    if not text.isdigit() or int(text) > MAX_INCARNATION:
        logger.warning("incarnation file {} holds {!r}, not a number; using the clock",
                       path, text[:40])
        return None
    return int(text)


def next_incarnation(data_dir: Path, node_id: str, now_ms: int) -> int:
    """Return and persist the incarnation for this start of ``node_id``.

    ``now_ms`` is the wall clock in milliseconds since the Unix epoch (the
    caller reads it: ``time.time_ns() // 1_000_000``). The result is
    ``max(stored + 1, now_ms)``. Raises :class:`OSError` if the file cannot be
    written: starting with a number that the next start might reuse would
    break the ordering, so the agent should refuse to start and say why.
    """
    check_node_id(node_id, "node_id")
    if now_ms < 0:
        raise ValueError(f"now_ms must be >= 0, got {now_ms}")
    stored = read_incarnation(data_dir, node_id)
    value = now_ms if stored is None else max(stored + 1, now_ms)
    if value > MAX_INCARNATION:
        raise ValueError(f"incarnation {value} exceeds the int64 range")
    _write_atomically(incarnation_path(data_dir, node_id), f"{value}\n")
    return value


def persist_incarnation(data_dir: Path, node_id: str, value: int) -> None:
    """Record ``value`` if it is higher than the stored one (a runtime refutation).

    Membership makes a suspected agent refute with incarnation + 1. Without
    this record, an agent that refuted more times than milliseconds it ran
    could restart with a number it already used.
    """
    check_node_id(node_id, "node_id")
    stored = read_incarnation(data_dir, node_id)
    if stored is None or value > stored:
        _write_atomically(incarnation_path(data_dir, node_id), f"{value}\n")


#: Ack codes after which the agent must move past the incarnation membership holds.
REFUTING_CODES = frozenset({"stale_incarnation", "declared_dead", "has_left"})


def refutation(current: int, ack: Mapping[str, Any]) -> int | None:
    """The incarnation to move to after membership's heartbeat ``ack``, or None to keep ``current``.

    Whatever the reason membership gives (it suspects us, holds us dead or left,
    or holds a higher incarnation than ours: a restored data directory, a clock
    that went back, a forged heartbeat), the answer is the same: one past the
    higher of ours and the one it holds, at once. Climbing one step per ack
    towards a number far ahead would keep a live node dead for as long as the
    climb takes (a 10^7 lead is 29 days at four heartbeats a second).
    """
    held = ack.get("incarnation")
    if isinstance(held, bool) or not isinstance(held, int) or held < 0:
        held = None
    if ack.get("code") in REFUTING_CODES or ack.get("refute") is True or (held is not None and held > current):
        target = max(current, held if held is not None else current) + 1
        return target if target <= MAX_INCARNATION else None
    return None


def _write_atomically(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="ascii") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_directory(path.parent)


def _fsync_directory(directory: Path) -> None:
    # Makes the rename itself durable. Windows cannot open a directory, and
    # there the rename is already as durable as it will get.
    if os.name != "posix":
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
