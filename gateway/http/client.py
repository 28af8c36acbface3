"""The upstream-facing HTTP/1.1 client: keep-alive connection pools on asyncio Protocols + httptools.

Why not aiohttp's client: per request it builds a ClientRequest, a ClientResponse, header maps,
URL objects and timer contexts; profiles showed it at about a quarter of the gateway's CPU. A
proxy already has the header block in hand and only needs: send these bytes, give me status and
fields, then the body chunk by chunk. That is all this module does, with the details that matter
for a proxy kept here in one place:

- Keep-alive reuse, newest connection first; idle ones expire after `keepalive_s`.
- A request that finds its reused connection already closed by the server (the keep-alive race)
  is sent again once on a new connection, if no response byte had arrived and the close came
  within RESEND_WINDOW_S of writing it; it is not an upstream failure.
- One timer per attempt: until response headers it enforces the attempt deadline; on a
  streamed body it becomes the idle watchdog.
- Backpressure: a response body buffered faster than the client reads pauses the upstream socket.
- Errors: every failure is an UpstreamError of its phase (connect, send, receive), so a caller
  knows what the upstream may have seen of the request.
- Egress through a forward proxy (decided once per upstream, see egress.py): an http upstream
  gets absolute-form request targets on a connection to the proxy; an https upstream gets a
  CONNECT tunnel that is then upgraded to TLS with the upstream's name. Either way the request
  heads are prebuilt here, so a request costs the same with or without a proxy. A proxy that
  refuses or answers CONNECT with a non-2xx is a ConnectError of the upstream.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator
from typing import ClassVar, Literal, cast

import httptools
from yarl import URL

from gateway.http.egress import ProxyConfig
from gateway.http.flow import BodyBuffer, FlowControl

Phase = Literal["connect", "send", "receive"]
# A request body: bytes (sent at once, can be sent again) or a stream (sent once).
Body = bytes | bytearray | AsyncIterator[bytes | bytearray] | None
# Bodies up to this size go out in the same write as the request head.
_JOIN_BODY_BYTES = 64 * 1024

# Stands in for the parser of a closed connection (never fed).
_DETACHED_PARSER = httptools.HttpResponseParser(object())
# A reused connection that the upstream closes this soon after the request was written, before
# any byte of a response, is taken as the keep-alive race (the upstream closed it as idle just as
# we reused it) and the request is sent again once on a new connection. Later than this, the
# upstream may have started on the request, so it counts as a failed attempt instead.
RESEND_WINDOW_S = 0.2
# Longest answer to CONNECT accepted from a proxy.
MAX_CONNECT_RESPONSE_BYTES = 16 * 1024


class _HeadTooLarge(Exception):
    pass


class UpstreamError(Exception):
    """Root of the upstream client's errors: an exchange that failed, grouped by its phase.

    The phase tells what the upstream may have seen: nothing (connect), part of the request
    (send), or all of it (receive), so whether the upstream may have acted on it.
    """

    phase: ClassVar[Phase]
    # True when the request was sent a second time after the keep-alive race (see RESEND_WINDOW_S).
    resent = False


class ConnectError(UpstreamError):
    """No TCP (or TLS) connection: refused, unreachable, or not within the connect timeout."""

    phase = "connect"


class ConnectTimeout(ConnectError, TimeoutError):
    """The attempt's own deadline passed before a connection was made."""


class SendError(UpstreamError):
    """The connection failed while the request was being written."""

    phase = "send"


class SendTimeout(SendError, TimeoutError):
    """The attempt's deadline passed while the request was being written."""


class ReceiveError(UpstreamError):
    """The request was sent; the upstream closed or reset before its response was complete."""

    phase = "receive"


class ReceiveTimeout(ReceiveError, TimeoutError):
    """No response headers by the attempt's deadline, or a body that went idle too long."""


class BadResponse(ReceiveError):
    """The upstream sent something that is not HTTP/1.1."""


