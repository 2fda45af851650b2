"""phantom-top's data path: everything that talks to the bus, in background threads.

:class:`BusFeed` polls ``Client.status()`` about once a second (and the
shard list while the shards view is open) in one thread, and listens to the
bus events on a SUB socket in another. Results go to a :class:`Sink`, which
the app turns into messages on its own queue, so no blocking call ever runs
in the UI's event loop.

With several brokers (a comma-separated ``events_out``), the SUB socket
listens to all of them and each event arrives once per broker; the listener
delivers it once (:class:`phantom_bus.events.Deduplicator`, by origin and
sequence).

Reconnection needs no special code: the client closes and reopens its socket
after a timeout (Lazy Pirate) and the next poll simply tries again; a SUB
socket reconnects and re-sends its subscriptions by itself when the broker
comes back. What the feed does is keep going whatever happens, and say so.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol

import zmq

from phantom_bus import protocol
from phantom_bus import security as secmod
from phantom_bus.client import Client
from phantom_bus.errors import BrokerUnreachable, PhantomError
from phantom_bus.events import Deduplicator
from services.top.model import EVENT_PREFIXES

#: Most events handed to the sink at once; a burst is delivered in several batches.
MAX_BATCH = 200
# How long the event thread blocks in one poll: the bound on how late it sees stop().
_EVENT_POLL_MS = 250


class Sink(Protocol):
    """Where a feed delivers what it learns. Called from the feed's threads."""

    def status(self, doc: dict[str, Any]) -> None:
        """A fresh status document."""

    def shards(self, rows: Any, error: str | None) -> None:
        """The shard list (``rows``), or why it could not be had (``error``, rows ``None``)."""

    def events(self, events: list[dict[str, Any]]) -> None:
        """Decoded bus events, oldest first."""

    def trouble(self, message: str) -> None:
        """The status could not be read: the broker is down or not answering."""


class Feed(Protocol):
    """What the app needs from its data source; tests pass a fake."""

    endpoint: str

    def start(self, sink: Sink) -> None:
        """Begin delivering to ``sink``."""

    def stop(self) -> None:
        """Stop delivering (returns at once; threads end within about a second)."""

    def want_shards(self, on: bool) -> None:
        """Also fetch the shard list on every poll, or stop doing so."""

    def poll_now(self) -> None:
        """Poll as soon as possible instead of waiting for the next tick."""

    def drain(self, node: str) -> Any:
        """Ask the manager to drain ``node`` (blocking; raises PhantomError)."""


def _guarded(fn: Callable[..., None], *args: Any) -> None:
    # The sink belongs to the app; a failing delivery (the app is closing) must
    # not end the thread that would deliver the next update.
    with contextlib.suppress(Exception):
        fn(*args)


