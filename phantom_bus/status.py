"""The cluster status document (``phantom status --json``, ``Client.status()``).

The manager assembles the document; it alone vouches for the shards. This
module asks it, and when it does not answer (not registered with the broker,
paused, overloaded, restarting) builds the document without it from what the
broker, discovery and membership say, marked so that nobody mistakes it for a
verdict on the cluster:

* ``"health": "unknown"`` and ``"manager": "not answering"``: with no manager
  nobody knows whether the shards have their replicas, so the colour is not
  red (that would page someone about a cluster that may be fine, and is what
  a 5 s pause of the manager used to do), nor green;
* ``"reason"``: one line saying why, and the same as the first entry of
  ``"reasons"`` (code ``manager_not_answering``);
* ``"nodes"`` from discovery and membership (liveness only: no lifecycle, no
  replica counts), ``"services"`` from the broker's table.

``phantom status`` exits 1 for such a document (it is not a health verdict;
3 stays "the cluster is not healthy"). A document from the manager carries
``"manager": "answering"`` and a ``"reasons"`` list of what makes the control
plane itself unwell (see the operator's guide, "Health"), empty when nothing.

Both carry ``"control"``: the control plane's own shape,

    {"store": "sqlite|etcd",
     "leaders": {"sharding": {"instance": "h2", "term": 7}, "manager": {...}, "membership": {...}},
     "instances": {"broker": ["h1", "h2", "h3"], "discovery": [...], ...}}

``leaders`` has one entry per service with a single decision maker, ``None``
while nobody leads (or nobody could say); ``instances`` lists the instance
names (the ``instance`` setting, else HOST:PID) of every service's workers as
the brokers report them, and of the brokers that answered. Without the
manager, ``store`` is ``None``, the sharding and membership leaders are what
those services say themselves, and the one broker named is the one that
answered.

The functions take any object with the client's ``services()`` and
``request()`` methods; what they ask is one plan (:mod:`phantom_bus.plan`)
that the blocking and the asyncio collector both drive.
"""

from __future__ import annotations

from collections.abc import Awaitable, Generator, Iterable
from typing import Any, Protocol, TypedDict

from phantom_bus.errors import BadRequest, BrokerUnreachable, PhantomError, Refused
from phantom_bus.plan import advance

#: The keys of the status document's ``services`` (a documented contract, so a fixed list).
SERVICES = ("broker", "discovery", "membership", "sharding", "balancer", "manager")
#: The services with one decision maker, elected through a lease in the store (the keys of
#: the documented ``control.leaders``, so a fixed list too).
LEADING = ("sharding", "manager", "membership")

#: ``health`` of a document assembled without the manager.
UNKNOWN = "unknown"
#: ``manager`` of a document the manager did not answer.
NOT_ANSWERING = "not answering"
ANSWERING = "answering"
MANAGER_NOT_ANSWERING = "manager_not_answering"

_DISCOVERY_STATES = {"alive": "alive", "lost": "dead", "left": "left"}


class LeaderEntry(TypedDict):
    """One entry of ``control.leaders``: who leads and in which term (None: unknown)."""

    instance: str
    term: int | None


class NodeRow(TypedDict):
    """One row of the document's ``nodes`` (``phantom nodes``); the manager's rows
    also fill ``lifecycle``, ``replicas`` and ``primaries``."""

    id: Any
    state: Any
    lifecycle: str | None
    address: Any
    zone: Any
    cpu: Any
    mem: Any
    load: Any
    phi: Any
    heartbeat_age: Any
    incarnation: Any
    replicas: int | None
    primaries: int | None


class _SyncClient(Protocol):
    def services(self) -> dict[str, Any]: ...

    def request(self, service: str, op: str, /, **args: Any) -> Any: ...


class _AsyncClient(Protocol):
    def services(self) -> Awaitable[dict[str, Any]]: ...

    def request(self, service: str, op: str, /, **args: Any) -> Awaitable[Any]: ...


def node_row(discovered: dict[str, Any] | None, member: dict[str, Any] | None) -> NodeRow:
    """One node of the status document from discovery's and membership's views;
    membership's verdict on liveness wins over discovery's."""
    d, m = discovered or {}, member or {}
    raw_load = m.get("load")
    load: dict[str, Any] = raw_load if isinstance(raw_load, dict) and not m.get("load_stale") else {}
    state = m.get("state") or _DISCOVERY_STATES.get(str(d.get("state")), d.get("state"))
    return {
        "id": d.get("id") or m.get("id"),
        "state": state,
        "lifecycle": None,
        "address": d.get("address"),
        "zone": d.get("zone"),
        "cpu": load.get("cpu"),
        "mem": load.get("mem"),
        "load": load.get("load1_per_core"),
        "phi": m.get("phi"),
        "heartbeat_age": m.get("last_heartbeat_age"),
        "incarnation": m.get("incarnation", d.get("incarnation")),
        "replicas": None,
        "primaries": None,
    }