class UpstreamResponse(BodyBuffer):
    """Status, header fields and body stream of one upstream response."""

    __slots__ = ("fields", "last_data_at", "reason", "resent", "status")

    def __init__(
        self, conn: _Connection, status: int, reason: bytes, fields: list[tuple[bytes, bytes]]
    ) -> None:
        super().__init__(conn)
        self.status = status
        self.reason = reason
        self.fields = fields
        self.last_data_at = 0.0
        self.resent = False  # sent a second time after the keep-alive race

    @property
    def complete(self) -> bool:
        """The whole body has arrived (it may still be buffered here)."""
        return self.ended

    def take_buffered(self) -> bytes:
        """Whatever body bytes have arrived and not been read, without waiting."""
        return self.take()

    def close(self) -> None:
        """Done with this response: an unfinished one takes its connection down with it."""
        conn = self._source
        if conn is not None:
            cast(_Connection, conn).finish_exchange(reusable=False)


class _Connection(FlowControl):
    """One connection to an upstream; carries one exchange at a time."""

    def __init__(self, client: UpstreamClient, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(loop)
        self._client = client
        self._parser = httptools.HttpResponseParser(self)
        self.idle_since = 0.0
        # The exchange in progress.
        self._headers_waiter: asyncio.Future[UpstreamResponse] | None = None
        self._response: UpstreamResponse | None = None
        self._is_head = False
        self._close_delimited = False
        self._sent = False
        self.sent_at = 0.0
        self.got_bytes = False
        self._server_keeps_alive = True
        self._reason = b""
        self._fields: list[tuple[bytes, bytes]] = []
        self._in_head = False
        self._head_bytes = 0
        self._max_head_bytes = client.max_header_bytes
        self.sent_at = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self._watching_body = False
        self._idle_s = 0.0

    def connection_error(self) -> Exception:
        return SendError("upstream closed the connection while the request was sent")

    def _lost(self, why: str) -> UpstreamError:
        """The error of an exchange cut off now, by the phase it was in."""
        return ReceiveError(why) if self._sent else SendError(why)

    # --- asyncio.Protocol ---------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        self.got_bytes = True
        if self._headers_waiter is None and self._response is None:
            self.close()  # bytes nobody asked for: the connection cannot be trusted any more
            return
        in_head = self._in_head
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserCallbackError as exc:
            self._fail(BadResponse(str(exc.__context__ or exc)))
            self.close()
        except httptools.HttpParserError as exc:
            self._fail(BadResponse(f"invalid HTTP response from upstream: {exc}"))
            self.close()  # the parser stays in its error state: this connection is done
        except httptools.HttpParserUpgrade:
            self.close()  # after a 101 (failed above) the bytes are not HTTP/1.1 any more
        else:
            if in_head and self._in_head:
                # A whole read inside the head: counted, since the parser holds a partial field
                # until it ends and reports nothing meanwhile.
                self._count_head(len(data))

    def _count_head(self, size: int) -> None:
        self._head_bytes += size
        if self._head_bytes > self._max_head_bytes:
            self._fail(BadResponse(f"upstream response headers exceed {self._max_head_bytes} bytes"))
            self.close()

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        # Break the parser -> bound method -> protocol cycle so the connection is freed at once.
        self._parser = _DETACHED_PARSER
        response = self._response
        if response is not None and self._close_delimited and not response.complete:
            response.feed_eof()  # a body without length ends when the connection does
            self._response = None
        self._fail(self._lost(f"upstream closed the connection ({exc or 'EOF'})"))
        self._cancel_timer()
        super().connection_lost(exc)

    # --- httptools callbacks --------------------------------------------------------------

    def on_message_begin(self) -> None:
        if self._headers_waiter is None and self._response is None:
            # More bytes in the same read as a finished response, nobody asked for them: they
            # would be taken as (part of) the answer to the next request on this connection.
            self.close()
        self._fields = []
        self._reason = b""
        self._in_head = True
        self._head_bytes = 0

    def on_status(self, reason: bytes) -> None:
        self._reason += reason
        self._head_bytes += len(reason)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._head_bytes += len(name) + len(value) + 4
        if self._head_bytes > self._max_head_bytes:
            raise _HeadTooLarge(f"upstream response headers exceed {self._max_head_bytes} bytes")
        if self._in_head:
            self._fields.append((name, value))
        # else a trailer field after a chunked body: dropped (as nginx does), so it can never
        # become a header of this response or of the next one on this connection.

    def on_headers_complete(self) -> None:
        parser = self._parser
        status = parser.get_status_code()
        fields = self._fields
        reason = self._reason
        self._fields = []
        self._reason = b""
        self._in_head = False
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
            response.feed_eof()
            self._response = None
            self.finish_exchange(reusable=False)
        waiter.set_result(response)

    def on_body(self, body: bytes) -> None:
        response = self._response
        if response is not None:
            response.last_data_at = self.loop.time()
            response.feed(body)

    def on_message_complete(self) -> None:
        response = self._response
        if response is None:
            return
        self._response = None
        response.feed_eof()
        self.finish_exchange(reusable=not self._close_delimited)

    # --- the exchange ---------------------------------------------------------------------

    async def exchange(
        self,
        head: bytes,
        body: Body,
        chunked: bool,
        is_head: bool,
        deadline: float,
        idle_s: float,
    ) -> UpstreamResponse:
        """Send one request and wait for its response headers."""
        transport = self.transport
        assert transport is not None
        self._is_head = is_head
        self._sent = False
        self.sent_at = 0.0
        self.got_bytes = False
        self._close_delimited = False
        self._server_keeps_alive = True
        self._idle_s = idle_s
        self._watching_body = False
        waiter: asyncio.Future[UpstreamResponse] = self.loop.create_future()
        self._headers_waiter = waiter
        self._timer = self.loop.call_at(deadline, self._on_timer)
        try:
            if body is None or isinstance(body, (bytes, bytearray)):
                if not body:
                    transport.write(head)
                elif len(body) <= _JOIN_BODY_BYTES:
                    transport.write(head + body)  # one write, one segment
                else:
                    transport.write(head)  # no copy of a large body just to prepend the head
                    transport.write(body)
            else:
                transport.write(head)
                try:
                    await self._send_stream(body, chunked)
                except SendError:
                    # If the timer or the upstream ended the exchange first, say why.
                    if waiter.done() and not waiter.cancelled() and waiter.exception() is not None:
                        raise waiter.exception() from None  # type: ignore[misc]
                    raise
            self._sent = True
            self.sent_at = self.loop.time()
            return await waiter
        except BaseException:
            # Errors of a streamed body's source (the client leaving) pass through unchanged.
            self._headers_waiter = None
            self.finish_exchange(reusable=False)
            raise

    async def _send_stream(self, body: AsyncIterator[bytes | bytearray], chunked: bool) -> None:
        async for chunk in body:
            transport = self.transport
            if self.closed or transport is None:
                raise self.connection_error()
            if not chunk:
                continue
            if not chunked:
                transport.write(chunk)
            elif len(chunk) <= _JOIN_BODY_BYTES:
                transport.write(b"%x\r\n%b\r\n" % (len(chunk), bytes(chunk)))
            else:
                transport.write(b"%x\r\n" % len(chunk))
                transport.write(chunk)
                transport.write(b"\r\n")
            if self.write_paused:
                await self.drain()
        if chunked:
            if self.closed or self.transport is None:
                raise self.connection_error()
            self.transport.write(b"0\r\n\r\n")

    def watch_body(self) -> None:
        """Headers are in and the body is streaming: the timer now watches for idle gaps."""
        if self._response is not None:
            self._watching_body = True
            now = self.loop.time()
            self._response.last_data_at = now
            self._timer = self.loop.call_at(now + self._idle_s, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        response = self._response
        if self._watching_body and response is not None:
            due = response.last_data_at + self._idle_s
            if due > self.loop.time():
                self._timer = self.loop.call_at(due, self._on_timer)
                return
            self._fail(ReceiveTimeout(f"no response bytes for {self._idle_s:g} s"))
        elif self._sent:
            self._fail(ReceiveTimeout("no response headers within the attempt timeout"))
        else:
            self._fail(SendTimeout("the request was not sent within the attempt timeout"))
        self.close()

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _fail(self, exc: UpstreamError) -> None:
        waiter = self._headers_waiter
        if waiter is not None and not waiter.done():
            self._headers_waiter = None
            waiter.set_exception(exc)
        response = self._response
        if response is not None:
            self._response = None
            response.fail(exc)

    def finish_exchange(self, *, reusable: bool) -> None:
        """The exchange is over: back to the pool, or closed."""
        self._cancel_timer()
        if self._response is not None:
            self._response.fail(ReceiveError("response abandoned"))
            self._response = None
        if reusable and self._server_keeps_alive and not self.closed:
            self.resume_reading()
            self._client.put_back(self)
        else:
            self.close()


class _Tunnel(asyncio.Protocol):
    """A connection to a forward proxy until it answers our CONNECT (then TLS takes it over)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.answer: asyncio.Future[tuple[int, bytes]] = loop.create_future()
        self._buffer = b""
        self.extra = b""

    def data_received(self, data: bytes) -> None:
        if self.answer.done():
            self.extra += data
            return
        self._buffer += data
        end = self._buffer.find(b"\r\n\r\n")
        if end < 0:
            if len(self._buffer) > MAX_CONNECT_RESPONSE_BYTES:
                self.answer.set_exception(ConnectError("the proxy's answer to CONNECT is too large"))
            return
        self.extra = self._buffer[end + 4 :]
        status_line = self._buffer.split(b"\r\n", 1)[0]
        version, _, rest = status_line.partition(b" ")
        code, _, reason = rest.partition(b" ")
        if not version.startswith(b"HTTP/1.") or len(code) != 3 or not code.isdigit():
            self.answer.set_exception(ConnectError(f"the proxy answered CONNECT with {status_line[:80]!r}"))
        else:
            self.answer.set_result((int(code), reason.strip()))

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.answer.done():
            self.answer.set_exception(
                ConnectError(f"the proxy closed the connection before answering CONNECT ({exc or 'EOF'})")
            )


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

    def __init__(
        self,
        base_url: str,
        *,
        connect_timeout_s: float,
        keepalive_s: float,
        max_header_bytes: int = 65536,
        proxy: ProxyConfig | None = None,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        """`proxy`: the forward proxy to go through (None: direct). `ssl_context`: how an https
        upstream is verified (None: the system's CAs)."""
        self.max_header_bytes = max_header_bytes
        url = URL(base_url)
        assert url.host is not None and url.port is not None
        https = url.scheme == "https"
        self._host = url.host
        self._port = url.port
        self._ssl: ssl.SSLContext | None = (ssl_context or ssl.create_default_context()) if https else None
        default_port = 443 if https else 80
        host = f"[{url.host}]" if ":" in url.host else url.host
        authority = host if url.port == default_port else f"{host}:{url.port}"
        self._host_line = b"Host: " + authority.encode("idna") + b"\r\n"
        self._prefix = url.raw_path.rstrip("/").encode()
        self._connect_timeout_s = connect_timeout_s
        self._keepalive_s = keepalive_s
        self._idle: list[_Connection] = []
        # Where connections go: the upstream, or the proxy.
        self.proxy = proxy
        self._connect_host = self._host
        self._connect_port = self._port
        self._connect_request: bytes | None = None  # CONNECT head, for https through a proxy
        if proxy is not None:
            self._connect_host, self._connect_port = proxy.host, proxy.port
            auth = proxy.authorization
            auth_line = b"Proxy-Authorization: " + auth + b"\r\n" if auth else b""
            if https:
                target = f"{host}:{url.port}".encode("idna")
                self._connect_request = b"CONNECT %b HTTP/1.1\r\nHost: %b\r\n%b\r\n" % (
                    target,
                    target,
                    auth_line,
                )
            else:
                # Absolute-form target (RFC 9112 section 3.2.2), Host still the upstream's.
                self._prefix = b"http://" + authority.encode("idna") + self._prefix
                self._host_line += auth_line

    @property
    def idle_connections(self) -> int:
        """Kept-alive connections waiting for the next request."""
        return len(self._idle)

    async def request(
        self,
        method: bytes,
        target: bytes,
        fields: bytes,
        body: Body,
        *,
        length: int | None,
        timeout_s: float,
        idle_s: float,
        resend: bool = True,
    ) -> UpstreamResponse:
        """Send a request; return once its response headers are in, within `timeout_s`.

        `fields` is the header block without Host and framing; `length` is the body's size,
        or None to send a streamed body chunked. Once the headers are in, a body that stays
        silent for `idle_s` fails with ReceiveTimeout. With `resend`, a request that meets the
        keep-alive race is sent once more on a new connection (`resent` on the response or the
        error says so). Raises UpstreamError.
        """
        if timeout_s <= 0:
            raise ConnectTimeout("no time left for the attempt")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        framing = b""
        chunked = False
        if body is not None:
            if isinstance(body, (bytes, bytearray)):
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
        conn, reused = await self._acquire(loop, deadline)
        try:
            response = await conn.exchange(head, body, chunked, is_head, deadline, idle_s)
        except (SendError, ReceiveError) as exc:
            # A kept-alive connection the server closed just as we reused it: send again, once,
            # on a new one. Only a bytes body can be sent twice, and only if nothing came back.
            if not (resend and reused and _keepalive_race(exc, conn) and not isinstance(body, AsyncIterator)):
                raise
            conn = await self._connect(loop, deadline - loop.time())
            try:
                response = await conn.exchange(head, body, chunked, is_head, deadline, idle_s)
            except UpstreamError as again:
                again.resent = True
                raise
            response.resent = True
        if not response.complete:
            conn.watch_body()
        return response

    async def _acquire(self, loop: asyncio.AbstractEventLoop, deadline: float) -> tuple[_Connection, bool]:
        now = loop.time()
        idle = self._idle
        while idle:
            conn = idle.pop()
            if not conn.closed and now - conn.idle_since < self._keepalive_s:
                return conn, True
            conn.close()
        return await self._connect(loop, deadline - now), False

    async def _connect(self, loop: asyncio.AbstractEventLoop, remaining_s: float) -> _Connection:
        if remaining_s <= 0:
            raise ConnectTimeout("no time left to connect")
        timeout = min(self._connect_timeout_s, remaining_s)
        try:
            async with asyncio.timeout(timeout):
                if self._connect_request is not None:
                    return await self._connect_tunnel(loop, self._connect_request)
                _, conn = await loop.create_connection(
                    lambda: _Connection(self, loop),
                    self._connect_host,
                    self._connect_port,
                    ssl=self._ssl,
                    server_hostname=self._host if self._ssl else None,
                )
        except TimeoutError:
            if timeout < remaining_s:
                raise ConnectError(f"connect timed out after {timeout:g} s") from None
            raise ConnectTimeout(f"the attempt's deadline passed while connecting ({timeout:g} s)") from None
        except (OSError, ssl.SSLError) as exc:
            via = f" (through proxy {self.proxy.url})" if self.proxy is not None else ""
            raise ConnectError(f"{type(exc).__name__}: {exc}{via}") from None
        return conn

    async def _connect_tunnel(self, loop: asyncio.AbstractEventLoop, request: bytes) -> _Connection:
        """CONNECT through the proxy, then TLS to the upstream on the same socket."""
        assert self.proxy is not None and self._ssl is not None
        transport, tunnel = await loop.create_connection(
            lambda: _Tunnel(loop), self._connect_host, self._connect_port
        )
        try:
            transport.write(request)
            status, reason = await tunnel.answer
            if not 200 <= status < 300:
                hint = " (check the proxy credentials)" if status == 407 else ""
                raise ConnectError(
                    f"proxy {self.proxy.url} answered {status} {reason.decode('latin-1')} to "
                    f"CONNECT {self._host}:{self._port}{hint}"
                )
            if tunnel.extra:
                # Nothing may come before our TLS hello; bytes here would corrupt the handshake.
                raise ConnectError(f"proxy {self.proxy.url} sent data after its answer to CONNECT")
            conn = _Connection(self, loop)
            tls = await loop.start_tls(transport, conn, self._ssl, server_hostname=self._host)
        except BaseException:
            transport.close()
            raise
        if tls is None:  # the connection was closed during the handshake
            raise ConnectError(f"the TLS handshake through proxy {self.proxy.url} was cut off")
        conn.connection_made(tls)  # start_tls does not call it on the protocol it wraps
        return conn

    def put_back(self, conn: _Connection) -> None:
        """An exchange on `conn` ended cleanly: keep it for the next request."""
        now = conn.loop.time()
        conn.idle_since = now
        idle = self._idle
        idle.append(conn)
        # Expire from the oldest end while we are here; cheap, and keeps the list short.
        while idle and now - idle[0].idle_since >= self._keepalive_s:
            idle.pop(0).close()

    def sweep(self) -> None:
        """Close idle connections past their keep-alive (called periodically, on the loop)."""
        now = asyncio.get_running_loop().time()
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


def _keepalive_race(exc: UpstreamError, conn: _Connection) -> bool:
    """The upstream closed the connection without a byte of response, just after the request."""
    if conn.got_bytes or isinstance(exc, (TimeoutError, BadResponse)):
        return False
    return not conn.sent_at or conn.loop.time() - conn.sent_at <= RESEND_WINDOW_S
