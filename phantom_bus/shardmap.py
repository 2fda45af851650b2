"""The shard map: which shard holds a key, and which nodes hold each shard.

This module is what a client needs to route a request by itself: the stable
key hash, the map value and its wire format. It has no I/O and no clock.

A map has an ``epoch`` (bumped by the sharding service on every change) and
key spaces of two kinds:

* ``hash``: a key goes to slot ``key_hash(key) % slots``; every slot belongs
  to exactly one shard, each shard owning one or more ``[start, end)`` slot
  ranges. The slot count is fixed when the key space is created.
* ``range``: keys are ordered by their UTF-8 bytes; shards own consecutive
  non-overlapping ranges ``[start, end)`` covering every key, the first
  starting at ``b""`` and the last ending at ``None`` (no upper bound).

Each shard lists its replicas as ``(node, role)`` with role ``primary``,
``replica``, ``joining`` (being copied to, not readable yet) or ``leaving``
(being moved away, still complete, no new reads). ``down`` names the nodes the
sharding service currently knows to be dead; their replicas stay in the map
(so that a quick restart costs nothing) but are not served from.

The values here are immutable; lookups on one map are safe from any thread.
"""

from __future__ import annotations

import hashlib
from bisect import bisect_right
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Final, Literal, NotRequired, TypedDict, TypeVar, cast

import msgpack

from phantom_bus.errors import BadRequest, NoSuchKeyspace, NotFound
from phantom_bus.protocol import wire_type

__all__ = [
    "DEFAULT_SLOTS",
    "FORMAT_VERSION",
    "KINDS",
    "MAX_SLOTS",
    "ROLES",
    "Keyspace",
    "Kind",
    "Replica",
    "Role",
    "Shard",
    "ShardMap",
    "ShardRoute",
    "key_bytes",
    "key_hash",
]

#: Version of the map's wire format (the ``v`` field of :meth:`ShardMap.to_wire`).
FORMAT_VERSION: Final = 1
#: Slots of a hash key space when its creator does not say: enough to split a
#: key space into thousands of shards, small enough that the slot table of a
#: client costs 32 KiB.
DEFAULT_SLOTS: Final = 4096
#: Upper bound on the slots of one hash key space (keeps a client's table small).
MAX_SLOTS: Final = 1 << 16
#: Longest node id, shard id or key space name accepted on the wire.
MAX_NAME: Final = 200

Role = Literal["primary", "replica", "joining", "leaving"]
Kind = Literal["hash", "range"]
ShardState = Literal["active", "moving"]

ROLES: Final[tuple[Role, ...]] = ("primary", "replica", "joining", "leaving")
KINDS: Final[tuple[Kind, ...]] = ("hash", "range")
STATES: Final[tuple[ShardState, ...]] = ("active", "moving")
#: Roles whose replica holds the whole shard and may serve reads.
SERVING: Final = frozenset({"primary", "replica"})

_blake2b = hashlib.blake2b
_from_bytes = int.from_bytes


def _odd_key(key: object) -> BadRequest:
    # A value decoded from msgpack is named by its msgpack type; anything else
    # can only come from Python code calling in, and is named as Python calls it.
    name = wire_type(key) if type(key) in _WIRE_TYPES else type(key).__name__
    return BadRequest(
        f"a key must be str or bin, not {name}; encode numbers and other values as text or bytes first",
        type=name,
    )


_WIRE_TYPES = frozenset({type(None), bool, int, float, list, dict})


def key_bytes(key: str | bytes) -> bytes:
    """The bytes a key is hashed and ordered by: UTF-8 for ``str``, as is for ``bytes``.

    Raises :class:`BadRequest` for any other type and for strings that cannot be
    encoded (lone surrogates).
    """
    if type(key) is str:
        try:
            return key.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise BadRequest(f"key {key!r} is not valid Unicode: {exc.reason}") from exc
    if type(key) is bytes:
        return key
    # Subclasses (StrEnum members, ...) go through the base class methods so that an
    # override cannot change which shard a key routes to.
    if isinstance(key, str):
        try:
            return str.encode(key, "utf-8")
        except UnicodeEncodeError as exc:
            raise BadRequest(f"key {key!r} is not valid Unicode: {exc.reason}") from exc
    if isinstance(key, bytes):
        return bytes(memoryview(key))
    raise _odd_key(key)


