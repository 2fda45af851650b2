"""The broker's routing core: which worker gets which request (sans-I/O).

The broker shell feeds it what arrives on the sockets together with ``now``
and carries out the actions it returns. Nothing here opens a socket, reads the
clock or decodes a request body: a request is an opaque ``body`` plus the
``route`` and ``reqid`` frames that the reply must carry back.

Policy:

* a service's requests go to the live worker with the fewest requests in
  flight (ties in turn), so several workers share the load and a slow worker
  gets less; for a service that elects a leader, to the worker whose
  heartbeats say it leads, while it has room;
* a worker takes at most ``capacity`` requests at once; beyond that requests
  wait in a bounded per-service queue, and beyond *that* the client is told
  ``overloaded`` at once;
* a service with no live worker answers ``service_unavailable`` at once
  (retryable), unless no worker ever registered under that name and the
  broker has been up for ``unknown_after`` seconds: then ``unknown_service``
  (not retryable: a typo is not worth retrying). The standard service names
  are never unknown, so a client that starts before the cluster does waits;
* a worker silent for ``liveness`` seconds is dropped, and the clients whose
  requests it held are told so (they may retry) rather than left to time out.
"""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from phantom_bus.errors import Overloaded, PhantomError, ServiceUnavailable, Timeout, UnknownService

#: The services of a Phantom cluster: never answered ``unknown_service``, since a
#: request for one of them that finds no worker is early, not wrong. Listed, not read
#: from what is installed: a broker must know them on a host where none is installed.
STANDARD_SERVICES = frozenset({"discovery", "membership", "sharding", "balancer", "manager"})


class ToWorker(NamedTuple):
    """Send request ``body`` (for client ``route``, id ``reqid``) to worker ``identity``."""

    identity: bytes
    route: bytes
    reqid: bytes
    body: bytes


class ToClient(NamedTuple):
    """Answer client ``route`` for request ``reqid`` to ``service`` with ``error``."""

    route: bytes
    service: str
    reqid: bytes
    error: PhantomError


Action = ToWorker | ToClient


@dataclass(slots=True)
class Worker:
    """One registered worker process of a service."""

    identity: bytes
    service: str
    capacity: int
    expires: float
    meta: dict[str, Any]
    registered: float
    # (route, reqid) of requests handed to it and not yet answered; a dict as an ordered set.
    inflight: dict[tuple[bytes, bytes], None] = field(default_factory=dict)
    served: int = 0
    # What its heartbeats last said: True if it leads its service, False if it follows,
    # None if it never said (a service without a leader).
    leader: bool | None = None


@dataclass(slots=True)
class _Service:
    name: str
    workers: list[Worker] = field(default_factory=list)
    queue: deque[tuple[bytes, bytes, bytes, float]] = field(default_factory=deque)
    turn: int = 0
    requests: int = 0
    rejected: int = 0


def _unavailable(service: str, reason: str, message: str) -> ServiceUnavailable:
    return ServiceUnavailable(message, service=service, reason=reason)