class BusFeed:
    """The real feed: a status poller and an event listener on daemon threads."""

    def __init__(
        self,
        endpoint: str,
        events_endpoint: str | None,
        *,
        interval: float = 1.0,
        timeout: float = 2.5,
        client_factory: Callable[..., Client] = Client,
        ctx: zmq.Context[Any] | None = None,
    ) -> None:
        self.endpoint = endpoint
        self.events_endpoint = events_endpoint
        self.interval = interval
        self.timeout = timeout
        self._client_factory = client_factory
        self._ctx = ctx or zmq.Context.instance()
        self._security = secmod.current()
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._want_shards = False
        self._threads: list[threading.Thread] = []
        self._dedupe = Deduplicator()

    # --- life cycle -------------------------------------------------------------------

    def start(self, sink: Sink) -> None:
        """Start the poller and (if there is an events endpoint) the listener."""
        self._stop.clear()
        targets: list[Callable[[Sink], None]] = [self._poll_loop]
        if self.events_endpoint:
            targets.append(self._event_loop)
        for target in targets:
            name = f"phantom-top-{target.__name__.strip('_').split('_')[0]}"
            thread = threading.Thread(target=target, args=(sink,), name=name, daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop(self) -> None:
        """Ask the threads to end; does not wait (see :meth:`join`)."""
        self._stop.set()
        self._wake.set()

    def join(self, timeout: float = 3.0) -> None:
        """Wait up to ``timeout`` seconds in all for the threads to end."""
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))

    def want_shards(self, on: bool) -> None:
        """Fetch the shard list on every poll while ``on``."""
        self._want_shards = on

    def poll_now(self) -> None:
        """Wake the poller."""
        self._wake.set()

    # --- requests ---------------------------------------------------------------------

    def _client(self, retries: int = 1) -> Client:
        return self._client_factory(self.endpoint, timeout=self.timeout, retries=retries)

    def drain(self, node: str) -> Any:
        """``manager.drain`` for ``node``; raises PhantomError when it cannot be done."""
        # Its own client: the poller's is busy on another thread (a Client is not thread-safe).
        # Two attempts: drain is idempotent, and one lost reply should not fail it.
        with self._client(retries=2) as client:
            return client.request("manager", "drain", node=node)

    # --- the poller -------------------------------------------------------------------

    def _poll_loop(self, sink: Sink) -> None:
        client = self._client()
        try:
            while not self._stop.is_set():
                started = time.monotonic()
                self.poll_once(client, sink)
                self._wake.wait(max(0.0, self.interval - (time.monotonic() - started)))
                self._wake.clear()
        finally:
            client.close()

    def poll_once(self, client: Client, sink: Sink) -> None:
        """One status poll (and shard list, if wanted), delivered to ``sink``."""
        try:
            doc = client.status()
        except BrokerUnreachable as exc:
            _guarded(sink.trouble, f"{exc}; retrying every {self.interval:g} s")
            return
        except PhantomError as exc:
            _guarded(sink.trouble, f"status failed: {exc.code}: {exc}")
            return
        except Exception as exc:  # a reply we cannot read must not end the monitor
            _guarded(sink.trouble, f"status failed: {type(exc).__name__}: {exc}")
            return
        _guarded(sink.status, doc if isinstance(doc, dict) else {"reason": f"odd status reply: {doc!r:.80}"})
        if self._want_shards and not self._stop.is_set():
            try:
                rows = client.request("sharding", "shards")
            except PhantomError as exc:
                _guarded(sink.shards, None, f"the sharding service did not answer: {exc.code}: {exc}")
            except Exception as exc:
                _guarded(sink.shards, None, f"shard list failed: {type(exc).__name__}: {exc}")
            else:
                _guarded(sink.shards, rows, None)

    # --- the event listener -----------------------------------------------------------

    def _subscribe(self) -> zmq.Socket[Any]:
        sock = self._ctx.socket(zmq.SUB)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.RCVHWM, 10000)
        for prefix in EVENT_PREFIXES:
            sock.setsockopt(zmq.SUBSCRIBE, prefix.encode())
        assert self.events_endpoint
        self._security.connect(sock, self.events_endpoint)
        return sock

    def _event_loop(self, sink: Sink) -> None:
        sock: zmq.Socket[Any] | None = None
        try:
            while not self._stop.is_set():
                try:
                    if sock is None:
                        sock = self._subscribe()
                    if not sock.poll(_EVENT_POLL_MS, zmq.POLLIN):
                        self._security.retry_refused(sock)
                        continue
                    batch = self.read_events(sock, self._dedupe)
                except zmq.ZMQError:
                    # Not a broker restart (the socket handles that); something odd
                    # with the socket itself: start over with a new one.
                    if sock is not None:
                        sock.close(0)
                    sock = None
                    self._stop.wait(1.0)
                    continue
                if batch:
                    _guarded(sink.events, batch)
        finally:
            if sock is not None:
                sock.close(0)

    @staticmethod
    def read_events(sock: zmq.Socket[Any], dedupe: Deduplicator | None = None) -> list[dict[str, Any]]:
        """Every event waiting on ``sock`` (at most :data:`MAX_BATCH`); malformed ones are
        dropped, and so are copies ``dedupe`` has delivered already (another broker's)."""
        batch: list[dict[str, Any]] = []
        while len(batch) < MAX_BATCH:
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                break
            with contextlib.suppress(PhantomError):
                event = protocol.decode_event(frames)
                if dedupe is None or dedupe.accept(event):
                    batch.append(protocol.event_summary(event))
        return batch


def fetch_status(endpoint: str, timeout: float) -> dict[str, Any]:
    """One status document for ``--once``/``--json``; raises BrokerUnreachable within
    about a second when nothing answers, else PhantomError on other failures."""
    with Client(endpoint, timeout=timeout) as client:
        # A quick ping first, like the CLI: an absent broker is reported at once
        # instead of after every retry of the real request.
        if not client.ping(timeout=min(timeout, 1.0)):
            raise BrokerUnreachable(f"the broker at {endpoint} does not answer")
        return client.status()
