"""Byte-level HTTP/1.1 on raw asyncio streams, for tests that need to see or misbehave on the wire.

Deliberately independent of the gateway's own parsing code (and of httptools), so it checks the
gateway rather than agreeing with it. Used as a raw client of the gateway and as a scripted
upstream that can send what a well-behaved server never would.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

READ_TIMEOUT_S = 5.0


@dataclass
class RawMessage:
    """A request or response as seen on the wire: start line, header fields in order, body."""

    start_line: bytes
    fields: list[tuple[bytes, bytes]]
    body: bytes

    @property
    def status(self) -> int:
        """The status code of a response."""
        return int(self.start_line.split(b" ", 2)[1])

    @property
    def target(self) -> bytes:
        """The request target of a request."""
        return self.start_line.split(b" ", 2)[1]

    def values(self, name: bytes) -> list[bytes]:
        """Every value of header field `name` (case-insensitive), in order."""
        lname = name.lower()
        return [v for n, v in self.fields if n.lower() == lname]

    def header(self, name: bytes) -> bytes | None:
        """The only value of header field `name`, or None if absent."""
        found = self.values(name)
        assert len(found) <= 1, f"{name!r} repeated: {found}"
        return found[0] if found else None


async def read_head(reader: asyncio.StreamReader) -> tuple[bytes, list[tuple[bytes, bytes]]]:
    """The start line and header fields; raises IncompleteReadError on EOF."""
    raw = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), READ_TIMEOUT_S)
    start, *lines = raw[:-4].split(b"\r\n")
    fields = []
    for line in lines:
        name, sep, value = line.partition(b":")
        assert sep, f"malformed header line {line!r}"
        fields.append((name, value.strip()))
    return start, fields


async def read_chunked(reader: asyncio.StreamReader) -> bytes:
    """A chunked body, checking the framing strictly."""
    parts: list[bytes] = []
    while True:
        size_line = await asyncio.wait_for(reader.readuntil(b"\r\n"), READ_TIMEOUT_S)
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            assert await asyncio.wait_for(reader.readexactly(2), READ_TIMEOUT_S) == b"\r\n"
            return b"".join(parts)
        parts.append(await asyncio.wait_for(reader.readexactly(size), READ_TIMEOUT_S))
        assert await asyncio.wait_for(reader.readexactly(2), READ_TIMEOUT_S) == b"\r\n"


def _is_chunked(message: RawMessage) -> bool:
    return any(v.lower() == b"chunked" for v in message.values(b"transfer-encoding"))


async def read_response(reader: asyncio.StreamReader, *, head: bool = False) -> RawMessage:
    """One response, its body framed by status, Transfer-Encoding, Content-Length or EOF."""
    start, fields = await read_head(reader)
    message = RawMessage(start, fields, b"")
    status = message.status
    if head or status < 200 or status in (204, 304):
        return message
    length = message.header(b"content-length")
    if _is_chunked(message):
        message.body = await read_chunked(reader)
    elif length is not None:
        message.body = await asyncio.wait_for(reader.readexactly(int(length)), READ_TIMEOUT_S)
    else:
        message.body = await asyncio.wait_for(reader.read(), READ_TIMEOUT_S)
    return message


async def read_request(reader: asyncio.StreamReader) -> RawMessage | None:
    """One request with its body; None if the peer closed before sending one."""
    try:
        start, fields = await read_head(reader)
    except (asyncio.IncompleteReadError, ConnectionError):
        return None
    message = RawMessage(start, fields, b"")
    length = message.header(b"content-length")
    if _is_chunked(message):
        message.body = await read_chunked(reader)
    elif length is not None:
        message.body = await asyncio.wait_for(reader.readexactly(int(length)), READ_TIMEOUT_S)
    return message


async def expect_eof(reader: asyncio.StreamReader, timeout_s: float = 2.0) -> None:
    """Assert the peer closes the connection without sending anything more."""
    try:
        rest = await asyncio.wait_for(reader.read(), timeout_s)
    except ConnectionResetError:
        return
    assert rest == b""


def response(status: int = 200, body: bytes = b"ok", *extra: bytes) -> bytes:
    """A complete HTTP/1.1 response with Content-Length; `extra` are whole header lines."""
    head = b"HTTP/1.1 %d X\r\nContent-Length: %d\r\n" % (status, len(body))
    return head + b"".join(line + b"\r\n" for line in extra) + b"\r\n" + body


@dataclass
class RawConnection:
    """One connection accepted by a RawUpstream."""

    index: int
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    upstream: RawUpstream

    async def next_request(self) -> RawMessage | None:
        """Read one request and record it on the upstream."""
        request = await read_request(self.reader)
        if request is not None:
            self.upstream.requests.append(request)
        return request


Script = Callable[[RawConnection], Awaitable[None]]


@dataclass
class RawUpstream:
    """A scripted upstream: each accepted connection runs `script`, then is closed."""

    script: Script
    server: asyncio.Server | None = None
    accepted: int = 0
    requests: list[RawMessage] = field(default_factory=list)
    _writers: list[asyncio.StreamWriter] = field(default_factory=list)

    async def start(self) -> None:
        """Listen on a free loopback port."""
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)

    @property
    def url(self) -> str:
        """The base URL to give the gateway."""
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        self._writers.append(writer)
        try:
            await self.script(RawConnection(self.accepted, reader, writer, self))
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    async def close(self) -> None:
        """Stop listening and drop every connection."""
        assert self.server is not None
        self.server.close()
        for writer in self._writers:
            writer.close()
        await self.server.wait_closed()


def keepalive_script(answer: bytes = b"", *, max_requests: int | None = None) -> Script:
    """Answer every request on a connection with `answer` (default `response()`), keeping it open."""

    async def script(conn: RawConnection) -> None:
        served = 0
        while max_requests is None or served < max_requests:
            if await conn.next_request() is None:
                return
            conn.writer.write(answer or response())
            await conn.writer.drain()
            served += 1

    return script


StartRaw = Callable[[Script], Awaitable[RawUpstream]]


@contextlib.asynccontextmanager
async def raw_upstreams() -> AsyncIterator[StartRaw]:
    """A starter of scripted raw upstreams (`up = await start(script)`); all closed on exit."""
    started: list[RawUpstream] = []

    async def start(script: Script) -> RawUpstream:
        up = RawUpstream(script)
        await up.start()
        started.append(up)
        return up

    try:
        yield start
    finally:
        for up in started:
            await up.close()


Streams = tuple[asyncio.StreamReader, asyncio.StreamWriter]
OpenRaw = Callable[..., Awaitable[Streams]]


@contextlib.asynccontextmanager
async def raw_clients() -> AsyncIterator[OpenRaw]:
    """An opener of raw client connections (`await open_raw(port, rcvbuf=None)`); all closed on exit."""
    writers: list[asyncio.StreamWriter] = []

    async def open_raw(port: int, *, rcvbuf: int | None = None) -> Streams:
        sock = socket.socket()
        if rcvbuf is not None:
            # Set before connecting, so the kernel does not grow the window past it.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.setblocking(False)
        try:
            await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
        except OSError:
            sock.close()
            raise
        reader, writer = await asyncio.open_connection(sock=sock, limit=256 * 1024)
        writers.append(writer)
        return reader, writer

    try:
        yield open_raw
    finally:
        for writer in writers:
            writer.close()
        await asyncio.gather(*(w.wait_closed() for w in writers), return_exceptions=True)