class Dispatcher:
    """Workers per service, requests in flight, and the decisions about both."""

    def __init__(
        self, *, liveness: float, queue_limit: int, queue_timeout: float, unknown_after: float | None = None
    ) -> None:
        self.liveness = liveness
        # From this (monotonic) time on, a name no worker ever registered under is
        # unknown rather than unavailable; None: never (every name may still come).
        self.unknown_after = unknown_after
        self.queue_limit = queue_limit
        self.queue_timeout = queue_timeout
        self._workers: dict[bytes, Worker] = {}
        self._services: dict[str, _Service] = {}
        self._lock = threading.Lock()

    # --- workers -------------------------------------------------------------

    def ready(
        self, identity: bytes, service: str, capacity: int, meta: dict[str, Any], now: float
    ) -> list[Action]:
        """A worker registers for ``service``; queued requests may go to it at once."""
        with self._lock:
            actions: list[Action] = []
            old = self._workers.get(identity)
            if old is not None:
                # Re-registration on the same connection (e.g. after it heard BYE):
                # whatever it held is lost with its previous incarnation.
                actions.extend(self._drop(old, "re-registered"))
            worker = Worker(identity, service, max(1, capacity), now + self.liveness, meta, now)
            self._workers[identity] = worker
            svc = self._services.setdefault(service, _Service(service))
            svc.workers.append(worker)
            actions.extend(self._drain(svc, now))
            return actions

    def heard(self, identity: bytes, now: float, leader: bool | None = None) -> bool:
        """Any message from a worker proves it alive; False if it is not registered.
        ``leader``: what its heartbeat said of its leadership (None: nothing)."""
        worker = self._workers.get(identity)
        if worker is None:
            return False
        worker.expires = now + self.liveness
        if leader is not None:
            worker.leader = leader
        return True

    def service_of(self, identity: bytes) -> str | None:
        """The service a worker registered for, or None if it is not registered."""
        worker = self._workers.get(identity)
        return None if worker is None else worker.service

    def remove(self, identity: bytes) -> bool:
        """A worker said goodbye. Its in-flight requests may still be answered, so the
        clients are not told anything; returns False for an unknown worker."""
        with self._lock:
            worker = self._workers.pop(identity, None)
            if worker is None:
                return False
            self._services[worker.service].workers.remove(worker)
            return True

    def expire(self, now: float) -> tuple[list[Worker], list[Action]]:
        """Drop silent workers and stale queued requests; returns (dropped, actions)."""
        with self._lock:
            dropped = [w for w in self._workers.values() if w.expires <= now]
            actions: list[Action] = []
            for worker in dropped:
                actions.extend(self._drop(worker, "stopped answering"))
            for svc in self._services.values():
                while svc.queue and svc.queue[0][3] + self.queue_timeout <= now:
                    route, reqid, _body, _at = svc.queue.popleft()
                    err = Timeout(
                        f"request waited {self.queue_timeout:g} s in the broker queue of "
                        f"\"{svc.name}\": every worker stayed busy",
                        service=svc.name,
                    )
                    actions.append(ToClient(route, svc.name, reqid, err))
                if not svc.workers:
                    actions.extend(self._flush_queue(svc))
            return dropped, actions

    def _drop(self, worker: Worker, why: str) -> list[Action]:
        self._workers.pop(worker.identity, None)
        svc = self._services[worker.service]
        if worker in svc.workers:
            svc.workers.remove(worker)
        actions: list[Action] = []
        for route, reqid in worker.inflight:
            err = _unavailable(
                worker.service,
                "worker_lost",
                f"the {worker.service} worker handling this request {why}; "
                "it may or may not have been carried out",
            )
            actions.append(ToClient(route, worker.service, reqid, err))
        worker.inflight.clear()
        if svc.workers:
            actions.extend(self._drain(svc, 0.0))
        return actions

    def _flush_queue(self, svc: _Service) -> list[Action]:
        actions: list[Action] = []
        while svc.queue:
            route, reqid, _body, _at = svc.queue.popleft()
            err = _unavailable(svc.name, "no_worker", f"no live worker for service \"{svc.name}\" right now")
            actions.append(ToClient(route, svc.name, reqid, err))
        return actions

    # --- requests ------------------------------------------------------------

    def request(self, service: str, route: bytes, reqid: bytes, body: bytes, now: float) -> Action | None:
        """Route one client request: to a worker, into the queue (None), or an error."""
        with self._lock:
            svc = self._services.get(service)
            if svc is None or not svc.workers:
                return ToClient(route, service, reqid, self._no_worker(service, svc is None, now))
            svc.requests += 1
            worker = self._pick(svc)
            if worker is not None:
                worker.inflight[(route, reqid)] = None
                return ToWorker(worker.identity, route, reqid, body)
            if len(svc.queue) >= self.queue_limit:
                svc.rejected += 1
                busy = Overloaded(
                    f"service \"{service}\" has {len(svc.queue)} requests queued; try again later",
                    service=service,
                )
                return ToClient(route, service, reqid, busy)
            svc.queue.append((route, reqid, body, now))
            return None

    def _no_worker(self, service: str, never: bool, now: float) -> PhantomError:
        if (
            never
            and self.unknown_after is not None
            and now >= self.unknown_after
            and service not in STANDARD_SERVICES
        ):
            return UnknownService(
                f"no worker has ever registered for service \"{service}\" at this broker; "
                "check the name (the broker's 'services' operation lists the registered ones)",
                service=service,
            )
        return _unavailable(service, "no_worker", f"no live worker for service \"{service}\" right now")

    def replied(self, identity: bytes, route: bytes, reqid: bytes, now: float) -> list[Action]:
        """A worker answered; its freed slot may take a queued request."""
        with self._lock:
            worker = self._workers.get(identity)
            if worker is None:
                return []
            worker.expires = now + self.liveness
            key = (route, reqid)
            if key in worker.inflight:
                del worker.inflight[key]
                worker.served += 1
            svc = self._services[worker.service]
            if svc.queue:
                return self._drain(svc, now)
            return []

    def _pick(self, svc: _Service) -> Worker | None:
        workers = svc.workers
        if len(workers) > 1:
            # A service with a leader: its requests go to the leader while it has room
            # (a follower answers the leader-only ones with not_leader, and a retry
            # picked by load alone would find the idle follower again and again).
            leading = [w for w in workers if w.leader and len(w.inflight) < w.capacity]
            if leading:
                return min(leading, key=lambda w: len(w.inflight))
        if len(workers) == 1:
            w = workers[0]
            return w if len(w.inflight) < w.capacity else None
        best: Worker | None = None
        best_load = 0
        n = len(workers)
        start = svc.turn % n
        svc.turn += 1
        for i in range(n):
            w = workers[(start + i) % n]
            load = len(w.inflight)
            if load < w.capacity and (best is None or load < best_load):
                best, best_load = w, load
        return best

    def _drain(self, svc: _Service, now: float) -> list[Action]:
        actions: list[Action] = []
        while svc.queue:
            worker = self._pick(svc)
            if worker is None:
                break
            route, reqid, body, _at = svc.queue.popleft()
            worker.inflight[(route, reqid)] = None
            actions.append(ToWorker(worker.identity, route, reqid, body))
        return actions

    # --- views ----------------------------------------------------------------

    def workers(self) -> list[Worker]:
        """Every registered worker."""
        with self._lock:
            return list(self._workers.values())

    def services(self, now: float) -> dict[str, dict[str, Any]]:
        """Per service: live workers, requests in flight and queued, counters."""
        with self._lock:
            out: dict[str, dict[str, Any]] = {}
            for svc in self._services.values():
                out[svc.name] = {
                    "workers": len(svc.workers),
                    "inflight": sum(len(w.inflight) for w in svc.workers),
                    "queued": len(svc.queue),
                    "requests": svc.requests,
                    "rejected": svc.rejected,
                    "instances": [
                        {
                            "pid": w.meta.get("pid"),
                            "host": w.meta.get("host"),
                            "instance": w.meta.get("instance"),
                            "inflight": len(w.inflight),
                            "served": w.served,
                            "up": round(now - w.registered, 3),
                        }
                        for w in svc.workers
                    ],
                }
            return out
