"""How the agent tells a database what to become: three adapters behind one interface.

* :class:`Database` is the Python API: subclass it (one ``async`` method per
  transition) and either embed the agent in the database process or let the
  agent load it with ``participant = "module:Class"``. A method returns when
  the transition is complete; raising fails it (it is retried later).
* :class:`ExecCallbacks` (``participant = "exec"``) runs ``participant_exec``
  once per transition, Patroni-style, with the transition in its environment
  (:func:`transition_env`). Exit 0: done; anything else, or running past
  ``participant_timeout``: failed and retried.
* :class:`SimulatedCopy` (``participant = "sim"``, the default) stands in for
  a database: a ``join`` "copies" for ``copy_time`` seconds.

Every adapter also hears :meth:`Database.renewed` after each lease renewal,
with the lease's end: a database that cannot rely on the agent staying
responsive (the agent can be paused while the database is not) must stop
writes at that time by itself. The exec adapter writes it to a file
(``PHANTOM_LEASE_FILE``) for that purpose.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import json
import os
import shlex
import time
from pathlib import Path
from typing import Any

from phantom_bus.config import Config
from services.agent.participant import Transition


class Database:
    """The Python participant API; every method defaults to "done at once".

    ``epoch`` is the shard-map epoch the transition was decided under: from
    then on, refuse a client request that carries an older epoch for this
    shard. ``lease_until`` is a ``time.time()`` deadline.
    """

    async def join(self, shard: str, epoch: int, sources: tuple[str, ...]) -> None:
        """Copy ``shard`` from ``sources`` (node ids, primary first); return when the copy is complete."""

    async def replica(self, shard: str, epoch: int, sources: tuple[str, ...]) -> None:
        """Serve reads of ``shard`` (a completed copy, or one this node already had: catch up first)."""

    async def primary(self, shard: str, epoch: int, lease_until: float) -> None:
        """Take writes for ``shard`` until ``lease_until`` unless :meth:`renewed` extends it."""

    async def demote(self, shard: str, epoch: int) -> None:
        """Stop taking writes for ``shard``; keep serving reads as a replica."""

    async def fence(self, shard: str, epoch: int) -> None:
        """The lease is lost: stop taking writes for ``shard`` now (reads may go on)."""

    async def drop(self, shard: str, epoch: int) -> None:
        """This node no longer holds ``shard``: stop serving it and free its space."""

    def renewed(self, lease_until: float, primaries: list[str]) -> None:
        """The lease of ``primaries`` now ends at ``lease_until`` (``time.time()``) unless renewed again."""

    async def run(self, transition: Transition, lease_until: float) -> None:
        """Carry out ``transition`` by calling the method of its kind."""
        if transition.kind == "join":
            await self.join(transition.shard, transition.epoch, transition.sources)
        elif transition.kind == "replica":
            await self.replica(transition.shard, transition.epoch, transition.sources)
        elif transition.kind == "primary":
            await self.primary(transition.shard, transition.epoch, lease_until)
        elif transition.kind == "demote":
            await self.demote(transition.shard, transition.epoch)
        elif transition.kind == "fence":
            await self.fence(transition.shard, transition.epoch)
        else:
            await self.drop(transition.shard, transition.epoch)


class SimulatedCopy(Database):
    """The demo default: a copy takes ``copy_time`` seconds, everything else is instant."""

    def __init__(self, copy_time: float) -> None:
        self.copy_time = copy_time

    async def join(self, shard: str, epoch: int, sources: tuple[str, ...]) -> None:
        await asyncio.sleep(self.copy_time)


def transition_env(node: str, transition: Transition, lease_until: float, lease_file: str) -> dict[str, str]:
    """The environment variables a callback gets (documented in docs/integrating.md)."""
    return {
        "PHANTOM_NODE": node,
        "PHANTOM_TRANSITION": transition.kind,
        "PHANTOM_SHARD": transition.shard,
        "PHANTOM_EPOCH": str(transition.epoch),
        "PHANTOM_FROM": transition.before,
        "PHANTOM_TO": transition.after,
        "PHANTOM_SOURCES": ",".join(transition.sources),
        "PHANTOM_LEASE_UNTIL": f"{lease_until:.3f}" if transition.kind == "primary" else "",
        "PHANTOM_LEASE_FILE": lease_file,
    }


class ExecCallbacks(Database):
    """Run one command per transition (``participant = "exec"``)."""

    def __init__(self, command: str, node: str, lease_file: Path, timeout: float) -> None:
        self.argv = shlex.split(command)
        if not self.argv:
            raise ValueError("setting 'participant_exec' is required with participant = exec")
        self.node = node
        self.lease_file = lease_file
        self.timeout = timeout

    async def run(self, transition: Transition, lease_until: float) -> None:
        env = {**os.environ, **transition_env(self.node, transition, lease_until, str(self.lease_file))}
        proc = await asyncio.create_subprocess_exec(*self.argv, env=env, stdin=asyncio.subprocess.DEVNULL)
        try:
            code = await asyncio.wait_for(proc.wait(), self.timeout)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
            raise RuntimeError(
                f"{transition.kind} of {transition.shard} ran past {self.timeout:g} s and was killed"
            ) from None
        except asyncio.CancelledError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            raise
        if code != 0:
            raise RuntimeError(f"{transition.kind} of {transition.shard}: {self.argv[0]} exited with {code}")

    def renewed(self, lease_until: float, primaries: list[str]) -> None:
        # Atomic replace: a reader never sees half a file. Small, so cheap every renewal.
        tmp = self.lease_file.with_suffix(".tmp")
        tmp.write_text(json.dumps({"until": round(lease_until, 3), "primaries": primaries}) + "\n")
        os.replace(tmp, self.lease_file)


def load_database(cfg: Config, node: str) -> Database:
    """The adapter the settings ask for; ValueError naming the setting if it cannot be had."""
    kind = str(cfg.participant)
    if kind == "sim":
        return SimulatedCopy(float(cfg.copy_time))
    if kind == "exec":
        lease_file = Path(cfg.data) / f"{node}.lease"
        lease_file.parent.mkdir(parents=True, exist_ok=True)
        return ExecCallbacks(str(cfg.participant_exec), node, lease_file, float(cfg.participant_timeout))
    module, sep, name = kind.partition(":")
    if not sep or not module or not name:
        raise ValueError(f"setting 'participant' must be sim, exec or module:Class, got {kind!r}")
    try:
        cls: Any = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"setting 'participant': cannot load {kind}: {exc}") from exc
    db = cls()
    if not isinstance(db, Database):
        raise ValueError(f"setting 'participant': {kind} is not a services.agent.adapters.Database")
    return db


def wall_clock(monotonic_deadline: float) -> float:
    """A monotonic deadline as ``time.time()`` seconds (what a database compares with)."""
    return time.time() + (monotonic_deadline - time.monotonic())


__all__ = ["Database", "ExecCallbacks", "SimulatedCopy", "load_database", "transition_env", "wall_clock"]
