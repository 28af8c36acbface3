"""The jobs API's HTTP server: aiohttp's, with limits against slow clients and JSON errors.

aiohttp's server has no deadline for a request head: a client may connect, send half a request
line and keep the connection (and a file descriptor) for as long as it likes, and enough such
clients exhaust the process's descriptors until even `/healthz` cannot be accepted. Here:

- `JobsRequestHandler` (one client connection) must receive each complete request head within
  `header_timeout_s` of connecting, or of the first byte of a later request on a keep-alive
  connection; otherwise it answers 408 and closes. (The body's idle timeout is enforced where the
  body is read, `jobs_api.routes.read_json_object`.) A request aiohttp cannot parse, or a response
  it cannot produce, is answered with the API's JSON error body instead of aiohttp's plain text,
  and a malformed request is logged at info: it is the client's problem, not a server error.
- `JobsServer` serves at most `max_connections` connections: at the cap the connection idle the
  longest (no request in progress, no bytes of one received) is closed to make room, and when
  none is idle the new connection gets 503 and is closed.
- `JobsAppRunner` is `web.AppRunner` serving connections with these two.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, Final, Protocol, TypeVar

import orjson
from aiohttp import web
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest

from jobs_api.routes import HTTP_ERROR_TYPES, error_response

log = logging.getLogger(__name__)

# Idle keep-alive connections are closed after this long (aiohttp's run_app default, and the
# gateway's); aiohttp's RequestHandler alone would keep them for an hour.
KEEPALIVE_S: Final = 75.0
# File descriptors kept back from client connections (store, logs, listening socket). The rest is
# split between client connections and the runner's connections to the gateway.
FD_RESERVE: Final = 100
MIN_CONNECTIONS: Final = 16
# Longest a refused connection reads and discards what the client still sends before it closes.
LINGER_S: Final = 2.0


def default_max_connections(open_files: int | None) -> int | None:
    """Client connections that fit in `open_files` descriptors, with room for the rest."""
    if open_files is None:
        return None
    return max(MIN_CONNECTIONS, (open_files - FD_RESERVE) // 2)


class Connection(Protocol):
    """What the connection cap needs to know of a connection."""

    @property
    def idle(self) -> bool: ...
    @property
    def closing(self) -> bool: ...
    @property
    def last_active(self) -> float: ...


C = TypeVar("C", bound=Connection)


def make_room(open_connections: Iterable[C], newest: C, limit: int | None) -> tuple[bool, C | None]:
    """Whether `newest` of `open_connections` may stay, and which other idle one to close for it.

    Under the limit: (True, None). Over it: (True, the other connection idle the longest), or
    (False, None) when no other is idle, so `newest` is refused. Closing connections do not count.
    """
    live = [c for c in open_connections if not c.closing]
    if limit is None or len(live) <= limit:
        return True, None
    idle = [c for c in live if c.idle and c is not newest]
    if not idle:
        return False, None
    return True, min(idle, key=lambda c: c.last_active)


def raw_response(status: int, reason: str, error_type: str, message: str) -> bytes:
    """A complete HTTP/1.1 JSON error response that closes the connection, for use outside aiohttp."""
    body = orjson.dumps({"error": {"type": error_type, "message": message}})
    head = (
        f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    )
    return head.encode() + body


class JobsRequestHandler(RequestHandler):
    """One client connection (aiohttp's protocol) with a request-head deadline and JSON errors."""

    def __init__(self, manager: web.Server, *, header_timeout_s: float, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self.header_timeout_s = header_timeout_s
        self.last_active = self._loop.time()
        self._head_timer: asyncio.TimerHandle | None = None
        # Bytes of a request head have arrived but not the whole head yet.
        self._partial_head = False
        # Answered without a request (408, 503): whatever the client sends now is discarded.
        self._refused = False
        self._lingering = False
        self._linger_timer: asyncio.TimerHandle | None = None

    # aiohttp's private state read here: `_waiter` is the future its request loop awaits while it
    # waits for the next request head; `_request_count` counts the heads parsed so far.

    @property
    def idle(self) -> bool:
        """No request in progress and no byte of the next one received: safe to close."""
        if self._partial_head:
            return False
        return self._request_count == 0 or self._waiter is not None

    @property
    def closing(self) -> bool:
        """Closed or being closed."""
        return self.transport is None or self._force_close or self._refused

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        if not self.closing:  # the server may have refused it already
            self._arm_head_timer()

    def connection_lost(self, exc: BaseException | None) -> None:
        self._cancel_head_timer()
        if self._linger_timer is not None:
            self._linger_timer.cancel()
        manager = self._manager
        if self._lingering and isinstance(manager, JobsServer):
            self._lingering = False
            manager.stop_lingering()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        self.last_active = self._loop.time()
        if self._refused:
            return  # answered and closing: what the client still sends is discarded
        heads = self._request_count
        waiting = self._request_count == 0 or self._waiter is not None
        super().data_received(data)
        if self._request_count != heads:
            self._partial_head = False
            self._cancel_head_timer()
        elif data and waiting:
            # The first bytes of a request on a connection that was waiting for one: its head
            # must now be complete within the timeout.
            self._partial_head = True
            if self._head_timer is None:
                self._arm_head_timer()

    def _arm_head_timer(self) -> None:
        self._head_timer = self._loop.call_later(self.header_timeout_s, self._head_timed_out)

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        log.debug("closing a connection whose request head did not arrive in %g s", self.header_timeout_s)
        self.refuse(
            408,
            "Request Timeout",
            "request_timeout",
            f"request headers not received within {self.header_timeout_s:g} s (JOBS_CLIENT_HEADER_TIMEOUT_S)",
        )

    def refuse_soon(self, status: int, reason: str, error_type: str, message: str) -> None:
        """`refuse` on the next turn of the loop; from now on nothing the client sends is read.

        For a connection refused as it is made: its request task does not exist yet, and must
        see the connection closing rather than start after it is gone.
        """
        self._refused = True
        self._loop.call_soon(self.refuse, status, reason, error_type, message)

    def refuse(self, status: int, reason: str, error_type: str, message: str) -> None:
        """Answer without reading a request, then close the connection."""
        self._refused = True
        self._cancel_head_timer()
        transport = self.transport
        if transport is None or self._force_close:
            return
        transport.write(raw_response(status, reason, error_type, message))
        manager = self._manager
        if not transport.can_write_eof() or not (
            isinstance(manager, JobsServer) and manager.start_lingering()
        ):
            self.force_close()  # the transport sends what is buffered before it closes
            return
        # Closing with unread request bytes would make the kernel send a reset, which can destroy
        # the answer before the client reads it: end our side, discard what still comes (aiohttp
        # drops data once close() is called) and close when the client does, or after LINGER_S.
        self._lingering = True
        self.close()
        transport.write_eof()
        self._linger_timer = self._loop.call_later(LINGER_S, self.force_close)

    def handle_error(
        self,
        request: BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        """The response to a request the app never saw (malformed) or could not answer; closes."""
        if request.writer.output_size > 0:
            # Part of a response is out already: no second one can follow (aiohttp's own rule).
            raise ConnectionError("response already started; connection dropped")
        if status < 500:
            text = (message or str(exc) or "malformed request").strip()
            # aiohttp's parser messages quote the offending bytes on further lines; one is enough.
            text = text.splitlines()[0].rstrip(":")[:200] if text else "malformed request"
            log.info("malformed HTTP request from %s: %s", request.remote, text)
            response = error_response(
                status, HTTP_ERROR_TYPES.get(status, "invalid_request"), f"malformed HTTP request: {text}"
            )
        else:
            log.error("error handling a request from %s", request.remote, exc_info=exc)
            response = error_response(
                status, "internal_error", "internal error; the server log has the details"
            )
        response.force_close()
        return response


class JobsServer(web.Server):
    """aiohttp's low-level server with `JobsRequestHandler` connections, at most `max_connections`."""

    def __init__(
        self,
        handler: Callable[[BaseRequest], Awaitable[web.StreamResponse]],
        *,
        header_timeout_s: float,
        max_connections: int | None,
        **kwargs: Any,
    ) -> None:
        super().__init__(handler, **kwargs)
        self.header_timeout_s = header_timeout_s
        self.max_connections = max_connections
        self.evicted_connections = 0
        self.refused_connections = 0
        self._open: set[JobsRequestHandler] = set()
        self._lingering = 0

    def __call__(self) -> RequestHandler:
        return JobsRequestHandler(
            self, loop=self._loop, header_timeout_s=self.header_timeout_s, **self._kwargs
        )

    def connection_made(self, handler: RequestHandler, transport: asyncio.Transport) -> None:
        super().connection_made(handler, transport)
        if not isinstance(handler, JobsRequestHandler):
            return
        self._open.add(handler)
        admit, to_close = make_room(self._open, handler, self.max_connections)
        if to_close is not None:
            self.evicted_connections += 1
            to_close.force_close()
        if admit:
            return
        self.refused_connections += 1
        handler.refuse_soon(
            503,
            "Service Unavailable",
            "too_many_connections",
            f"the jobs API serves at most {self.max_connections} client connections (JOBS_MAX_CONNECTIONS)",
        )

    def start_lingering(self) -> bool:
        """Whether a refused connection may linger (see `JobsRequestHandler.refuse`); counts it."""
        # Lingering connections hold descriptors too: a flood of refusals must not exhaust them.
        budget = (
            MIN_CONNECTIONS
            if self.max_connections is None
            else max(MIN_CONNECTIONS, self.max_connections // 4)
        )
        if self._lingering >= budget:
            return False
        self._lingering += 1
        return True

    def stop_lingering(self) -> None:
        """A lingering connection has closed."""
        self._lingering -= 1

    def connection_lost(self, handler: RequestHandler, exc: BaseException | None = None) -> None:
        if isinstance(handler, JobsRequestHandler):
            self._open.discard(handler)
        super().connection_lost(handler, exc)


class JobsAppRunner(web.AppRunner):
    """`web.AppRunner` whose connections are `JobsRequestHandler`s under a `JobsServer`."""

    def __init__(
        self,
        app: web.Application,
        *,
        header_timeout_s: float,
        max_connections: int | None = None,
        **kwargs: Any,
    ) -> None:
        kwargs.setdefault("keepalive_timeout", KEEPALIVE_S)
        super().__init__(app, **kwargs)
        self._header_timeout_s = header_timeout_s
        self._max_connections = max_connections

    async def _make_server(self) -> web.Server:
        # AppRunner's own server runs the app's startup and freezes it; ours takes over its handler.
        server = await super()._make_server()
        return JobsServer(
            server.request_handler,
            request_factory=server.request_factory,
            loop=asyncio.get_running_loop(),
            header_timeout_s=self._header_timeout_s,
            max_connections=self._max_connections,
            **self._kwargs,
        )