def key_hash(key: str | bytes) -> int:
    """The stable 64-bit hash of a key, the same in every process and language.

    BLAKE2b with an 8-byte digest (no key, salt or personalisation) over
    :func:`key_bytes` of the key, read as an unsigned little-endian integer.
    Python's ``hash()`` is salted per process, so it must never be used here.
    """
    if type(key) is str:
        try:
            data = key.encode("utf-8")
        except UnicodeEncodeError:
            data = key_bytes(key)  # raises the helpful BadRequest
    elif type(key) is bytes:
        data = key
    else:
        data = key_bytes(key)
    return _from_bytes(_blake2b(data, digest_size=8).digest(), "little")


class ReplicaDoc(TypedDict):
    """A replica on the wire (docs/shardmap.md)."""

    node: str
    role: Role


class ShardDoc(TypedDict):
    """A shard on the wire: ``slots`` in a hash key space, ``start``/``end`` in a range one."""

    id: str
    state: str
    replicas: list[ReplicaDoc]
    slots: NotRequired[list[list[int]]]
    start: NotRequired[bytes]
    end: NotRequired[bytes | None]


class KeyspaceDoc(TypedDict):
    """A key space on the wire."""

    name: str
    kind: Kind
    rf: int
    slots: int
    shards: list[ShardDoc]


class MapDoc(TypedDict):
    """The shard map on the wire (format ``v``), as :meth:`ShardMap.to_wire` writes it."""

    v: int
    epoch: int
    keyspaces: list[KeyspaceDoc]
    down: list[str]


class RouteDoc(TypedDict):
    """One shard's route on the wire (:meth:`ShardRoute.to_wire`)."""

    keyspace: str
    shard: str
    primary: str | None
    readers: list[str]
    epoch: int


@dataclass(frozen=True, slots=True)
class Replica:
    """One copy of a shard: the node that holds it and its role."""

    node: str
    role: Role

    def to_wire(self) -> ReplicaDoc:
        """The replica as a wire map ``{"node", "role"}``."""
        return {"node": self.node, "role": self.role}


@dataclass(frozen=True, slots=True)
class Shard:
    """A shard: its id, what it owns and who holds it.

    Hash shards own ``slots`` (sorted ``(start, end)`` half-open slot ranges);
    range shards own the keys ``start <= k < end`` (``end=None``: no bound).
    ``state`` is ``active`` when settled or ``moving`` while replicas are being
    added, removed or the primary handed over.
    """

    id: str
    replicas: tuple[Replica, ...] = ()
    state: ShardState = "active"
    slots: tuple[tuple[int, int], ...] = ()
    start: bytes = b""
    end: bytes | None = None

    @property
    def primary(self) -> str | None:
        """The node of the primary replica, or None while the shard has none."""
        for r in self.replicas:
            if r.role == "primary":
                return r.node
        return None

    @property
    def nodes(self) -> tuple[str, ...]:
        """Every node listed for the shard, whatever its role."""
        return tuple(r.node for r in self.replicas)

    def role_of(self, node: str) -> Role | None:
        """The role of ``node`` for this shard, or None if it holds no replica."""
        for r in self.replicas:
            if r.node == node:
                return r.role
        return None

    def readers(self, down: frozenset[str] | set[str] = frozenset()) -> tuple[str, ...]:
        """Nodes that may serve reads: primary first, then replicas, none in ``down``."""
        first = [r.node for r in self.replicas if r.role == "primary" and r.node not in down]
        rest = [r.node for r in self.replicas if r.role == "replica" and r.node not in down]
        return (*first, *rest)

    def contains(self, key: str | bytes, slots: int = 0) -> bool:
        """Whether the shard owns ``key`` (hash shards need the key space's slot count)."""
        if self.slots:
            slot = key_hash(key) % slots
            return any(a <= slot < b for a, b in self.slots)
        kb = key_bytes(key)
        return self.start <= kb and (self.end is None or kb < self.end)

    def slot_count(self) -> int:
        """How many slots a hash shard owns (0 for a range shard)."""
        return sum(b - a for a, b in self.slots)

    def to_wire(self, kind: Kind) -> ShardDoc:
        """The shard as a wire map; ``kind`` says which bounds to write."""
        doc: ShardDoc = {
            "id": self.id,
            "state": self.state,
            "replicas": [r.to_wire() for r in self.replicas],
        }
        if kind == "hash":
            doc["slots"] = [[a, b] for a, b in self.slots]
        else:
            doc["start"] = self.start
            doc["end"] = self.end
        return doc


