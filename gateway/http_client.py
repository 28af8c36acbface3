"""The upstream-facing HTTP/1.1 client: keep-alive connection pools on asyncio Protocols + httptools.

Why not aiohttp's client: per request it builds a ClientRequest, a ClientResponse, header maps,
URL objects and timer contexts; profiles showed it at about a quarter of the gateway's CPU. A
proxy already has the header block in hand and only needs: send these bytes, give me status and
fields, then the body chunk by chunk. That is all this module does, with the details that matter
for a proxy kept here in one place:

- Keep-alive reuse, newest connection first; idle ones expire after `keepalive_s`.
- A request that finds its reused connection already closed by the server (the keep-alive race)
  is sent again once on a new connection, if no response byte had arrived; it is not an
  upstream failure.
- One timer per attempt: until response headers it enforces the attempt deadline; on a
  streamed body it becomes the idle watchdog.
- Backpressure: a response body buffered faster than the client reads pauses the upstream socket.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator
from typing import Literal, cast

import httptools
from yarl import URL

# Response body bytes buffered before the upstream socket is paused.
RESPONSE_HIGH_WATER = 256 * 1024

Phase = Literal["headers", "body"]

# Stands in for the parser of a closed connection (never fed).
_DETACHED_PARSER = httptools.HttpResponseParser(object())


class ConnectFailed(Exception):
    """No TCP (or TLS) connection to the upstream: refused, unreachable or timed out."""


class ConnectionLost(Exception):
    """The upstream closed or reset the connection before the response was complete."""


class BadResponse(Exception):
    """The upstream sent something that is not HTTP/1.1."""


class UpstreamResponse:
    """Status, header fields and body stream of one upstream response."""

    __slots__ = (
        "_chunks",
        "_complete",
        "_conn",
        "_error",
        "_size",
        "_waiter",
        "fields",
        "last_data_at",
        "reason",
        "status",
    )

    def __init__(
        self, conn: _Connection, status: int, reason: bytes, fields: list[tuple[bytes, bytes]]
    ) -> None:
        self._conn: _Connection | None = conn
        self.status = status
        self.reason = reason
        self.fields = fields
        self._chunks: list[bytes] = []
        self._size = 0
        self._complete = False
        self._error: BaseException | None = None
        self._waiter: asyncio.Future[None] | None = None
        self.last_data_at = 0.0

    @property
    def complete(self) -> bool:
        """The whole body has arrived (it may still be buffered here)."""
        return self._complete

    def take_buffered(self) -> bytes:
        """Whatever body bytes have arrived and not been read, without waiting."""
        chunks = self._chunks
        if not chunks:
            return b""
        data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        self._chunks = []
        self._size = 0
        if self._conn is not None:
            self._conn.resume_reading()
        return data

    async def read(self) -> bytes:
        """The next body bytes; b"" at the end. Raises ConnectionLost, BadResponse or TimeoutError."""
        while not self._chunks:
            if self._complete:
                return b""
            if self._error is not None:
                raise self._error
            assert self._conn is not None
            self._waiter = self._conn.loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        return self.take_buffered()

    def close(self) -> None:
        """Done with this response: an unfinished one takes its connection down with it."""
        conn = self._conn
        self._conn = None
        if conn is not None:
            conn.finish_exchange(reusable=False)

    # Called by the connection.

    def _feed(self, data: bytes, now: float) -> None:
        self._chunks.append(data)
        self._size += len(data)
        self.last_data_at = now
        if self._size > RESPONSE_HIGH_WATER and self._conn is not None:
            self._conn.pause_reading()
        self._wake()

    def _finish(self) -> None:
        self._complete = True
        self._conn = None
        self._wake()

    def _fail(self, exc: BaseException) -> None:
        if not self._complete:
            self._error = exc
            self._conn = None
            self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)


class _Connection(asyncio.Protocol):
    """One connection to an upstream; carries one exchange at a time."""

    def __init__(self, client: UpstreamClient) -> None:
        self.loop = client.loop
        self._client = client
        self._parser = httptools.HttpResponseParser(self)
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.idle_since = 0.0
        self._paused = False
        self._write_paused = False
        self._drain_waiter: asyncio.Future[None] | None = None
        # The exchange in progress.
        self._headers_waiter: asyncio.Future[UpstreamResponse] | None = None
        self._response: UpstreamResponse | None = None
        self._is_head = False
        self._close_delimited = False
        self._got_bytes = False
        self._server_keeps_alive = True
        self._reason = b""
        self._fields: list[tuple[bytes, bytes]] = []
        self._timer: asyncio.TimerHandle | None = None
        self._phase: Phase = "headers"
        self._idle_s = 0.0

    # --- asyncio.Protocol ---------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        self._got_bytes = True
        if self._headers_waiter is None and self._response is None:
            self.close()  # bytes nobody asked for: the connection cannot be trusted any more
            return
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(BadResponse(f"invalid HTTP response from upstream: {exc}"))
            self.close()  # the parser stays in its error state: this connection is done
        except httptools.HttpParserUpgrade:
            self.close()  # after a 101 (failed above) the bytes are not HTTP/1.1 any more

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        # Break the parser -> bound method -> protocol cycle so the connection is freed at once.
        self._parser = _DETACHED_PARSER
        response = self._response
        if response is not None and self._close_delimited and not response.complete:
            response._finish()  # a body without length ends when the connection does
            self._response = None
        self._fail(ConnectionLost(f"upstream closed the connection ({exc or 'EOF'})"))
        self._cancel_timer()
        waiter = self._drain_waiter
        if waiter is not None and not waiter.done():
            waiter.set_exception(ConnectionLost("upstream closed the connection"))

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        waiter = self._drain_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # --- httptools callbacks --------------------------------------------------------------

    def on_message_begin(self) -> None:
        if self._headers_waiter is None and self._response is None:
            # More bytes in the same read as a finished response, nobody asked for them: they
            # would be taken as (part of) the answer to the next request on this connection.
            self.close()

    def on_status(self, reason: bytes) -> None:
        self._reason += reason

    def on_header(self, name: bytes, value: bytes) -> None:
        self._fields.append((name, value))

    def on_headers_complete(self) -> None:
        parser = self._parser
        status = parser.get_status_code()
        fields = self._fields
        reason = self._reason
        self._fields = []
        self._reason = b""
        if 100 <= status < 200:
            if status == 101:
                # Upgrade is hop-by-hop and never sent upstream, so switching protocols is a broken answer.
                self._fail(BadResponse("upstream answered 101 Switching Protocols to a plain request"))
            return  # an interim response (100 Continue, 103 Early Hints): the real one follows
        waiter = self._headers_waiter
        if waiter is None or waiter.done():
            return
        self._headers_waiter = None
        response = UpstreamResponse(self, status, reason, fields)
        self._response = response
        self._server_keeps_alive = parser.should_keep_alive()
        self._close_delimited = _close_delimited(status, fields)
        self._cancel_timer()
        if self._is_head:
            # httptools cannot be told a HEAD response has no body; end it here and do not reuse.
            response._finish()
            self._response = None
            self.finish_exchange(reusable=False)
        waiter.set_result(response)

    def on_body(self, body: bytes) -> None:
        response = self._response
        if response is not None:
            response._feed(body, self.loop.time())

    def on_message_complete(self) -> None:
        response = self._response
        if response is None:
            return
        self._response = None
        response._finish()
        self.finish_exchange(reusable=not self._close_delimited)

    # --- the exchange ---------------------------------------------------------------------

    async def exchange(
        self,
        head: bytes,
        body: bytes | AsyncIterator[bytes] | None,
        chunked: bool,
        is_head: bool,
        deadline: float,
        idle_s: float,
    ) -> UpstreamResponse:
        """Send one request and wait for its response headers."""
        assert self.transport is not None
        self._is_head = is_head
        self._got_bytes = False
        self._close_delimited = False
        self._server_keeps_alive = True
        self._idle_s = idle_s
        self._phase = "headers"
        waiter: asyncio.Future[UpstreamResponse] = self.loop.create_future()
        self._headers_waiter = waiter
        self._timer = self.loop.call_at(deadline, self._on_timer)
        try:
            if body is None or isinstance(body, bytes):
                self.transport.write(head + body if body else head)
            else:
                self.transport.write(head)
                try:
                    await self._send_stream(body, chunked)
                except ConnectionLost:
                    # If the timer or the upstream ended the exchange first, say why.
                    if waiter.done() and not waiter.cancelled() and waiter.exception() is not None:
                        raise waiter.exception() from None  # type: ignore[misc]
                    raise
            return await waiter
        except BaseException:
            self._headers_waiter = None
            self.finish_exchange(reusable=False)
            raise

    async def _send_stream(self, body: AsyncIterator[bytes], chunked: bool) -> None:
        assert self.transport is not None
        async for chunk in body:
            if self.closed:
                raise ConnectionLost("upstream closed the connection while the body was sent")
            if not chunk:
                continue
            self.transport.write(b"%x\r\n%b\r\n" % (len(chunk), chunk) if chunked else chunk)
            if self._write_paused:
                self._drain_waiter = self.loop.create_future()
                try:
                    await self._drain_waiter
                finally:
                    self._drain_waiter = None
        if chunked:
            self.transport.write(b"0\r\n\r\n")

    def watch_body(self) -> None:
        """Headers are in and the body is streaming: the timer now watches for idle gaps."""
        if self._response is not None:
            self._phase = "body"
            self._response.last_data_at = self.loop.time()
            self._timer = self.loop.call_at(self.loop.time() + self._idle_s, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        if self._phase == "body" and self._response is not None:
            due = self._response.last_data_at + self._idle_s
            if due > self.loop.time():
                self._timer = self.loop.call_at(due, self._on_timer)
                return
        self._fail(TimeoutError())
        self.close()

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _fail(self, exc: BaseException) -> None:
        waiter = self._headers_waiter
        if waiter is not None and not waiter.done():
            self._headers_waiter = None
            waiter.set_exception(exc)
        response = self._response
        if response is not None:
            self._response = None
            response._fail(exc)

    def finish_exchange(self, *, reusable: bool) -> None:
        """The exchange is over: back to the pool, or closed."""
        self._cancel_timer()
        if self._response is not None:
            self._response._fail(ConnectionLost("response abandoned"))
            self._response = None
        if reusable and self._server_keeps_alive and not self.closed:
            self.resume_reading()
            self._client.put_back(self)
        else:
            self.close()

    @property
    def got_bytes(self) -> bool:
        return self._got_bytes

    def pause_reading(self) -> None:
        if not self._paused and self.transport is not None:
            self._paused = True
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self._paused and self.transport is not None and not self.closed:
            self._paused = False
            self.transport.resume_reading()

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()


def _close_delimited(status: int, fields: list[tuple[bytes, bytes]]) -> bool:
    """True if the body runs until the connection closes (no length, not chunked)."""
    if status in (204, 304) or status < 200:
        return False
    for name, _ in fields:
        if len(name) in (14, 17) and name.lower() in (b"content-length", b"transfer-encoding"):
            return False
    return True


class UpstreamClient:
    """Connections to one upstream base URL, reused with keep-alive."""

    def __init__(self, base_url: str, *, connect_timeout_s: float, keepalive_s: float) -> None:
        self.loop = asyncio.get_running_loop()
        url = URL(base_url)
        assert url.host is not None and url.port is not None
        self._host = url.host
        self._port = url.port
        self._ssl: ssl.SSLContext | None = ssl.create_default_context() if url.scheme == "https" else None
        default_port = 443 if url.scheme == "https" else 80
        host = f"[{url.host}]" if ":" in url.host else url.host
        authority = host if url.port == default_port else f"{host}:{url.port}"
        self._host_line = b"Host: " + authority.encode("idna") + b"\r\n"
        self._prefix = url.raw_path.rstrip("/").encode()
        self._connect_timeout_s = connect_timeout_s
        self._keepalive_s = keepalive_s
        self._idle: list[_Connection] = []

    async def request(
        self,
        method: bytes,
        target: bytes,
        fields: bytes,
        body: bytes | AsyncIterator[bytes] | None,
        *,
        length: int | None,
        deadline: float,
        idle_s: float,
    ) -> UpstreamResponse:
        """Send a request; return once its response headers are in.

        `fields` is the header block without Host and framing; `length` is the body's size,
        or None to send a streamed body chunked. Raises ConnectFailed, ConnectionLost,
        BadResponse or TimeoutError (the deadline passed first).
        """
        framing = b""
        chunked = False
        if body is not None:
            if isinstance(body, bytes):
                framing = b"Content-Length: %d\r\n" % len(body)
            elif length is not None:
                framing = b"Content-Length: %d\r\n" % length
            else:
                framing = b"Transfer-Encoding: chunked\r\n"
                chunked = True
        elif method in (b"POST", b"PUT", b"PATCH"):
            framing = b"Content-Length: 0\r\n"
        head = b"".join(
            (method, b" ", self._prefix, target, b" HTTP/1.1\r\n", self._host_line, fields, framing, b"\r\n")
        )
        is_head = method == b"HEAD"
        while True:
            conn, reused = await self._acquire(deadline)
            try:
                response = await conn.exchange(head, body, chunked, is_head, deadline, idle_s)
            except ConnectionLost:
                # A kept-alive connection the server closed just as we reused it: send again on
                # a fresh one. Only bytes bodies can be sent twice, and only if nothing came back.
                if reused and not conn.got_bytes and not isinstance(body, AsyncIterator):
                    continue
                raise
            if not response.complete:
                conn.watch_body()
            return response

    async def _acquire(self, deadline: float) -> tuple[_Connection, bool]:
        now = self.loop.time()
        idle = self._idle
        while idle:
            conn = idle.pop()
            if not conn.closed and now - conn.idle_since < self._keepalive_s:
                return conn, True
            conn.close()
        return await self._connect(deadline - now), False

    async def _connect(self, remaining_s: float) -> _Connection:
        if remaining_s <= 0:
            raise TimeoutError
        timeout = min(self._connect_timeout_s, remaining_s)
        try:
            async with asyncio.timeout(timeout):
                _, conn = await self.loop.create_connection(
                    lambda: _Connection(self),
                    self._host,
                    self._port,
                    ssl=self._ssl,
                    server_hostname=self._host if self._ssl else None,
                )
        except TimeoutError:
            if timeout < remaining_s:
                raise ConnectFailed(f"connect timed out after {timeout:g} s") from None
            raise
        except (OSError, ssl.SSLError) as exc:
            raise ConnectFailed(f"{type(exc).__name__}: {exc}") from None
        return conn

    def put_back(self, conn: _Connection) -> None:
        now = self.loop.time()
        conn.idle_since = now
        idle = self._idle
        idle.append(conn)
        # Expire from the oldest end while we are here; cheap, and keeps the list short.
        while idle and now - idle[0].idle_since >= self._keepalive_s:
            idle.pop(0).close()

    def sweep(self) -> None:
        """Close idle connections past their keep-alive (called periodically)."""
        now = self.loop.time()
        keep = [c for c in self._idle if not c.closed and now - c.idle_since < self._keepalive_s]
        for conn in self._idle:
            if conn not in keep:
                conn.close()
        self._idle = keep

    def close(self) -> None:
        """Close every idle connection."""
        for conn in self._idle:
            conn.close()
        self._idle.clear()
