"""The multi-host store: etcd v3 over gRPC, through the ``aetcd`` client.

``aetcd`` (asyncio, grpcio) provides the connection and etcd's generated
protocol stubs; this module speaks the KV, Lease and Watch services with
them directly, so that one transaction carries the compares, the fence and,
on failure, the reads that tell a fenced writer from a lost compare-and-swap.

Several endpoints (``etcd://h1:p1,h2:p2``) are tried in turn: a call that
finds its endpoint unreachable raises :class:`StoreError` and the next call
goes to the next endpoint. Every unary call carries a gRPC deadline of
``timeout``; a watch's stream has none (it lives as long as the watcher) but
the channel's keepalive notices a dead connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, TypeVar

import aetcd
import grpc
from aetcd import rpc

from phantom_bus.errors import BadRequest, PhantomError
from phantom_bus.store.base import (
    Change,
    Compacted,
    Compare,
    Entry,
    Fence,
    LeaseExpired,
    Op,
    Put,
    StoreBase,
    StoreError,
    cas_failed,
    check_key,
    check_start_revision,
    check_ttl,
    check_txn,
    precondition_failure,
    prefix_end,
)

T = TypeVar("T")

_CHANNEL_OPTIONS = {
    "grpc.max_receive_message_length": 64 * 1024 * 1024,  # a whole shard map in one range
    "grpc.max_send_message_length": 16 * 1024 * 1024,
    # etcd refuses pings more often than every 5 s (too_many_pings), so 10 s.
    "grpc.keepalive_time_ms": 10_000,
    "grpc.keepalive_timeout_ms": 5_000,
    "grpc.keepalive_permit_without_calls": 1,
}


class EtcdStore(StoreBase):
    """A :class:`~phantom_bus.store.base.Store` on an etcd v3 cluster."""

    name = "etcd"

    def __init__(
        self, endpoints: Sequence[tuple[str, int]], *, prefix: str = "/phantom/", timeout: float = 5.0
    ) -> None:
        if not endpoints:
            raise BadRequest("an etcd store needs at least one HOST:PORT endpoint")
        self.endpoints = list(endpoints)
        self.prefix = prefix
        self.timeout = timeout
        self._index = 0
        self._client: aetcd.Client | None = None
        self._closed = False

    # --- connection ---------------------------------------------------------------

    @property
    def endpoint(self) -> str:
        """The endpoint calls go to now."""
        host, port = self.endpoints[self._index]
        return f"{host}:{port}"

    async def _connected(self) -> aetcd.Client:
        if self._closed:
            raise StoreError("etcd store is closed")
        if self._client is None:
            host, port = self.endpoints[self._index]
            client = aetcd.Client(host=host, port=port, timeout=math.ceil(self.timeout), options=_CHANNEL_OPTIONS)
            await client.connect()
            self._client = client
        return self._client

    async def _drop(self) -> None:
        client, self._client = self._client, None
        self._index = (self._index + 1) % len(self.endpoints)
        if client is not None:
            with contextlib.suppress(TimeoutError, grpc.RpcError, aetcd.ClientError, OSError):
                async with asyncio.timeout(1.0):
                    await client.close()

    async def _call(self, fn: Callable[[aetcd.Client], Awaitable[T]]) -> T:
        where = self.endpoint
        try:
            client = await self._connected()
            # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancel (see memory.py).
            async with asyncio.timeout(self.timeout + 0.5):
                return await fn(client)
        except PhantomError:
            raise
        except TimeoutError:
            await self._drop()
            raise StoreError(f"etcd {where}: no answer within {self.timeout:g} s") from None
        except grpc.aio.AioRpcError as exc:
            raise await self._rpc_error(where, exc) from exc
        except (aetcd.ClientError, OSError) as exc:
            await self._drop()
            raise StoreError(f"etcd {where}: {exc}", cause=str(exc)) from exc

    async def _rpc_error(self, where: str, exc: grpc.aio.AioRpcError) -> PhantomError:
        details = exc.details() or exc.code().name
        if exc.code() == grpc.StatusCode.NOT_FOUND and "lease not found" in details:
            return LeaseExpired(f"etcd: {details}")
        if exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.UNKNOWN):
            await self._drop()
        return StoreError(f"etcd {where}: {details}", cause=details)

    def _full(self, key: str) -> bytes:
        return (self.prefix + check_key(key)).encode()

    def _entry(self, kv: Any) -> Entry:
        key = kv.key.decode()[len(self.prefix) :]
        return Entry(key, bytes(kv.value), kv.create_revision, kv.mod_revision, kv.version, kv.lease or None)

    # --- reads ----------------------------------------------------------------------

    async def get(self, key: str) -> Entry | None:
        request = rpc.RangeRequest(key=self._full(key))

        async def run(client: aetcd.Client) -> Entry | None:
            response = await client.kvstub.Range(request, timeout=self.timeout, metadata=client.metadata)
            return self._entry(response.kvs[0]) if response.kvs else None

        return await self._call(run)

    async def range(self, prefix: str) -> tuple[list[Entry], int]:
        low = (self.prefix + prefix).encode()
        high = prefix_end(self.prefix + prefix).encode() or b"\x00"
        request = rpc.RangeRequest(key=low, range_end=high)

        async def run(client: aetcd.Client) -> tuple[list[Entry], int]:
            response = await client.kvstub.Range(request, timeout=self.timeout, metadata=client.metadata)
            return [self._entry(kv) for kv in response.kvs], response.header.revision

        return await self._call(run)

    # --- writes ---------------------------------------------------------------------

    async def txn(self, compares: Sequence[Compare], ops: Sequence[Op], fence: Fence | None = None) -> int:
        check_txn(compares, ops, fence)
        checks = ([Compare(fence.key, fence.revision)] if fence else []) + list(compares)
        request = rpc.TxnRequest()
        for compare in checks:
            request.compare.append(
                rpc.Compare(
                    key=self._full(compare.key),
                    target=rpc.Compare.MOD,
                    result=rpc.Compare.EQUAL,
                    mod_revision=compare.mod_revision,
                )
            )
            # On failure, read every compared key to say which compare failed.
            request.failure.append(rpc.RequestOp(request_range=rpc.RangeRequest(key=self._full(compare.key))))
        for op in ops:
            if isinstance(op, Put):
                put = rpc.PutRequest(key=self._full(op.key), value=op.value, lease=op.lease or 0)
                request.success.append(rpc.RequestOp(request_put=put))
            else:
                request.success.append(
                    rpc.RequestOp(request_delete_range=rpc.DeleteRangeRequest(key=self._full(op.key)))
                )

        async def run(client: aetcd.Client) -> Any:
            return await client.kvstub.Txn(request, timeout=self.timeout, metadata=client.metadata)

        response = await self._call(run)
        if response.succeeded:
            return int(response.header.revision)
        read = {}  # every compared key, read back in the same revision
        for i, compare in enumerate(checks):
            kvs = response.responses[i].response_range.kvs
            read[compare.key] = kvs[0].mod_revision if kvs else 0
        failed = precondition_failure(compares, fence, read.__getitem__)
        if failed is not None:
            raise failed
        # Every compare holds when read back: a concurrent writer moved and restored nothing we can name.
        raise cas_failed(checks[0].key, checks[0].mod_revision, checks[0].mod_revision)

    # --- history --------------------------------------------------------------------

    async def watch(self, prefix: str, start_revision: int) -> AsyncIterator[Change]:
        check_start_revision(start_revision)
        low = self.prefix + prefix
        create = rpc.WatchCreateRequest(
            key=low.encode(), range_end=prefix_end(low).encode() or b"\x00", start_revision=start_revision
        )
        cut = len(self.prefix)
        where = self.endpoint
        client = await self._call(lambda c: _identity(c))
        call = rpc.WatchStub(client.channel).Watch(metadata=client.metadata)
        try:
            try:
                async with asyncio.timeout(self.timeout):
                    await call.write(rpc.WatchRequest(create_request=create))
                while True:
                    response = await call.read()
                    if response is grpc.aio.EOF:
                        raise StoreError(f"etcd {where}: watch stream ended")
                    if response.compact_revision:
                        raise Compacted(
                            f"revision {start_revision} is compacted (etcd kept history from "
                            f"{response.compact_revision})",
                            revision=start_revision,
                            compacted=response.compact_revision - 1,
                        )
                    if response.canceled:
                        raise StoreError(f"etcd {where}: watch canceled: {response.cancel_reason or 'no reason'}")
                    for event in response.events:
                        kv = event.kv
                        if event.type == rpc.Event.DELETE:
                            yield Change("delete", kv.key.decode()[cut:], None, kv.mod_revision)
                        else:
                            yield Change("put", kv.key.decode()[cut:], bytes(kv.value), kv.mod_revision)
            except TimeoutError:
                await self._drop()
                raise StoreError(f"etcd {where}: watch not created within {self.timeout:g} s") from None
            except grpc.aio.AioRpcError as exc:
                raise await self._rpc_error(where, exc) from exc
        finally:
            call.cancel()

    async def compact(self, revision: int) -> None:

        async def run(client: aetcd.Client) -> None:
            try:
                await client.kvstub.Compact(
                    rpc.CompactionRequest(revision=revision), timeout=self.timeout, metadata=client.metadata
                )
            except grpc.aio.AioRpcError as exc:
                details = exc.details() or ""
                if "has been compacted" in details:
                    return  # already compacted at least that far
                if "future revision" in details:
                    raise BadRequest(f"cannot compact to {revision}: {details}") from None
                raise

        await self._call(run)

    # --- leases ---------------------------------------------------------------------

    async def grant(self, ttl: float) -> int:
        """As :class:`~phantom_bus.store.base.Store` says. etcd counts whole seconds: ``ttl`` is rounded up."""
        check_ttl(ttl)

        async def run(client: aetcd.Client) -> int:
            response = await client.leasestub.LeaseGrant(
                rpc.LeaseGrantRequest(TTL=math.ceil(ttl)), timeout=self.timeout, metadata=client.metadata
            )
            if response.error:
                raise StoreError(f"etcd {self.endpoint}: lease grant refused: {response.error}")
            return int(response.ID)

        return await self._call(run)

    async def keepalive(self, lease: int) -> float:

        async def run(client: aetcd.Client) -> float:
            call = client.leasestub.LeaseKeepAlive(timeout=self.timeout, metadata=client.metadata)
            try:
                await call.write(rpc.LeaseKeepAliveRequest(ID=lease))
                response = await call.read()
            finally:
                call.cancel()
            if response is grpc.aio.EOF:
                raise StoreError(f"etcd {self.endpoint}: keepalive stream ended")
            if response.TTL <= 0:
                raise LeaseExpired(f"lease {lease} not found (expired or revoked)", lease=lease)
            return float(response.TTL)

        return await self._call(run)

    async def revoke(self, lease: int) -> None:

        async def run(client: aetcd.Client) -> None:
            try:
                await client.leasestub.LeaseRevoke(
                    rpc.LeaseRevokeRequest(ID=lease), timeout=self.timeout, metadata=client.metadata
                )
            except grpc.aio.AioRpcError as exc:
                if exc.code() != grpc.StatusCode.NOT_FOUND:
                    raise

        await self._call(run)

    async def close(self) -> None:
        self._closed = True
        client, self._client = self._client, None
        if client is not None:
            with contextlib.suppress(TimeoutError, grpc.RpcError, aetcd.ClientError, OSError):
                async with asyncio.timeout(self.timeout):
                    await client.close()


async def _identity(client: aetcd.Client) -> aetcd.Client:
    return client
