"""The client-facing HTTP/1.1 server: asyncio Protocols with httptools (llhttp) parsing.

Why not aiohttp's server: a proxy needs only the request line, the raw header fields and the
body as a stream, and a way to write bytes back with the right framing. aiohttp builds a
Request, a router match, a StreamResponse and several header maps per request; profiles showed
that layer costing about as much as the rest of the gateway. This module does only the part a
proxy needs, with backpressure both ways: a client sending faster than the upstream takes is
paused (pause_reading), and a client reading slower than the upstream sends pauses the relay
(`Responder.write` waits for the socket to drain).

One request runs at a time per connection; one pipelined request may queue behind it, with
reading paused while it waits (a further one in the same read closes the connection once the
queued one is answered). A client that disconnects cancels its request's task, so the upstream
stops generating for nobody.

Limits against clients that are slow or hostile: the request line and header fields (complete
or still arriving) within `max_header_bytes` (431), headers complete within `header_timeout_s`
of their first byte (408), a body that never goes silent longer than `body_timeout_s` while
the gateway is reading it, request trailers dropped, and at most `max_connections` client
connections, the oldest idle keep-alive one closed to make room for a new one.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections import deque
from collections.abc import Awaitable, Callable
from http import HTTPStatus

import httptools
import orjson

from gateway.http.flow import BodyBuffer, FlowControl

log = logging.getLogger(__name__)

# Idle keep-alive connections are closed after this long (as aiohttp's server does).
KEEPALIVE_S = 75.0
# How often idle keep-alive connections and slow clients are looked for.
SWEEP_INTERVAL_S = 5.0
MIN_SWEEP_INTERVAL_S = 0.02
# Longest a closing connection reads and discards what the client still sends (see _linger_close).
LINGER_S = 2.0
# nginx's client_header_timeout and client_body_timeout.
HEADER_TIMEOUT_S = 60.0
BODY_TIMEOUT_S = 60.0

_STATUS_LINES = {int(s): b"HTTP/1.1 %d %s\r\n" % (s, s.phrase.encode()) for s in HTTPStatus}
_CRLF = b"\r\n"
_LAST_CHUNK = b"0\r\n\r\n"
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


def status_line(status: int, reason: bytes = b"") -> bytes:
    """`HTTP/1.1 <status> <reason>`: the upstream's reason if given, else the standard phrase."""
    if reason:
        return b"HTTP/1.1 %d %s\r\n" % (status, reason)
    return _STATUS_LINES.get(status) or b"HTTP/1.1 %d Unknown\r\n" % status


class RequestBody(BodyBuffer):
    """The request body as it arrives; `read()` returns what is buffered, b"" at the end."""

    __slots__ = ()

    async def read_all(self) -> bytes:
        """Everything up to the end of the body."""
        parts = []
        while data := await self.read():
            parts.append(data)
        return b"".join(parts)


class Request:
    """One parsed request: the request line, header fields as received, and the body stream."""

    __slots__ = ("body", "fields", "http11", "keep_alive", "method", "peer", "target")

    def __init__(
        self,
        method: bytes,
        target: bytes,
        fields: list[tuple[bytes, bytes]],
        http11: bool,
        keep_alive: bool,
        peer: str | None,
        body: RequestBody,
    ) -> None:
        self.method = method
        self.target = target
        self.fields = fields
        self.http11 = http11
        self.keep_alive = keep_alive
        self.peer = peer
        self.body = body

    @property
    def path(self) -> str:
        """The target without its query, for logs."""
        return self.target.partition(b"?")[0].decode("latin-1")


