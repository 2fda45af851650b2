"""Fast multipart frame I/O for the hot paths (broker loop, worker loop).

pyzmq's ``send_multipart``/``recv_multipart`` combine ``IntFlag`` values for
every frame, and a non-blocking receive on an empty socket raises ``Again``;
together that is several microseconds per message, which the broker pays four
times per request. These helpers call the Cython socket methods with plain
ints and ask ``EVENTS`` instead of catching ``Again``. They work on any pyzmq
socket, including the synchronous shadow of an asyncio one.
"""

from __future__ import annotations

from typing import Any

import zmq

_Base: Any = zmq.Socket.__mro__[1]  # the Cython socket under pyzmq's sugar layer
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
    """Receive one whole message as a list of bytes frames."""
    frames = [_recv(sock, flags, True, False)]
    while _get(sock, RCVMORE):
        frames.append(_recv(sock, 0, True, False))
    return frames


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
    non-blocking calls, and only *waiting* goes through the loop. The socket
    FD is edge-triggered and any send or receive may consume the edge of a
    message that arrived meanwhile, so :meth:`send` wakes a waiting reader
    when a message is ready, and waits also time out every ``recheck``
    seconds as a safety net.
    """

    def __init__(self, sock: Any, *, recheck: float = 0.5) -> None:
        import asyncio

        self.sock = sock
        self.recheck = recheck
        self._asyncio = asyncio
        self._waiter: Any = None
        self._fd: int | None = None

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def wait(self) -> None:
        """Return once a message can be received (or after ``recheck`` seconds)."""
        if readable(self.sock):
            return
        loop = self._asyncio.get_running_loop()
        self._waiter = loop.create_future()
        self._fd = int(self.sock.getsockopt(zmq.FD))
        loop.add_reader(self._fd, self._wake)
        timer = loop.call_later(self.recheck, self._wake)
        try:
            if not readable(self.sock):
                await self._waiter
        finally:
            timer.cancel()
            if self._fd is not None:
                loop.remove_reader(self._fd)
                self._fd = None
            self._waiter = None

    def recv_nowait(self) -> list[bytes] | None:
        """One whole message if one is ready, else None."""
        if not readable(self.sock):
            return None
        return recv_frames(self.sock, NOBLOCK)

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
        if self._waiter is not None and readable(self.sock):
            self._wake()
        return sent

    def close(self) -> None:
        """Stop waiting and close the socket."""
        if self._fd is not None:
            self._asyncio.get_running_loop().remove_reader(self._fd)
            self._fd = None
        self._wake()
        self.sock.close(0)