def instance_name(worker: Any) -> str | None:
    """The instance name of one worker of the broker's ``services`` table: its
    ``instance``, else ``HOST:PID`` (a worker from before instance names), else None."""
    if not isinstance(worker, dict):
        return None
    name = worker.get("instance")
    if isinstance(name, str) and name:
        return name
    host, pid = worker.get("host"), worker.get("pid")
    if host is None and pid is None:
        return None
    return f"{host or '?'}:{pid if pid is not None else '?'}"


def instances(tables: Iterable[Any], brokers: Iterable[str] = ()) -> dict[str, list[str]]:
    """``control.instances`` from the ``services`` tables of one or more brokers (a
    service registered with several brokers is listed once per instance) and the
    names of the brokers that answered. Every service of :data:`SERVICES` is a key;
    names are sorted."""
    seen: dict[str, set[str]] = {name: set() for name in SERVICES}
    seen["broker"].update(b for b in brokers if isinstance(b, str) and b)
    for table in tables:
        if not isinstance(table, dict):
            continue
        for service, entry in table.items():
            if not isinstance(service, str) or not isinstance(entry, dict):
                continue
            workers = entry.get("instances")
            for worker in workers if isinstance(workers, list) else ():
                name = instance_name(worker)
                if name is not None:
                    seen.setdefault(service, set()).add(name)
    return {service: sorted(names) for service, names in seen.items()}


def leader_entry(seen: Any) -> LeaderEntry | None:
    """``{"instance", "term"}`` from a leader description (a ``health`` reply's
    ``leader``, a ``verdicts`` reply); None when it names nobody."""
    if not isinstance(seen, dict):
        return None
    instance, term = seen.get("instance"), seen.get("term")
    if not isinstance(instance, str) or not instance:
        return None
    return {"instance": instance, "term": term if isinstance(term, int) and not isinstance(term, bool) else None}


def control_block(
    store: str | None, leaders: dict[str, Any], tables: Iterable[Any], brokers: Iterable[str] = ()
) -> dict[str, Any]:
    """The document's ``control`` part (see the module docstring)."""
    return {
        "store": store,
        "leaders": {name: leader_entry(leaders.get(name)) for name in LEADING},
        "instances": instances(tables, brokers),
    }


def control_text(doc: Any) -> list[str]:
    """``phantom status``'s lines for the ``control`` part (none if the document has
    none): the store and each leader with its term, then the instances, once for all
    services when they all run on the same ones."""
    control = doc.get("control") if isinstance(doc, dict) else None
    if not isinstance(control, dict):
        return []
    leaders = _of(control.get("leaders")) or {}
    said = ", ".join(
        f"{name} {seen['instance']} (term {seen.get('term')})" if isinstance(seen, dict) and seen.get("instance")
        else f"{name} none"
        for name, seen in leaders.items()
    )  # fmt: skip
    lines = [f"control: store {control.get('store') or '-'}; leaders {said or '-'}"]
    instances = _of(control.get("instances")) or {}
    lists = {name: [str(n) for n in names] for name, names in instances.items() if isinstance(names, list)}
    distinct = {tuple(names) for names in lists.values()}
    if len(lists) > 1 and len(distinct) == 1:
        lines.append(f"instances: {' '.join(next(iter(distinct))) or 'none'} (every service)")
    elif lists:
        lines.append("instances: " + "; ".join(f"{name} {' '.join(names) or 'none'}" for name, names in lists.items()))
    return lines


