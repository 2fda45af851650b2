"""Health of the control plane itself: what the shard colour cannot see.

The colour of ``phantom status`` judges the shards: whether each has its
primary and its replicas. It stays green while the processes that keep it so
are unwell: sharding cannot commit a map change (a full or read-only disk),
a service keeps crashing and being restarted, or the manager's decisions
(failovers, routing updates) wait in a queue because the service they are for
keeps refusing or timing out. Each of these becomes a *reason* in the status
document, with the colour it raises the health to:

=====================  ========  ===================================================
code                   colour    when
=====================  ========  ===================================================
``store_failing``      red       sharding's ``health`` says its store cannot commit
                                 (``store.ok`` false): no map change can be made,
                                 failovers included
``service_restarting`` yellow    a service registered with ``restart_count`` new
                                 worker processes (a new pid at the broker) within
                                 ``restart_window`` seconds
``queue_stuck``        yellow    the oldest unfinished manager action for a service
                                 is older than ``queue_stuck_after`` seconds
=====================  ========  ===================================================

A reason is ``{"code", "severity", "service", "message", ...}`` with figures
(``failing_for``, ``restarts``, ``age``, ``pending``). The document's health is
the worst of the shard colour and the reasons' severities; the reasons are
listed whatever the colour. Sans-I/O: the manager's shell feeds observations
with the time, and asks for the reasons.
"""

from __future__ import annotations

import math
import threading
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

GREEN, YELLOW, RED = "green", "yellow", "red"
_RANK = {GREEN: 0, YELLOW: 1, RED: 2}

STORE_FAILING = "store_failing"
SERVICE_RESTARTING = "service_restarting"
QUEUE_STUCK = "queue_stuck"

#: Services whose worker processes are watched for restarts.
WATCHED = ("discovery", "membership", "sharding", "balancer", "manager")