class Responder:
    """Writes one response: framing (Content-Length, chunked or close-delimited) is decided here.

    The status line and headers are held until the first body bytes (or the end), so a small
    response goes out in one write; `flush()` sends them early when the body will take a while.
    """

    __slots__ = ("_chunked", "_head", "_no_body", "_protocol", "_request", "done", "started")

    def __init__(self, protocol: HttpProtocol, request: Request) -> None:
        self._protocol = protocol
        self._request = request
        self._head = b""
        self._chunked = False
        self._no_body = False
        self.started = False
        self.done = False

    def start(self, status: int, reason: bytes, fields: bytes, length: int | None) -> None:
        """Begin the response: `fields` is the header block ("Name: value\\r\\n" lines)."""
        request = self._request
        self.started = True
        self._no_body = request.method == b"HEAD" or status in (204, 304) or status < 200
        parts = [status_line(status, reason), fields]
        if length is not None:
            if status != 204 and status >= 200:
                parts.append(b"Content-Length: %d\r\n" % length)
        elif not self._no_body:
            if request.http11:
                parts.append(b"Transfer-Encoding: chunked\r\n")
                self._chunked = True
            else:
                request.keep_alive = False  # HTTP/1.0: the end of the body is the end of the connection
        if self._protocol.draining:
            request.keep_alive = False
        if not request.keep_alive:
            parts.append(b"Connection: close\r\n")
        elif not request.http11:
            parts.append(b"Connection: keep-alive\r\n")
        parts.append(_CRLF)
        self._head = b"".join(parts)

    def flush(self) -> None:
        """Send the status line and headers now (before any body)."""
        if self._head:
            self._protocol.write(self._head)
            self._head = b""

    async def write(self, data: bytes) -> None:
        """Send body bytes; waits while the client's socket is backed up."""
        if self._no_body or not data:
            return
        if self._chunked:
            data = b"%x\r\n%b\r\n" % (len(data), data)
        if self._head:
            data = self._head + data
            self._head = b""
        protocol = self._protocol
        protocol.write(data)
        if protocol.write_paused:
            await protocol.drain()

    def end(self) -> None:
        """The body is complete."""
        tail = _LAST_CHUNK if self._chunked else b""
        if self._head or tail:
            self._protocol.write(self._head + tail)
            self._head = b""
        self.done = True

    def send(self, status: int, fields: bytes, body: bytes) -> None:
        """A whole response at once (the gateway's own answers)."""
        self.start(status, b"", fields, len(body))
        if self._no_body:
            body = b""
        self._protocol.write(self._head + body)
        self._head = b""
        self.done = True

    def abort(self) -> None:
        """End the connection without a clean end of body, so the client sees the truncation."""
        self._request.keep_alive = False
        self.done = True
        self._protocol.close()


Handler = Callable[[Request, Responder], Awaitable[None]]


def _error_body(error_type: str, message: str) -> bytes:
    return orjson.dumps({"error": {"type": error_type, "message": message}})


class _HeaderTooLarge(Exception):
    pass


class _PipelineFull(Exception):
    """A request began while another was already queued behind the one being answered."""


class RequestTimeout(Exception):
    """The client did not send its request (headers or body) in time."""


# Stands in for the parser of a closed connection (never fed).
_DETACHED_PARSER = httptools.HttpRequestParser(object())