@dataclass(frozen=True, slots=True)
class ShardRoute:
    """Where requests for one shard go: the primary for writes, ``readers`` for reads.

    ``readers`` are the replicas that hold the whole shard (``primary`` and
    ``replica`` roles) on nodes not known to be down, primary first; joining
    and leaving replicas are never in it.
    """

    keyspace: str
    shard: str
    primary: str | None
    readers: tuple[str, ...]
    epoch: int

    def to_wire(self) -> RouteDoc:
        """The route as a wire map ``{"keyspace", "shard", "primary", "readers", "epoch"}``."""
        return {
            "keyspace": self.keyspace,
            "shard": self.shard,
            "primary": self.primary,
            "readers": list(self.readers),
            "epoch": self.epoch,
        }


def _valid_name(value: object, what: str) -> str:
    if not isinstance(value, str) or not value or len(value) > MAX_NAME:
        raise BadRequest(f"{what} must be a non-empty string of at most {MAX_NAME} characters, got {value!r}")
    return value


def _check_replicas(shard_id: str, replicas: tuple[Replica, ...]) -> None:
    # Run for every shard of every map a reader decodes: the names are checked
    # inline and only a bad one pays for the message.
    primaries = 0
    for r in replicas:
        node = r.node
        if not isinstance(node, str) or not node or len(node) > MAX_NAME:
            _valid_name(node, f"node of a replica of shard {shard_id}")
        if r.role not in ROLES:
            raise BadRequest(f"shard {shard_id}: role {r.role!r} is not one of {', '.join(ROLES)}")
        primaries += r.role == "primary"
    if len({r.node for r in replicas}) != len(replicas):
        seen: set[str] = set()
        for r in replicas:
            if r.node in seen:
                raise BadRequest(f"shard {shard_id} lists node {r.node} twice")
            seen.add(r.node)
    if primaries > 1:
        raise BadRequest(f"shard {shard_id} has {primaries} primaries; at most one is allowed")


