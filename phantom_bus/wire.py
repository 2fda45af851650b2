"""Fast multipart frame I/O for the hot paths (broker loop, worker loop).

pyzmq's ``send_multipart``/``recv_multipart`` combine ``IntFlag`` values for
every frame, and a non-blocking receive on an empty socket raises ``Again``;
together that is several microseconds per message, which the broker pays four
times per request. These helpers call the backend socket methods
(``zmq.backend.Socket``, the class pyzmq's own socket derives from) with plain
ints and ask ``EVENTS`` instead of catching ``Again``. They work on any pyzmq
socket, including the synchronous shadow of an asyncio one.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import zmq
import zmq.backend

# The backend socket (Cython or CFFI) under pyzmq's sugar layer: its methods take
# the flags as plain ints and skip the sugar's per-frame keyword handling.
_Base: Any = zmq.backend.Socket
if not issubclass(zmq.Socket, _Base):  # pragma: no cover - a pyzmq that changed its layering
    raise ImportError("phantom_bus.wire needs zmq.Socket to derive from zmq.backend.Socket")
_send = _Base.send
_recv = _Base.recv
_get = _Base.get

SNDMORE = int(zmq.SNDMORE)
RCVMORE = int(zmq.RCVMORE)
NOBLOCK = int(zmq.NOBLOCK)
_EVENTS = int(zmq.EVENTS)
_POLLIN = int(zmq.POLLIN)
_POLLOUT = int(zmq.POLLOUT)


def send_frames(sock: Any, frames: list[bytes], flags: int = 0) -> None:
    """Send ``frames`` as one message; ``flags`` (e.g. NOBLOCK) apply to every frame."""
    last = len(frames) - 1
    for i, frame in enumerate(frames):
        _send(sock, frame, (SNDMORE | flags) if i < last else flags, True, False)


def recv_frames(sock: Any, flags: int = 0) -> list[bytes]:
    """Receive one whole message as a list of bytes frames.

    Each frame is received as a :class:`zmq.Frame` and asked ``more`` (read
    from the message itself) rather than asking the socket ``RCVMORE``: pyzmq
    maps every socket-option read through an Enum, which costs more than the
    receive, and this is every frame of every message on the hot paths."""
    frame = _recv(sock, flags, False, False)
    frames = [frame.bytes]
    while frame.more:
        frame = _recv(sock, 0, False, False)
        frames.append(frame.bytes)
    return frames


def recv_frames_as(sock: Any, flags: int = 0) -> tuple[list[bytes], str | None]:
    """Like :func:`recv_frames`, plus the message's ZAP ``User-Id`` (None without one).

    The property lives on every frame of the message; it is read from the first.
    """
    first = _recv(sock, flags, False, False)
    try:
        user: str | None = first.get("User-Id")
    except zmq.ZMQError:
        user = None
    frames = [first.bytes]
    frame = first
    while frame.more:
        frame = _recv(sock, 0, False, False)
        frames.append(frame.bytes)
    return frames, user


def readable(sock: Any) -> bool:
    """True if a message can be received now without blocking."""
    return bool(_get(sock, _EVENTS) & _POLLIN)


def writable(sock: Any) -> bool:
    """True if a message can be sent now without blocking."""
    return bool(_get(sock, _EVENTS) & _POLLOUT)


class LoopSocket:
    """A synchronous zmq socket driven by the asyncio event loop through its FD.

    zmq.asyncio wraps every send and receive in a future; on a hot path that
    is most of the per-message cost. Here receives and sends are plain
    non-blocking calls and only *waiting* goes through the loop, with the FD
    registered once for the socket's life (no epoll_ctl per message).

    The FD signals "something changed", not "a message is here", and any
    send or receive may consume that signal. So the reader callback asks
    ``EVENTS`` (which also clears the FD, so the level-triggered loop does not
    spin), :meth:`send` re-checks after sending, and a timer re-checks every
    ``recheck`` seconds as a safety net.

    Two ways to read: ``await wait()`` / ``recv_nowait()`` from a coroutine, or
    :meth:`serve`, which calls a function for each message straight from the
    loop's reader callback. The latter costs no future and no task switch per
    message, which is most of what is left of the per-request cost of a worker.
    """

    def __init__(self, sock: Any, *, recheck: float = 0.5, burst: int = 64) -> None:
        import asyncio

        self.sock = sock
        self.recheck = recheck
        self.burst = burst
        self._asyncio = asyncio
        self._waiter: Any = None
        self._loop: Any = None
        self._fd: int | None = None
        self._timer: Any = None
        self._handle: Callable[[list[bytes]], None] | None = None
        self._draining = False
        self._scheduled = False

    def _attach(self) -> None:
        self._loop = self._asyncio.get_running_loop()
        self._fd = int(self.sock.getsockopt(zmq.FD))
        self._loop.add_reader(self._fd, self._check)
        self._timer = self._loop.call_later(self.recheck, self._tick)

    def _tick(self) -> None:
        self._check()
        self._timer = self._loop.call_later(self.recheck, self._tick)

    def _check(self) -> None:
        self._scheduled = False
        if self._handle is not None:
            self._drain(self._handle)
        elif readable(self.sock):
            self._wake()

    def _drain(self, handle: Callable[[list[bytes]], None]) -> None:
        if self._draining or self._fd is None:
            return
        self._draining = True
        try:
            sock = self.sock
            for _ in range(self.burst):
                if not readable(sock):
                    return
                handle(recv_frames(sock, NOBLOCK))
                if self._fd is None:  # the handler closed the socket
                    return
            # A long burst yields to timers and other tasks, then goes on.
            self._soon()
        finally:
            self._draining = False

    def _soon(self) -> None:
        if not self._scheduled and self._loop is not None:
            self._scheduled = True
            self._loop.call_soon(self._check)

    def serve(self, handle: Callable[[list[bytes]], None]) -> None:
        """Call ``handle(frames)`` for every message from now on, from the event
        loop's reader callback (call from a coroutine). ``handle`` must not raise."""
        self._handle = handle
        if self._fd is None:
            self._attach()
        self._soon()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def wait(self) -> None:
        """Return once a message can be received (or after at most ``recheck`` seconds)."""
        if self._fd is None:
            self._attach()
        if readable(self.sock):
            return
        self._waiter = self._loop.create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None

    def recv_nowait(self) -> list[bytes] | None:
        """One whole message if one is ready, else None."""
        if not readable(self.sock):
            return None
        return recv_frames(self.sock, NOBLOCK)

    def recv_nowait_as(self) -> tuple[list[bytes], str | None] | None:
        """One whole message and its ZAP User-Id if one is ready, else None."""
        if not readable(self.sock):
            return None
        return recv_frames_as(self.sock, NOBLOCK)

    async def recv(self) -> list[bytes]:
        """The next message, waiting through the event loop."""
        while True:
            frames = self.recv_nowait()
            if frames is not None:
                return frames
            await self.wait()

    def send(self, frames: list[bytes]) -> bool:
        """Send without blocking; False if the message was dropped (high-water mark)."""
        try:
            send_frames(self.sock, frames, NOBLOCK)
            sent = True
        except zmq.Again:
            sent = False
        if self._handle is not None:
            # A send may consume the FD's signal of a message that arrived
            # meanwhile: look again soon (not now: never re-enter the handler).
            if not self._draining and readable(self.sock):
                self._soon()
        elif self._waiter is not None and readable(self.sock):
            self._wake()
        return sent

    def close(self) -> None:
        """Stop watching the FD, release any waiter, close the socket."""
        self._handle = None
        if self._fd is not None:
            self._loop.remove_reader(self._fd)
            self._fd = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._wake()
        self.sock.close(0)