@dataclass(frozen=True, slots=True)
class ControlConfig:
    """Thresholds of the control-plane reasons (see the module docstring)."""

    restart_window: float = 300.0
    """Seconds over which new worker processes of one service are counted. Five
    minutes: supervisord restarts a crashing process within a second or two, so
    a crash loop shows many times over, while a deliberate restart of the whole
    set (a deploy) counts once per service and ages out."""

    restart_count: int = 2
    """New worker processes of one service within ``restart_window`` that make it
    ``service_restarting`` (count). One is a restart someone may have meant; two
    in five minutes is a process that keeps dying."""

    queue_stuck_after: float = 30.0
    """Seconds the oldest unfinished action for one service may wait before the
    queue is ``queue_stuck``. Actions are retried with back-off up to 5 s, so a
    service restarting normally (a few seconds) clears them well within this;
    30 s is also the manager's reconcile period, after which work should have
    been re-derived anyway."""

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first threshold out of range."""
        for name in ("restart_window", "queue_stuck_after"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value <= 0:
                raise ValueError(f"manager {name} must be a positive number of seconds, got {value!r}")
        if isinstance(self.restart_count, bool) or not isinstance(self.restart_count, int) or self.restart_count < 1:
            raise ValueError(f"manager restart_count must be a positive integer, got {self.restart_count!r}")


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return None
    return float(value)


class ControlWatch:
    """Observations of the control plane, and the reasons they give (thread-safe)."""

    def __init__(self, config: ControlConfig | None = None) -> None:
        self.config = config if config is not None else ControlConfig()
        self.config.validate()
        self._lock = threading.Lock()
        # Worker pids seen registered, per service and instance (see observe_services).
        self._pids: dict[str, dict[Any, set[Any]]] = {}
        self._restarts: dict[str, deque[float]] = {}  # when a new pid appeared, per service
        self._queued: dict[str, deque[tuple[float, str]]] = {}  # unfinished actions: (since, what)
        self._store: dict[str, Any] | None = None

    # -- observations ---------------------------------------------------------

    def observe_services(self, services: Mapping[str, Any], now: float) -> None:
        """The broker's ``services`` table: a worker pid not seen before, for an instance
        of a service that already had a worker, is a restart of that service.

        An instance is known by its ``instance`` name, or by its host when the name is
        the HOST:PID default (which changes with every process): so another instance
        registering (a second host, a new control-plane host) is no restart, and a
        process restarted on one host with default names still is."""
        with self._lock:
            for name in WATCHED:
                entry = services.get(name)
                if not isinstance(entry, Mapping):
                    continue
                instances = entry.get("instances")
                if not isinstance(instances, list):
                    continue
                now_running: dict[Any, set[Any]] = {}
                for worker in instances:
                    if isinstance(worker, Mapping) and worker.get("pid") is not None:
                        now_running.setdefault(_instance_key(worker), set()).add(worker.get("pid"))
                known = self._pids.setdefault(name, {})
                for key, pids in now_running.items():
                    seen = known.get(key)
                    if seen is None:  # the first look, or an instance not seen before
                        known[key] = set(pids)
                        continue
                    for _ in pids - seen:
                        self._restarts.setdefault(name, deque()).append(now)
                    seen |= pids
                    if len(seen) > 64:  # bounded: only new pids matter
                        known[key] = set(pids)
                if len(known) > 256:  # bounded too: instances that come and go
                    self._pids[name] = {k: v for k, v in known.items() if k in now_running}
            self._forget_old(now)

    def observe_store(self, health: Any) -> None:
        """Sharding's ``health`` reply; its ``store`` part, if any (absent: unknown)."""
        store = health.get("store") if isinstance(health, Mapping) else None
        with self._lock:
            self._store = dict(store) if isinstance(store, Mapping) else None

    def forget_store(self) -> None:
        """Sharding did not answer: what its store does is unknown, not failing."""
        with self._lock:
            self._store = None

    def queued(self, service: str, what: str, now: float) -> None:
        """An action for ``service`` entered its queue."""
        with self._lock:
            self._queued.setdefault(service, deque()).append((now, what))

    def finished(self, service: str) -> None:
        """The oldest action for ``service`` left its queue (done, or given up)."""
        with self._lock:
            queue = self._queued.get(service)
            if queue:
                queue.popleft()

    # -- reading --------------------------------------------------------------

    def queue_ages(self, now: float) -> dict[str, dict[str, Any]]:
        """Per service with unfinished actions: ``pending`` and the oldest's ``age`` and ``action``."""
        with self._lock:
            return {
                service: {"pending": len(q), "age": round(max(0.0, now - q[0][0]), 3), "action": q[0][1]}
                for service, q in self._queued.items()
                if q
            }

    def reasons(self, now: float) -> list[dict[str, Any]]:
        """What is wrong with the control plane now, worst first."""
        cfg = self.config
        out: list[dict[str, Any]] = []
        with self._lock:
            self._forget_old(now)
            store = self._store
            if store is not None and store.get("ok") is False:
                failing_for = _number(store.get("failing_for"))
                error = store.get("error")
                since = f" for {failing_for:.0f} s" if failing_for is not None else ""
                out.append(
                    {
                        "code": STORE_FAILING,
                        "severity": RED,
                        "service": "sharding",
                        "message": f"sharding cannot commit to its store{since}: {error or 'no detail'}; "
                        "no shard map change (failover included) can be made",
                        "error": error if isinstance(error, str) else None,
                        "failing_for": failing_for,
                    }
                )
            for service, times in sorted(self._restarts.items()):
                if len(times) >= cfg.restart_count:
                    out.append(
                        {
                            "code": SERVICE_RESTARTING,
                            "severity": YELLOW,
                            "service": service,
                            "message": f"{service} restarted {len(times)} times in the last "
                            f"{cfg.restart_window:g} s (a new worker process each time)",
                            "restarts": len(times),
                        }
                    )
            for service, queue in sorted(self._queued.items()):
                if queue and now - queue[0][0] >= cfg.queue_stuck_after:
                    age = now - queue[0][0]
                    out.append(
                        {
                            "code": QUEUE_STUCK,
                            "severity": YELLOW,
                            "service": service,
                            "message": f"{len(queue)} manager action(s) for {service} unfinished, the oldest "
                            f"({queue[0][1]}) for {age:.0f} s",
                            "pending": len(queue),
                            "age": round(age, 3),
                        }
                    )
        out.sort(key=lambda r: -_RANK[r["severity"]])
        return out

    def _forget_old(self, now: float) -> None:
        horizon = now - self.config.restart_window
        for name in list(self._restarts):
            times = self._restarts[name]
            while times and times[0] < horizon:
                times.popleft()
            if not times:
                del self._restarts[name]


def _instance_key(worker: Mapping[str, Any]) -> Any:
    """What identifies one instance across its restarts: its configured ``instance``
    name, else (no name, or the HOST:PID default) its host."""
    name, host, pid = worker.get("instance"), worker.get("host"), worker.get("pid")
    if isinstance(name, str) and name and name != f"{host}:{pid}":
        return ("instance", name)
    return ("host", host)


def worst(colours: Iterable[str]) -> str:
    """The worst of ``colours`` (green < yellow < red); unknown values are ignored."""
    best = GREEN
    for colour in colours:
        if _RANK.get(colour, -1) > _RANK[best]:
            best = colour
    return best


def apply_reasons(doc: dict[str, Any], reasons: list[dict[str, Any]], queues: Mapping[str, Any] | None = None) -> None:
    """Put ``reasons`` (and the queue ages) into a status document and raise its health
    to the worst of its shard colour and the reasons' severities. A reason that
    changes the colour also becomes the document's one-line ``reason``."""
    doc["reasons"] = reasons
    if queues is not None:
        doc["queues"] = dict(queues)
    shard_colour = doc.get("health")
    colour = worst([str(shard_colour), *(r["severity"] for r in reasons)])
    if colour != shard_colour and reasons:
        doc["health"] = colour
        doc["reason"] = reasons[0]["message"]
