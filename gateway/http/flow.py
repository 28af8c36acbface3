"""Flow control shared by both legs of the data path: the client connection and the upstream one.

A connection (`FlowControl`) pauses reading from its socket while the body it received waits
unread above `high_water` bytes (`BodyBuffer`), and resumes once the reader takes it; writes
wait (`drain`) while the transport's own buffer is above its high-water mark. Together these
give backpressure both ways with bounded memory: a slow client pauses the upstream socket, and a
slow upstream pauses the client's upload. (aiohttp has the same split in base_protocol.py and
streams.py, uvicorn in flow_control.py.)
"""

from __future__ import annotations

import asyncio
from typing import cast

# Body bytes buffered before the socket they come from is paused.
BODY_HIGH_WATER = 256 * 1024


class FlowControl(asyncio.Protocol):
    """An asyncio Protocol with pause/resume of reading and a `drain` that waits out writes."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.write_paused = False
        self._reading_paused = False
        self._drain_waiter: asyncio.Future[None] | None = None

    def connection_error(self) -> Exception:
        """The error a write or drain raises once the connection is gone."""
        return ConnectionResetError("connection closed")

    # --- asyncio.Protocol ---------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        # The transport holds the protocol: drop it so a closed connection is freed at once.
        self.transport = None
        waiter = self._drain_waiter
        if waiter is not None and not waiter.done():
            waiter.set_exception(self.connection_error())

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        waiter = self._drain_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # --- flow control -------------------------------------------------------------------

    async def drain(self) -> None:
        """Wait until the transport takes writes again; raises `connection_error()` once closed."""
        if self.closed:
            raise self.connection_error()
        if not self.write_paused:
            return
        self._drain_waiter = self.loop.create_future()
        try:
            await self._drain_waiter
        finally:
            self._drain_waiter = None

    def pause_reading(self) -> None:
        """Stop reading from the socket (the reader is behind)."""
        if not self._reading_paused and self.transport is not None and not self.closed:
            self._reading_paused = True
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        """Read from the socket again."""
        if self._reading_paused and self.transport is not None and not self.closed:
            self._reading_paused = False
            self.transport.resume_reading()

    def close(self) -> None:
        """Close the connection (connection_lost follows)."""
        self.closed = True
        transport = self.transport
        if transport is not None and not transport.is_closing():
            transport.close()


class BodyBuffer:
    """A body arriving from `source`: `read()` returns what is buffered, b"" at the end.

    While more than BODY_HIGH_WATER bytes wait unread, the source's socket is paused; taking them
    resumes it. Once the body has ended (or failed) the source is no longer touched, since the
    connection may already carry the next exchange.
    """

    __slots__ = ("_chunks", "_ended", "_error", "_size", "_source", "_waiter")

    def __init__(self, source: FlowControl) -> None:
        self._source: FlowControl | None = source
        self._chunks: list[bytes] = []
        self._size = 0
        self._ended = False
        self._error: BaseException | None = None
        self._waiter: asyncio.Future[None] | None = None

    @property
    def ended(self) -> bool:
        """The whole body has arrived (it may still be buffered here)."""
        return self._ended

    @property
    def at_eof(self) -> bool:
        """The whole body has arrived and been read."""
        return self._ended and not self._chunks

    @property
    def buffered_bytes(self) -> int:
        """Bytes arrived and not read yet."""
        return self._size

    def feed(self, data: bytes) -> None:
        """Bytes of the body arrived."""
        self._chunks.append(data)
        self._size += len(data)
        if self._size > BODY_HIGH_WATER and self._source is not None:
            self._source.pause_reading()
        self._wake()

    def feed_eof(self) -> None:
        """The body is complete."""
        self._ended = True
        self._source = None
        self._wake()

    def fail(self, exc: BaseException) -> None:
        """The body cannot complete; readers get `exc` once the buffered bytes are read."""
        if not self._ended and self._error is None:
            self._error = exc
            self._source = None
            self._wake()

    def take(self) -> bytes:
        """Whatever has arrived and not been read, without waiting."""
        chunks = self._chunks
        if not chunks:
            return b""
        data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        self._chunks = []
        self._size = 0
        if self._source is not None:
            self._source.resume_reading()
        return data

    def peek(self) -> bytes:
        """Whatever has arrived and not been read, left in place."""
        chunks = self._chunks
        if len(chunks) > 1:
            chunks[:] = [b"".join(chunks)]
        return chunks[0] if chunks else b""

    async def read(self) -> bytes:
        """The next bytes of the body; b"" once it has ended. Raises the error it failed with."""
        while not self._chunks:
            if self._ended:
                return b""
            if self._error is not None:
                raise self._error
            await self._wait()
        return self.take()

    async def wait_ended(self, limit: int) -> bool:
        """Wait, without reading, until the whole body is buffered: False once it exceeds `limit`."""
        while not self._ended:
            if self._error is not None:
                raise self._error
            if self._size > limit:
                return False
            await self._wait()
        return self._size <= limit

    async def _wait(self) -> None:
        source = self._source
        assert source is not None, "a body that has not ended has a source"
        self._waiter = source.loop.create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