class HttpProtocol(FlowControl):
    """One client connection."""

    def __init__(self, server: HttpServer, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(loop)
        self._server = server
        self._handler = server.handler
        self._max_header_bytes = server.max_header_bytes
        self._parser = httptools.HttpRequestParser(self)
        self._peer: str | None = None
        # Parsing state of the request being read.
        self._url = b""
        self._fields: list[tuple[bytes, bytes]] = []
        self._header_bytes = 0
        # While a request head is being read: when it began, and the bytes seen of it so far
        # (-1: it began in the read being parsed, whose share of it is unknown).
        self._head_started_at: float | None = None
        self._head_raw = 0
        self._parsing: Request | None = None
        # The request being answered, and any pipelined behind it.
        self._task: asyncio.Task[None] | None = None
        self._current: Request | None = None
        self._queue: deque[Request] = deque()
        self._no_more_requests = False
        self._lingering = False
        self.last_active = loop.time()

    @property
    def draining(self) -> bool:
        return self._server.draining

    @property
    def idle(self) -> bool:
        return self._current is None and self._parsing is None

    def connection_error(self) -> Exception:
        return ConnectionResetError("client disconnected")

    # --- asyncio.Protocol ---------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        peer = transport.get_extra_info("peername")
        self._peer = peer[0] if isinstance(peer, tuple) else None
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._server.admit(self)

    def data_received(self, data: bytes) -> None:
        self.last_active = self.loop.time()
        if self._no_more_requests:
            return
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            # Upgrade is hop-by-hop and never forwarded: answer the request as plain HTTP and
            # close afterwards, since what follows on the socket is not HTTP/1.1.
            if self._parsing is not None:
                self._parsing.keep_alive = False
                self._parsing.body.feed_eof()
                self._parsing = None
            self.pause_reading()
        except httptools.HttpParserCallbackError as exc:
            if isinstance(exc.__context__, _HeaderTooLarge):
                self._reject(431, "request_header_too_large", str(exc.__context__))
            elif isinstance(exc.__context__, _PipelineFull):
                self._stop_reading_requests()
            else:
                log.error("failed parsing a request", exc_info=exc.__context__)
                self._reject(500, "internal", "internal error")
        except httptools.HttpParserError as exc:
            self._reject(400, "invalid_request", f"malformed HTTP request: {exc}")
        else:
            self._count_partial_head(len(data))

    def _count_partial_head(self, size: int) -> None:
        # The parser reports a header field only once it is complete, and holds the partial one
        # meanwhile: count whole reads that fall inside one head, so a field that never ends
        # cannot grow without bound (the limit holds to within one read).
        if self._head_started_at is None:
            return
        if self._head_raw < 0:
            self._head_raw = 0
            return
        self._head_raw += size
        if self._head_raw > self._max_header_bytes:
            self._reject(
                431,
                "request_header_too_large",
                f"request line and headers exceed {self._max_header_bytes} bytes",
            )

    def eof_received(self) -> bool:
        # A FIN from the client is taken as the client leaving, as nginx does: a half-closed
        # socket looks the same as a closed one until a write fails, and stopping generation
        # for a client that left matters far more than serving the rare half-closing client.
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        self._server.connections.discard(self)
        gone = self.connection_error()
        if self._parsing is not None:
            self._parsing.body.fail(gone)
            self._parsing = None
        self._queue.clear()
        # The parser holds bound methods of this protocol: break that cycle so a closed
        # connection is freed at once, not by a later GC pass.
        self._parser = _DETACHED_PARSER
        if self._current is not None:
            self._current.body.fail(gone)
        if self._task is not None and not self._task.done():
            self._task.cancel()

    # --- httptools callbacks --------------------------------------------------------------

    def on_message_begin(self) -> None:
        if self._queue:
            raise _PipelineFull
        self._url = b""
        self._fields = []
        self._header_bytes = 0
        self._head_started_at = self.last_active
        self._head_raw = -1

    def on_url(self, url: bytes) -> None:
        self._url += url
        self._header_bytes += len(url)
        if self._header_bytes > self._max_header_bytes:
            raise _HeaderTooLarge(f"request line and headers exceed {self._max_header_bytes} bytes")

    def on_header(self, name: bytes, value: bytes) -> None:
        if self._head_started_at is not None:
            self._fields.append((name, value))
        # else a trailer field after a chunked body: dropped, never forwarded as a header.
        self._header_bytes += len(name) + len(value) + 4
        if self._header_bytes > self._max_header_bytes:
            raise _HeaderTooLarge(f"request line and headers exceed {self._max_header_bytes} bytes")

    def on_headers_complete(self) -> None:
        self._head_started_at = None
        parser = self._parser
        target = self._url
        if not target.startswith(b"/"):
            target = _origin_form(target)
        request = Request(
            parser.get_method(),
            target,
            self._fields,
            parser.get_http_version() == "1.1",
            # After an Upgrade request the socket no longer carries HTTP/1.1 (see data_received).
            parser.should_keep_alive() and not parser.should_upgrade(),
            self._peer,
            RequestBody(self),
        )
        self._parsing = request
        if self._current is None:
            self._begin(request)
        else:
            self._queue.append(request)
            self.pause_reading()  # one pipelined request at a time is plenty

    def on_body(self, body: bytes) -> None:
        if self._parsing is not None:
            self._parsing.body.feed(body)

    def on_message_complete(self) -> None:
        if self._parsing is not None:
            self._parsing.body.feed_eof()
            self._parsing = None

    # --- request lifecycle -----------------------------------------------------------------

    def _begin(self, request: Request) -> None:
        self._current = request
        if _expects_continue(request.fields):
            self.write(_CONTINUE)
        self._task = self.loop.create_task(self._run(request, Responder(self, request)))

    async def _run(self, request: Request, responder: Responder) -> None:
        try:
            await self._handler(request, responder)
        except (asyncio.CancelledError, ConnectionResetError):
            request.keep_alive = False  # the client left (or the server is closing): nothing to answer
        except Exception:
            log.exception("request handler failed")
            if not responder.started and not self.closed:
                responder.send(
                    500, b"Content-Type: application/json\r\n", _error_body("internal", "internal error")
                )
            request.keep_alive = False
        finally:
            self._finish(request, responder)

    def _finish(self, request: Request, responder: Responder) -> None:
        self._current = None
        self._task = None
        self.last_active = self.loop.time()
        if self.closed:
            return
        if not responder.done:
            responder.abort()
            return
        # A body the handler did not read would be parsed as the next request: close instead.
        if not request.keep_alive or not request.body.at_eof or self.draining:
            self._linger_close()
            return
        if self._queue:
            self._begin(self._queue.popleft())
        self.resume_reading()

    def refuse(self, status: int, error_type: str, message: str) -> None:
        """Answer a connection the server will not serve, then close it."""
        self._no_more_requests = True
        self._reject(status, error_type, message)

    def _reject(self, status: int, error_type: str, message: str) -> None:
        """Answer a request that could not be parsed, then close."""
        self._parser = httptools.HttpRequestParser(self)  # the old one is in an error state
        if self._current is not None:
            # The handler owns the response being written: nothing can be answered, so the
            # connection goes at once (which also stops the handler).
            self.close()
            return
        if not self.closed:
            body = _error_body(error_type, message)
            head = status_line(status) + b"Content-Type: application/json\r\nContent-Length: %d\r\n" % len(
                body
            )
            self.write(head + b"Connection: close\r\n\r\n" + body)
        self._linger_close()

    def _linger_close(self) -> None:
        """Close after the answer, without losing it to a reset.

        Closing a socket with unread input makes the kernel send a reset, which can destroy the
        response still on its way to the client (an error answer to a large upload, the last
        answer before unparsed pipelined requests). So shut down the sending side, read and
        discard what the client still sends, and close at its EOF or after LINGER_S (as nginx's
        lingering close does).
        """
        transport = self.transport
        if transport is None or self.closed or self._lingering:
            return
        self._lingering = True
        self._no_more_requests = True
        if transport.can_write_eof():
            transport.write_eof()
        FlowControl.resume_reading(self)
        self.loop.call_later(LINGER_S, self.close)

    def _stop_reading_requests(self) -> None:
        """Too many pipelined requests: answer those already read, then close."""
        self._no_more_requests = True
        self._parser = httptools.HttpRequestParser(self)  # the old one is in an error state
        self._head_started_at = None
        if self._queue:
            self._queue[-1].keep_alive = False
        self.pause_reading()

    def check_timeouts(self, now: float, header_timeout_s: float, body_timeout_s: float) -> None:
        """Enforce the header and body timeouts (called by the server's periodic sweep)."""
        if self._head_started_at is not None and now - self._head_started_at > header_timeout_s:
            self._reject(
                408, "request_timeout", f"request headers not received within {header_timeout_s:g} s"
            )
            return
        parsing = self._parsing
        if parsing is not None and not self._reading_paused and now - self.last_active > body_timeout_s:
            # The handler answers 408 if it has not started; the unread body then closes the connection.
            parsing.body.fail(RequestTimeout(f"request body silent for more than {body_timeout_s:g} s"))
            self._parsing = None
            self.pause_reading()

    # --- transport helpers -----------------------------------------------------------------

    def write(self, data: bytes) -> None:
        transport = self.transport
        if self.closed or transport is None or transport.is_closing():
            raise self.connection_error()
        transport.write(data)

    def resume_reading(self) -> None:
        # A queued pipelined request keeps the socket paused until it is the one being answered.
        if not self._queue and not self._no_more_requests:
            if self._reading_paused:
                self.last_active = self.loop.time()  # a pause is not the client being slow
            super().resume_reading()


def _origin_form(target: bytes) -> bytes:
    """The path and query of an absolute-form target (`http://host/path?q`), as a proxy gets it."""
    try:
        url = httptools.parse_url(target)
    except httptools.HttpParserInvalidURLError:
        return b"/"
    path = url.path or b"/"
    return path + b"?" + url.query if url.query else path


def _expects_continue(fields: list[tuple[bytes, bytes]]) -> bool:
    for name, value in fields:
        if len(name) == 6 and name.lower() == b"expect":
            return value.strip().lower() == b"100-continue"
    return False


class HttpServer:
    """Listens, tracks connections, closes idle keep-alives, and drains on shutdown."""

    def __init__(
        self,
        handler: Handler,
        *,
        max_header_bytes: int,
        keepalive_s: float = KEEPALIVE_S,
        sweep_interval_s: float | None = None,
        header_timeout_s: float = HEADER_TIMEOUT_S,
        body_timeout_s: float = BODY_TIMEOUT_S,
        max_connections: int | None = None,
    ) -> None:
        self.handler = handler
        self.max_header_bytes = max_header_bytes
        self.keepalive_s = keepalive_s
        # Timeouts are enforced by a periodic sweep: often enough that each holds to about a
        # quarter of itself, and no more often than that.
        self.sweep_interval_s = sweep_interval_s or max(
            MIN_SWEEP_INTERVAL_S,
            min(SWEEP_INTERVAL_S, keepalive_s / 4, header_timeout_s / 4, body_timeout_s / 4),
        )
        self.header_timeout_s = header_timeout_s
        self.body_timeout_s = body_timeout_s
        self.max_connections = max_connections
        self.refused_connections = 0
        self.evicted_connections = 0
        self.connections: set[HttpProtocol] = set()
        self.draining = False
        self._server: asyncio.Server | None = None
        self._sweeper: asyncio.TimerHandle | None = None

    async def start(self, host: str, port: int, *, backlog: int = 1024, reuse_port: bool = False) -> None:
        """Listen on host:port (0 picks a free port) on the running loop."""
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: HttpProtocol(self, loop), host, port, backlog=backlog, reuse_port=reuse_port or None
        )
        self._sweeper = loop.call_later(self.sweep_interval_s, self._sweep, loop)

    @property
    def port(self) -> int:
        """The port listened on."""
        assert self._server is not None and self._server.sockets
        return int(self._server.sockets[0].getsockname()[1])

    def admit(self, conn: HttpProtocol) -> None:
        """A client connected: over max_connections, the oldest idle one makes room, else it is refused."""
        connections = self.connections
        connections.add(conn)
        limit = self.max_connections
        if limit is None or len(connections) <= limit:
            return
        idle = [c for c in connections if c.idle and c is not conn and not c.closed]
        if idle:
            min(idle, key=lambda c: c.last_active).close()
            self.evicted_connections += 1
            return
        self.refused_connections += 1
        conn.refuse(503, "too_many_connections", f"the gateway serves at most {limit} client connections")

    def _sweep(self, loop: asyncio.AbstractEventLoop) -> None:
        now = loop.time()
        cutoff = now - self.keepalive_s
        for conn in list(self.connections):
            if conn.idle and conn.last_active < cutoff:
                conn.close()
            else:
                conn.check_timeouts(now, self.header_timeout_s, self.body_timeout_s)
        self._sweeper = loop.call_later(self.sweep_interval_s, self._sweep, loop)

    async def shutdown(self, grace_s: float) -> None:
        """Stop accepting, let in-flight requests finish within `grace_s`, then close everything."""
        loop = asyncio.get_running_loop()
        self.draining = True
        if self._sweeper is not None:
            self._sweeper.cancel()
        if self._server is not None:
            self._server.close()
        deadline = loop.time() + grace_s
        while True:
            for conn in list(self.connections):
                if conn.idle:
                    conn.close()
            if not self.connections or loop.time() >= deadline:
                break
            await asyncio.sleep(0.05)
        for conn in list(self.connections):
            conn.close()
        if self._server is not None:
            await self._server.wait_closed()
