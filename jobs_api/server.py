"""The jobs API's HTTP server: aiohttp's, with errors outside the app answered in JSON.

aiohttp answers a request it cannot parse (and a response it cannot produce) itself, in plain
text, and logs it with a traceback at ERROR. `JobsRequestHandler` answers such requests with the
API's JSON error body instead; a malformed request is the client's problem and is logged at info.
`JobsAppRunner` is `web.AppRunner` serving connections with that handler.
"""

from __future__ import annotations

import asyncio
import logging

from aiohttp import web
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest

from jobs_api.routes import HTTP_ERROR_TYPES, error_response

log = logging.getLogger(__name__)


class JobsRequestHandler(RequestHandler):
    """One client connection (aiohttp's protocol), with JSON answers to unparseable requests."""

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
    """aiohttp's low-level server, making a `JobsRequestHandler` for each connection."""

    def __call__(self) -> RequestHandler:
        return JobsRequestHandler(self, loop=self._loop, **self._kwargs)


class JobsAppRunner(web.AppRunner):
    """`web.AppRunner` whose connections are served by `JobsRequestHandler`."""

    async def _make_server(self) -> web.Server:
        # AppRunner's own server runs the app's startup and freezes it; ours takes over its handler.
        server = await super()._make_server()
        return JobsServer(
            server.request_handler,
            request_factory=server.request_factory,
            loop=asyncio.get_running_loop(),
            **self._kwargs,
        )
