"""The shard map value: key hash, lookups, validation and the wire format."""

from __future__ import annotations

import contextlib
import enum
import hashlib
from bisect import bisect_right

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from phantom_bus.errors import BadRequest, NoSuchKeyspace, NotFound
from phantom_bus.shardmap import (
    Keyspace,
    Replica,
    Shard,
    ShardMap,
    key_bytes,
    key_hash,
)

# The same vectors are in docs/shardmap.md; b2sum -l 64 gives the digests.
VECTORS: list[tuple[str | bytes, int]] = [
    ("", 13020603013274838756),
    ("a", 3405396810240292928),
    ("user:42", 9417771961093400537),
    ("hello world", 5814608031911216775),
    ("Zürich", 636548684707296368),
    ("日本語", 5222810888430230004),
    ("🙂", 13229221042092380345),
    (b"", 13020603013274838756),
    (b"\x00", 5224996704525874836),
    (b"\xff\xfe\x00\x01", 7088319355023427146),
]


@pytest.mark.parametrize(("key", "expected"), VECTORS)
def test_key_hash_matches_pinned_vectors(key: str | bytes, expected: int) -> None:
    assert key_hash(key) == expected


def test_key_hash_is_blake2b_8_little_endian() -> None:
    digest = hashlib.blake2b(b"user:42", digest_size=8).digest()
    assert key_hash("user:42") == int.from_bytes(digest, "little")
    assert 0 <= key_hash("x") < 2**64


def test_str_and_its_utf8_bytes_hash_alike() -> None:
    assert key_hash("Zürich") == key_hash("Zürich".encode())


@pytest.mark.parametrize(
    ("key", "name"),
    [(42, "int"), (4.2, "float"), (None, "nil"), (True, "bool"), (["a"], "array"), ({"a": 1}, "map"),
     (("a",), "tuple"), (bytearray(b"a"), "bytearray"), (object(), "object")],
)  # fmt: skip
def test_odd_key_types_are_refused_naming_the_type(key: object, name: str) -> None:
    with pytest.raises(BadRequest) as err:
        key_hash(key)  # type: ignore[arg-type]
    assert f"not {name};" in err.value.message and err.value.details["type"] == name


def test_lone_surrogate_is_a_bad_request_not_a_unicode_error() -> None:
    with pytest.raises(BadRequest):
        key_hash("\ud800")
    with pytest.raises(BadRequest):
        key_bytes("a\udfffb")


def test_str_subclass_routes_like_the_plain_string() -> None:
    class Color(enum.StrEnum):
        RED = "red"

    assert key_hash(Color.RED) == key_hash("red")