@dataclass(frozen=True, slots=True)
class Keyspace:
    """A key space: its kind, replication factor and shards, validated on creation.

    Hash key spaces list their shards in slot order and keep a slot -> shard
    table; range key spaces list them in key order and bisect over the starts.
    Construction raises :class:`BadRequest` unless the shards cover every key
    exactly once.
    """

    name: str
    kind: Kind
    rf: int
    shards: tuple[Shard, ...]
    slots: int = 0
    _table: tuple[Shard, ...] = field(default=(), init=False, repr=False, compare=False)
    _starts: tuple[bytes, ...] = field(default=(), init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        _valid_name(self.name, "key space name")
        if self.kind not in KINDS:
            raise BadRequest(f"key space {self.name}: kind {self.kind!r} is not hash or range")
        if type(self.rf) is not int or not 1 <= self.rf <= 64:
            raise BadRequest(f"key space {self.name}: rf must be an integer 1..64, got {self.rf!r}")
        if not self.shards:
            raise BadRequest(f"key space {self.name} has no shards")
        ids: set[str] = set()
        for sh in self.shards:
            _valid_name(sh.id, f"shard id in key space {self.name}")
            if sh.id in ids:
                raise BadRequest(f"key space {self.name} lists shard {sh.id} twice")
            ids.add(sh.id)
            if sh.state not in STATES:
                raise BadRequest(f"shard {sh.id}: state {sh.state!r} is not active or moving")
            _check_replicas(sh.id, sh.replicas)
        if self.kind == "hash":
            self._build_table()
        else:
            self._build_bounds()

    def _build_table(self) -> None:
        if type(self.slots) is not int or not 1 <= self.slots <= MAX_SLOTS:
            raise BadRequest(f"key space {self.name}: slots must be 1..{MAX_SLOTS}, got {self.slots!r}")
        # Built from sorted ranges rather than slot by slot: a client decodes the
        # map on every epoch, and a per-slot loop cost milliseconds at 16k slots.
        spans: list[tuple[int, int, Shard]] = []
        for sh in self.shards:
            if not sh.slots:
                raise BadRequest(f"hash shard {sh.id} owns no slots")
            for a, b in sh.slots:
                if type(a) is not int or type(b) is not int or not 0 <= a < b <= self.slots:
                    raise BadRequest(f"shard {sh.id}: slot range [{a!r}, {b!r}) is outside 0..{self.slots}")
                spans.append((a, b, sh))
        spans.sort(key=lambda span: span[0])
        table: list[Shard] = []
        missing = 0
        first_missing = -1
        for a, b, sh in spans:
            pos = len(table)
            if a < pos:
                raise BadRequest(f"slot {a} of key space {self.name} belongs to both {table[a].id} and {sh.id}")
            if a > pos:
                missing += a - pos
                first_missing = pos if first_missing < 0 else first_missing
                table.extend([sh] * (a - pos))  # placeholder; the map is refused below
            table.extend([sh] * (b - a))
        if len(table) < self.slots:
            missing += self.slots - len(table)
            first_missing = len(table) if first_missing < 0 else first_missing
        if missing:
            raise BadRequest(f"key space {self.name}: {missing} slots have no shard (first {first_missing})")
        object.__setattr__(self, "_table", tuple(table))

    def _build_bounds(self) -> None:
        if self.slots != 0:
            raise BadRequest(f"range key space {self.name} must have slots 0, got {self.slots!r}")
        expect: bytes | None = b""
        for i, sh in enumerate(self.shards):
            if sh.slots:
                raise BadRequest(f"range shard {sh.id} must not own slots")
            if type(sh.start) is not bytes or not (sh.end is None or type(sh.end) is bytes):
                raise BadRequest(f"range shard {sh.id}: bounds must be bytes (end may be None)")
            if expect is None or sh.start != expect:
                raise BadRequest(
                    f"range shard {sh.id} starts at {sh.start!r}, expected "
                    f"{expect!r}: ranges must be sorted, contiguous, from b''"
                )
            if sh.end is not None and sh.end <= sh.start:
                raise BadRequest(f"range shard {sh.id} is empty: end {sh.end!r} <= start {sh.start!r}")
            if sh.end is None and i != len(self.shards) - 1:
                raise BadRequest(f"range shard {sh.id} is unbounded but is not the last")
            expect = sh.end
        if expect is not None:
            raise BadRequest(
                f"the last shard of key space {self.name} must end at None (no upper bound), not {expect!r}"
            )
        object.__setattr__(self, "_starts", tuple(sh.start for sh in self.shards))

    def lookup(self, key: str | bytes) -> Shard:
        """The shard that owns ``key``; :class:`BadRequest` for keys that are not str/bytes."""
        # The hot path of every client: the encode and hash are inlined on purpose.
        if type(key) is str:
            try:
                data = key.encode("utf-8")
            except UnicodeEncodeError:
                data = key_bytes(key)
        elif type(key) is bytes:
            data = key
        else:
            data = key_bytes(key)
        if self._table:
            return self._table[_from_bytes(_blake2b(data, digest_size=8).digest(), "little") % self.slots]
        return self.shards[bisect_right(self._starts, data) - 1]

    def slot_of(self, key: str | bytes) -> int:
        """The slot of ``key`` in a hash key space (:class:`BadRequest` for range ones)."""
        if self.kind != "hash":
            raise BadRequest(f"key space {self.name} is a range key space and has no slots")
        return key_hash(key) % self.slots

    def index(self, shard_id: str) -> int:
        """Position of a shard in key order (:class:`NotFound` if absent)."""
        for i, sh in enumerate(self.shards):
            if sh.id == shard_id:
                return i
        raise NotFound(f"key space {self.name} has no shard {shard_id}", shard=shard_id)

    def to_wire(self) -> KeyspaceDoc:
        """The key space as a wire map."""
        return {
            "name": self.name,
            "kind": self.kind,
            "rf": self.rf,
            "slots": self.slots,
            "shards": [sh.to_wire(self.kind) for sh in self.shards],
        }


@dataclass(frozen=True, slots=True)
class ShardMap:
    """The whole map at one epoch: key spaces, shards, replicas and down nodes.

    Build one with the constructor (validated) or :meth:`from_wire` /
    :meth:`unpack`; the sharding service makes a new one for every epoch.
    """

    epoch: int
    keyspaces: tuple[Keyspace, ...] = ()
    down: frozenset[str] = frozenset()
    _by_name: dict[str, Keyspace] = field(default_factory=dict, init=False, repr=False, compare=False)
    _by_shard: dict[str, tuple[Keyspace, Shard]] = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if type(self.epoch) is not int or self.epoch < 0:
            raise BadRequest(f"epoch must be a non-negative integer, got {self.epoch!r}")
        for ks in self.keyspaces:
            if ks.name in self._by_name:
                raise BadRequest(f"key space {ks.name} appears twice in the map")
            self._by_name[ks.name] = ks
            for sh in ks.shards:
                if sh.id in self._by_shard:
                    raise BadRequest(f"shard id {sh.id} appears in two key spaces")
                self._by_shard[sh.id] = (ks, sh)
        for node in self.down:
            _valid_name(node, "down node id")

    # -- routing ---------------------------------------------------------------

    def keyspace(self, name: str) -> Keyspace:
        """The key space called ``name``; :class:`NoSuchKeyspace` if there is none."""
        ks = self._by_name.get(name)
        if ks is None:
            raise NoSuchKeyspace(f"no key space {name!r}; known: {', '.join(self._by_name) or 'none'}", keyspace=name)
        return ks

    def lookup(self, keyspace: str, key: str | bytes) -> Shard:
        """The shard of ``keyspace`` that owns ``key``.

        :class:`NoSuchKeyspace` for an unknown key space, :class:`BadRequest` for
        a key that is not str or bytes.
        """
        ks = self._by_name.get(keyspace)
        if ks is None:
            raise self._no_keyspace(keyspace)
        return ks.lookup(key)

    def _no_keyspace(self, name: object) -> NoSuchKeyspace:
        return NoSuchKeyspace(f"no key space {name!r}; known: {', '.join(self._by_name) or 'none'}", keyspace=str(name))

    def route(self, keyspace: str, key: str | bytes) -> ShardRoute:
        """The :class:`ShardRoute` (primary and live readers) of the shard owning ``key``."""
        return self._route(self.keyspace(keyspace).name, self.lookup(keyspace, key))

    def _route(self, keyspace: str, sh: Shard) -> ShardRoute:
        primary = sh.primary
        if primary in self.down:
            primary = None
        return ShardRoute(keyspace, sh.id, primary, sh.readers(self.down), self.epoch)

    def routes(self) -> dict[str, ShardRoute]:
        """Per shard id, its primary and live read replicas (for balancers)."""
        return {sh.id: self._route(ks.name, sh) for ks in self.keyspaces for sh in ks.shards}

    def shard(self, shard_id: str) -> Shard:
        """The shard with this id in any key space (:class:`NotFound` if absent)."""
        return self.locate(shard_id)[1]

    def locate(self, shard_id: str) -> tuple[Keyspace, Shard]:
        """The key space and shard for a shard id (:class:`NotFound` if absent)."""
        found = self._by_shard.get(shard_id)
        if found is None:
            raise NotFound(f"no shard {shard_id!r} in the map at epoch {self.epoch}", shard=str(shard_id))
        return found

    def shards(self) -> Iterator[tuple[Keyspace, Shard]]:
        """Every ``(key space, shard)`` in map order."""
        for ks in self.keyspaces:
            for sh in ks.shards:
                yield ks, sh

    def __contains__(self, keyspace: object) -> bool:
        return keyspace in self._by_name

    # -- wire format -----------------------------------------------------------

    def to_wire(self) -> MapDoc:
        """The map as plain msgpack-able types (see docs/shardmap.md)."""
        return {
            "v": FORMAT_VERSION,
            "epoch": self.epoch,
            "keyspaces": [ks.to_wire() for ks in self.keyspaces],
            "down": sorted(self.down),
        }

    @classmethod
    def from_wire(cls, doc: object) -> ShardMap:
        """Rebuild a map from :meth:`to_wire` output; :class:`BadRequest` if malformed."""
        m = _Reader("map")
        top = m.mapping(doc)
        version = m.integer(top, "v", 1, 1 << 31)
        if version != FORMAT_VERSION:
            raise BadRequest(f"shard map format version {version} is not supported (this code reads {FORMAT_VERSION})")
        epoch = m.integer(top, "epoch", 0, 1 << 63)
        keyspaces = tuple(_keyspace_from_wire(k) for k in m.seq(top, "keyspaces"))
        down_raw = m.seq(top, "down", optional=True)
        down = frozenset(_valid_name(n, "down node id") for n in down_raw)
        return cls(epoch, keyspaces, down)

    def pack(self) -> bytes:
        """The map as msgpack bytes."""
        return cast(bytes, msgpack.packb(self.to_wire(), use_bin_type=True))

    @classmethod
    def unpack(cls, data: bytes) -> ShardMap:
        """Rebuild a map from :meth:`pack` output; :class:`BadRequest` if malformed."""
        if not isinstance(data, bytes | bytearray | memoryview):
            raise BadRequest(f"a packed shard map is bin, not {wire_type(data)}")
        try:
            doc = msgpack.unpackb(data, raw=False, strict_map_key=True)
        except (ValueError, TypeError, msgpack.UnpackException) as exc:
            raise BadRequest(f"shard map is not valid msgpack: {exc}") from exc
        return cls.from_wire(doc)


_Word = TypeVar("_Word", bound=str)


class _Reader:
    """Field access on untrusted wire maps that fails with BadRequest, naming the field."""

    def __init__(self, where: str) -> None:
        self.where = where

    def _bad(self, msg: str) -> BadRequest:
        return BadRequest(f"malformed shard map: {self.where}: {msg}")

    def mapping(self, doc: object) -> Mapping[str, Any]:
        if not isinstance(doc, Mapping):
            raise self._bad(f"expected a map, got {wire_type(doc)}")
        return doc

    def get(self, doc: Mapping[str, Any], key: str) -> Any:
        if key not in doc:
            raise self._bad(f"missing field {key!r}")
        return doc[key]

    def integer(self, doc: Mapping[str, Any], key: str, lo: int, hi: int) -> int:
        value = self.get(doc, key)
        if type(value) is not int or not lo <= value <= hi:
            raise self._bad(f"field {key!r} must be an integer {lo}..{hi}, got {value!r}")
        return value

    def text(self, doc: Mapping[str, Any], key: str) -> str:
        value = self.get(doc, key)
        if type(value) is not str or not value or len(value) > MAX_NAME:
            raise self._bad(f"field {key!r} must be a non-empty string, got {value!r}")
        return value

    def choice(self, doc: Mapping[str, Any], key: str, allowed: tuple[_Word, ...]) -> _Word:
        value = self.text(doc, key)
        if value not in allowed:
            said = " or ".join(allowed) if len(allowed) == 2 else f"one of {', '.join(allowed)}"
            raise self._bad(f"{key} must be {said}, got {value!r}")
        return cast(_Word, value)

    def seq(self, doc: Mapping[str, Any], key: str, optional: bool = False) -> list[Any]:
        if optional and key not in doc:
            return []
        value = self.get(doc, key)
        if not isinstance(value, list | tuple):
            raise self._bad(f"field {key!r} must be an array, got {wire_type(value)}")
        return list(value)


def _keyspace_from_wire(doc: object) -> Keyspace:
    r = _Reader("key space")
    d = r.mapping(doc)
    name = r.text(d, "name")
    r = _Reader(f"key space {name}")
    kind = r.choice(d, "kind", KINDS)
    rf = r.integer(d, "rf", 1, 64)
    slots = r.integer(d, "slots", 0, MAX_SLOTS)
    # Every reader of the map decodes it at every epoch (agents, the balancer, the
    # manager, each client), so well-formed shards take a fast path; anything it
    # does not expect goes through the careful one, which names what is wrong.
    replicas: dict[tuple[Any, Any], Replica] = {}
    shards = tuple(_shard_fast(s, kind, replicas) or _shard_from_wire(s, kind, r) for s in r.seq(d, "shards"))
    return Keyspace(name, kind, rf, shards, slots)


def _shard_fast(doc: object, kind: Kind, replicas: dict[tuple[Any, Any], Replica]) -> Shard | None:
    """A shard from its wire map if every field has exactly the expected type and
    value (the careful path's checks, in fewer calls); None for anything else.
    ``replicas`` shares equal :class:`Replica` values within one key space."""
    if type(doc) is not dict:
        return None
    sid, state, items = doc.get("id"), doc.get("state"), doc.get("replicas")
    if (type(sid) is not str or not sid or len(sid) > MAX_NAME or type(state) is not str
            or state not in STATES or type(items) is not list):
        return None
    reps = []
    for item in items:
        if type(item) is not dict:
            return None
        key = (item.get("node"), item.get("role"))
        rep = replicas.get(key) if type(key[0]) is str and type(key[1]) is str else None
        if rep is None:
            node, role = key
            if type(node) is not str or not node or len(node) > MAX_NAME or type(role) is not str \
                    or role not in ROLES:
                return None
            rep = replicas[key] = Replica(node, role)
        reps.append(rep)
    if kind == "hash":
        pairs = doc.get("slots")
        if type(pairs) is not list:
            return None
        ranges = []
        for pair in pairs:
            if type(pair) is not list or len(pair) != 2:
                return None
            a, b = pair
            if type(a) is not int or type(b) is not int:
                return None
            ranges.append((a, b))
        ranges.sort()
        return Shard(sid, tuple(reps), state, tuple(ranges))
    start, end = doc.get("start"), doc.get("end")
    if "start" not in doc or "end" not in doc or type(start) is not bytes \
            or not (end is None or type(end) is bytes):
        return None
    return Shard(sid, tuple(reps), state, (), start, end)


def _shard_from_wire(doc: object, kind: Kind, parent: _Reader) -> Shard:
    d = parent.mapping(doc)
    sid = parent.text(d, "id")
    r = _Reader(f"{parent.where}, shard {sid}")
    state = r.choice(d, "state", STATES)
    replicas = []
    for item in r.seq(d, "replicas"):
        rd = r.mapping(item)
        role = r.choice(rd, "role", ROLES)
        replicas.append(Replica(r.text(rd, "node"), role))
    if kind == "hash":
        ranges = []
        for pair in r.seq(d, "slots"):
            if not isinstance(pair, list | tuple) or len(pair) != 2 or any(type(v) is not int for v in pair):
                raise r._bad(f"a slot range is a pair of integers, got {pair!r}")
            ranges.append((pair[0], pair[1]))
        return Shard(sid, tuple(replicas), state, tuple(sorted(ranges)))
    start = r.get(d, "start")
    end = r.get(d, "end")
    if type(start) is not bytes or not (end is None or type(end) is bytes):
        raise r._bad(f"start and end must be bytes (end may be nil), got {start!r}, {end!r}")
    return Shard(sid, tuple(replicas), state, (), start, end)
