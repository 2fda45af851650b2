"""Opening the control plane's store from the settings, and telling whether it commits.

Sharding, the manager and the leader records of every service share one
store (``store`` setting: the SQLite file ``store.sqlite3`` under
``PHANTOM_DATA`` by default, or etcd). :class:`StoreHealth` is what a
service's ``health`` reply says about it (``phantom status`` shows it).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from loguru import logger

from phantom_bus.config import Config
from phantom_bus.store import Change, Store, open_store


def open_shared_store(cfg: Config, legacy: str | None = None) -> Store:
    """The store the settings name; ``legacy``: a state file of an older version under
    ``PHANTOM_DATA`` that, if present, is said (in one line) to be ignored."""
    if legacy is not None:
        old = Path(cfg.data) / legacy
        if old.exists():
            logger.warning("{} is from an older version and is ignored: state now lives in the {} store", old,
                           cfg.store)
    return open_store(str(cfg.store), data_dir=str(cfg.data), prefix=str(cfg.store_prefix))


class StoreHealth:
    """The outcome of the last commits: ``ok``, the real cause of the last failure, and
    for how long commits have been failing (monotonic seconds, given by the shell)."""

    def __init__(self) -> None:
        self.error: str | None = None
        self.failing_since: float | None = None

    def succeeded(self) -> None:
        """A commit (or probe write) went through."""
        self.error = None
        self.failing_since = None

    def failed(self, exc: BaseException, now: float) -> bool:
        """A commit failed with ``exc``; True if this starts a failing period (log it then)."""
        first = self.failing_since is None
        self.error = str(exc) or type(exc).__name__
        if first:
            self.failing_since = now
        return first

    @property
    def ok(self) -> bool:
        """True unless the last commit failed."""
        return self.failing_since is None

    def to_wire(self, now: float) -> dict[str, Any]:
        """``{"ok", "error", "failing_for"}`` as the health reply carries it."""
        since = self.failing_since
        return {
            "ok": since is None,
            "error": self.error,
            "failing_for": None if since is None else round(max(0.0, now - since), 3),
        }


async def changes(store: Store, prefix: str, start: int) -> AsyncIterator[Change]:
    """``store.watch(prefix, start)``, closed when the caller stops iterating."""
    watch = store.watch(prefix, start)
    try:
        async for change in watch:
            yield change
    finally:
        close = getattr(watch, "aclose", None)
        if close is not None:
            await close()