def hash_space(n: int = 8, slots: int = 64, name: str = "h") -> Keyspace:
    shards = tuple(
        Shard(
            f"{name}/{i}",
            (Replica(f"n{i % 3}", "primary"), Replica(f"n{(i + 1) % 3}", "replica")),
            slots=((i * slots // n, (i + 1) * slots // n),),
        )
        for i in range(n)
    )
    return Keyspace(name, "hash", 2, shards, slots)


def range_space(points: list[bytes], name: str = "r") -> Keyspace:
    bounds: list[bytes | None] = [b"", *points, None]
    shards = tuple(
        Shard(f"{name}/{i}", (Replica("n0", "primary"),), start=bounds[i] or b"", end=bounds[i + 1])
        for i in range(len(bounds) - 1)
    )
    return Keyspace(name, "range", 1, shards)


def test_hash_lookup_uses_slot_of_key_hash() -> None:
    ks = hash_space(8, 64)
    m = ShardMap(3, (ks,))
    keys: list[str | bytes] = ["", "user:42", "Zürich", b"\x00", "k" * 1000]
    for key in keys:
        slot = key_hash(key) % 64
        assert m.lookup("h", key).id == f"h/{slot // 8}"


@given(
    st.lists(st.binary(min_size=1, max_size=6), min_size=0, max_size=12, unique=True),
    st.lists(st.one_of(st.binary(max_size=8), st.text(max_size=8)), min_size=1, max_size=40),
)
@settings(max_examples=150, deadline=None)
def test_range_lookup_agrees_with_brute_force(points: list[bytes], keys: list[str | bytes]) -> None:
    points = sorted(p for p in points if p)
    ks = range_space(points)
    m = ShardMap(1, (ks,))
    bounds: list[bytes | None] = [b"", *points, None]
    for key in keys:
        kb = key.encode() if isinstance(key, str) else key
        oracle = next(
            i
            for i in range(len(bounds) - 1)
            if bounds[i] <= kb and (bounds[i + 1] is None or kb < bounds[i + 1])  # type: ignore[operator]
        )
        got = m.lookup("r", key)
        assert got.id == f"r/{oracle}"
        assert got.contains(key)
        assert bisect_right(points, kb) == oracle


def test_unknown_keyspace_raises_no_such_keyspace() -> None:
    m = ShardMap(1, (hash_space(),))
    with pytest.raises(NoSuchKeyspace):
        m.lookup("nope", "k")
    with pytest.raises(NoSuchKeyspace):
        m.route("nope", "k")


def test_route_lists_primary_and_serving_replicas_but_not_down_or_joining() -> None:
    sh = Shard(
        "h/0",
        (
            Replica("a", "replica"),
            Replica("b", "primary"),
            Replica("c", "joining"),
            Replica("d", "leaving"),
            Replica("e", "replica"),
        ),
        slots=((0, 4),),
    )
    m = ShardMap(9, (Keyspace("h", "hash", 3, (sh,), 4),), down=frozenset({"e"}))
    route = m.route("h", "anything")
    assert route.primary == "b"
    assert route.readers == ("b", "a")
    assert route.epoch == 9
    assert m.routes()["h/0"] == route


def test_route_of_a_shard_whose_primary_is_down_has_no_primary() -> None:
    sh = Shard("h/0", (Replica("a", "primary"), Replica("b", "replica")), slots=((0, 1),))
    m = ShardMap(1, (Keyspace("h", "hash", 2, (sh,), 1),), down=frozenset({"a"}))
    assert m.route("h", "k").primary is None
    assert m.route("h", "k").readers == ("b",)


def full_map() -> ShardMap:
    return ShardMap(
        42,
        (hash_space(8, 64), range_space([b"g", b"p\xff", "ü".encode()])),
        down=frozenset({"n2"}),
    )


def test_wire_round_trip_is_exact() -> None:
    m = full_map()
    assert ShardMap.from_wire(m.to_wire()) == m
    back = ShardMap.unpack(m.pack())
    assert back == m
    assert back.down == frozenset({"n2"})
    assert back.lookup("r", "zzz").id == m.lookup("r", "zzz").id


def test_wire_uses_only_plain_types() -> None:
    doc = full_map().to_wire()
    assert doc["v"] == 1
    rng = doc["keyspaces"][1]["shards"]
    assert rng[0]["start"] == b"" and isinstance(rng[-1]["start"], bytes) and rng[-1]["end"] is None
    assert doc["keyspaces"][0]["shards"][0]["slots"] == [[0, 8]]
    assert doc["keyspaces"][0]["shards"][0]["replicas"][0] == {"node": "n0", "role": "primary"}
    msgpack.packb(doc, use_bin_type=True)


def corrupt(path: list[object], value: object) -> dict:
    doc = full_map().to_wire()
    target: object = doc
    for p in path[:-1]:
        target = target[p]  # type: ignore[index]
    if value is KeyError:
        del target[path[-1]]  # type: ignore[attr-defined]
    else:
        target[path[-1]] = value  # type: ignore[index]
    return doc


@pytest.mark.parametrize(
    ("path", "value"),
    [
        (["v"], 99),
        (["v"], KeyError),
        (["epoch"], -1),
        (["epoch"], "7"),
        (["keyspaces"], {"a": 1}),
        (["keyspaces", 0, "kind"], "tree"),
        (["keyspaces", 0, "rf"], 0),
        (["keyspaces", 0, "slots"], 0),
        (["keyspaces", 0, "shards"], []),
        (["keyspaces", 0, "shards", 0, "slots"], [[0, 7]]),  # slot 7 owned by nobody
        (["keyspaces", 0, "shards", 1, "slots"], [[0, 16]]),  # overlap
        (["keyspaces", 0, "shards", 0, "slots"], [["0", 8]]),
        (["keyspaces", 0, "shards", 0, "replicas"], [{"node": "a", "role": "boss"}]),
        (
            ["keyspaces", 0, "shards", 0, "replicas"],
            [{"node": "a", "role": "primary"}, {"node": "b", "role": "primary"}],
        ),
        (
            ["keyspaces", 0, "shards", 0, "replicas"],
            [{"node": "a", "role": "replica"}, {"node": "a", "role": "replica"}],
        ),
        (["keyspaces", 0, "shards", 0, "replicas", 0], "n0"),
        (["keyspaces", 0, "shards", 0, "id"], KeyError),
        (["keyspaces", 0, "shards", 0, "state"], "sleeping"),
        (["keyspaces", 1, "shards", 0, "start"], b"a"),  # does not start at b""
        (["keyspaces", 1, "shards", 1, "start"], b"h"),  # gap
        (["keyspaces", 1, "shards", 3, "end"], b"zz"),  # last must be unbounded
        (["keyspaces", 1, "shards", 1, "end"], "p"),  # str bound
        (["keyspaces", 1, "shards", 1, "end"], b"g"),  # empty range
        (["keyspaces", 1, "name"], "h"),  # duplicate key space
        (["down"], [3]),
    ],
)
def test_malformed_wire_maps_raise_bad_request(path: list[object], value: object) -> None:
    with pytest.raises(BadRequest):
        ShardMap.from_wire(corrupt(path, value))


@pytest.mark.parametrize("doc", [None, 3, "map", [], {"v": 1}])
def test_non_map_documents_raise_bad_request(doc: object) -> None:
    with pytest.raises(BadRequest):
        ShardMap.from_wire(doc)


@pytest.mark.parametrize("data", [b"", b"\xc1", b"\x92\x01", msgpack.packb([1, 2]), b"\x81\x01\x02", "text"])
def test_unpack_of_garbage_raises_bad_request(data: bytes) -> None:
    with pytest.raises(BadRequest):
        ShardMap.unpack(data)


@given(st.binary(max_size=64))
@settings(max_examples=200, deadline=None)
def test_unpack_never_raises_anything_but_bad_request(data: bytes) -> None:
    with contextlib.suppress(BadRequest):
        ShardMap.unpack(data)


def test_locate_finds_shards_across_keyspaces_and_not_found_otherwise() -> None:
    m = full_map()
    ks, sh = m.locate("r/2")
    assert ks.name == "r" and sh.start == b"p\xff"
    with pytest.raises(NotFound):
        m.shard("r/99")


def test_shard_ids_must_be_unique_across_keyspaces() -> None:
    with pytest.raises(BadRequest):
        ShardMap(1, (hash_space(name="a"), Keyspace("b", "hash", 2, hash_space(name="a").shards, 64)))


wire_values = st.recursive(
    st.none() | st.booleans() | st.integers(-3, 70) | st.text(max_size=4) | st.binary(max_size=3),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)


@given(st.data())
@settings(max_examples=300, deadline=None)
def test_from_wire_of_mutated_maps_raises_only_bad_request(data: st.DataObject) -> None:
    doc = full_map().to_wire()
    # Replace one randomly chosen value somewhere in a valid document.
    target: object = doc
    path = []
    while isinstance(target, dict | list) and target and data.draw(st.booleans()):
        keys = list(target) if isinstance(target, dict) else list(range(len(target)))
        k = data.draw(st.sampled_from(keys))
        path.append(k)
        target = target[k]
    if not path:
        return
    parent: object = doc
    for k in path[:-1]:
        parent = parent[k]  # type: ignore[index]
    parent[path[-1]] = data.draw(wire_values)  # type: ignore[index]
    try:
        m = ShardMap.from_wire(doc)
    except BadRequest:
        return
    assert ShardMap.from_wire(m.to_wire()) == m  # whatever was accepted is a valid map