def fallback_status(
    services: dict[str, Any],
    reason: str,
    discovered: list[dict[str, Any]] | None = None,
    members: list[dict[str, Any]] | None = None,
    control: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A status document assembled without the manager, from the broker's service
    table and, when they answer, discovery's node table and membership's list.
    Health is ``unknown``: with no manager nobody vouches for the shards.
    ``control``: the ``control`` part, else one from the service table alone."""
    by_id_d = {str(n.get("id")): n for n in discovered or [] if isinstance(n, dict)}
    by_id_m = {str(m.get("id")): m for m in members or [] if isinstance(m, dict)}
    nodes = [node_row(by_id_d.get(i), by_id_m.get(i)) for i in sorted({*by_id_d, *by_id_m})]
    table = {
        name: "up" if name == "broker" or _up(services, name) else "down" for name in SERVICES
    }
    return {
        "health": UNKNOWN,
        "manager": NOT_ANSWERING,
        "reason": f"manager not answering: {reason}",
        "reasons": [
            {"code": MANAGER_NOT_ANSWERING, "severity": UNKNOWN, "service": "manager", "message": reason}
        ],
        "epoch": None,
        "nodes": nodes,
        "shards": {"total": None, "under_replicated": None, "unavailable": None},
        "services": table,
        "control": control if control is not None else control_block(None, {}, [services]),
    }


def from_manager(doc: Any) -> dict[str, Any]:
    """The manager's answer, marked as such (``manager: answering``, a ``reasons`` list)."""
    if not isinstance(doc, dict):
        raise BadRequest(f"malformed status reply from the manager: {type(doc).__name__}")
    doc.setdefault("manager", ANSWERING)
    doc.setdefault("reasons", [])
    return doc


def not_answering(doc: dict[str, Any]) -> bool:
    """True for a document built because the manager did not answer."""
    return doc.get("manager") == NOT_ANSWERING


def _up(services: dict[str, Any], name: str) -> bool:
    entry = services.get(name)
    return isinstance(entry, dict) and bool(entry.get("workers"))


def _of(reply: Any, key: str | None = None) -> Any:
    """``reply[key]`` (or ``reply``) if the reply is a map; else None."""
    if not isinstance(reply, dict):
        return None
    return reply.get(key) if key is not None else reply


def _why(err: PhantomError) -> str:
    return f"{err.code}: {err.message}"


# Errors that say the caller, not the manager, is at fault: those are raised as they are.
_CALLER_FAULTS = (BadRequest, BrokerUnreachable, Refused)


#: The plan's step for the broker's service table (any other step is ``(service, op)``).
_SERVICES = ("broker", "services")
_Plan = Generator[tuple[str, str], Any, dict[str, Any]]


def _plan() -> _Plan:
    """What :func:`collect` asks, in order, without I/O: it yields ``(service,
    op)`` and is sent the answer, or the :class:`PhantomError` it raised."""
    services = yield _SERVICES
    if isinstance(services, PhantomError):
        raise services
    if _up(services, "manager"):
        answer = yield ("manager", "status")
        try:
            if isinstance(answer, PhantomError):
                raise answer
            return from_manager(answer)
        except _CALLER_FAULTS:
            raise
        except PhantomError as err:
            reason = f"it did not answer the status request ({_why(err)})"
    else:
        reason = "it is not registered with the broker (stopped, restarting, or cut off)"
    nodes = members = None
    leaders: dict[str, Any] = {}
    # Without the manager, each answer that fails is done without.
    if _up(services, "discovery"):
        answer = yield ("discovery", "nodes")
        nodes = None if isinstance(answer, PhantomError) else answer
    if _up(services, "membership"):
        answer = yield ("membership", "members")
        members = None if isinstance(answer, PhantomError) else answer
        answer = yield ("membership", "verdicts")
        if not isinstance(answer, PhantomError):
            leaders["membership"] = _of(answer)
    if _up(services, "sharding"):
        answer = yield ("sharding", "health")
        if not isinstance(answer, PhantomError):
            leaders["sharding"] = _of(answer, "leader")
    answer = yield ("broker", "ping")
    brokers = [] if isinstance(answer, PhantomError) else [str(_of(answer, "instance") or "")]
    return fallback_status(services, reason, nodes, members, control_block(None, leaders, [services], brokers))


def collect(client: _SyncClient) -> dict[str, Any]:
    """The status document through a blocking client (``Client.status()``)."""
    plan = _plan()
    done, step = advance(plan, None)
    while not done:
        try:
            got = client.services() if step is _SERVICES else client.request(*step)
        except PhantomError as err:
            got = err
        done, step = advance(plan, got)
    return step


async def collect_async(client: _AsyncClient) -> dict[str, Any]:
    """The status document through an asyncio client (``AsyncClient.status()``)."""
    plan = _plan()
    done, step = advance(plan, None)
    while not done:
        try:
            got = await (client.services() if step is _SERVICES else client.request(*step))
        except PhantomError as err:
            got = err
        done, step = advance(plan, got)
    return step


__all__ = [
    "ANSWERING",
    "LEADING",
    "MANAGER_NOT_ANSWERING",
    "NOT_ANSWERING",
    "UNKNOWN",
    "collect",
    "collect_async",
    "control_block",
    "control_text",
    "fallback_status",
    "from_manager",
    "instance_name",
    "instances",
    "leader_entry",
    "node_row",
    "not_answering",
]
