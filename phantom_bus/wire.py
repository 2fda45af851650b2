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
