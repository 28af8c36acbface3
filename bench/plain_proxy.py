"""A plain aiohttp + uvloop forwarding proxy: the Python floor a full gateway is compared with.

One ClientSession (keep-alive, no connection limit), request body read so it can be replayed,
response streamed; round robin, and one retry on the other upstream on a connection error or 5xx.
Usage: python -m bench.plain_proxy --port 8080 --upstream http://127.0.0.1:8001 --upstream ...
"""

from __future__ import annotations

import argparse
import itertools
from collections.abc import AsyncIterator

import aiohttp
import uvloop
from aiohttp import web
from multidict import CIMultiDict

HOP = frozenset(
    {"connection", "keep-alive", "proxy-connection", "te", "trailer", "transfer-encoding", "upgrade"}
)
SESSION = web.AppKey("session", aiohttp.ClientSession)


def build_app(upstreams: list[str]) -> web.Application:
    app = web.Application(client_max_size=16 * 1024 * 1024)
    turn = itertools.count()

    async def session_ctx(app: web.Application) -> AsyncIterator[None]:
        connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=300)
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=2)
        app[SESSION] = aiohttp.ClientSession(connector=connector, timeout=timeout, auto_decompress=False)
        yield
        await app[SESSION].close()

    async def handle(request: web.Request) -> web.StreamResponse:
        body = await request.read()
        headers = CIMultiDict((k, v) for k, v in request.headers.items() if k.lower() not in HOP)
        headers.popall("Host", None)
        headers.popall("Content-Length", None)
        first = next(turn)
        for attempt in range(2):
            base = upstreams[(first + attempt) % len(upstreams)]
            try:
                up = await app[SESSION].request(
                    request.method, base + request.path_qs, headers=headers, data=body, allow_redirects=False
                )
            except aiohttp.ClientConnectionError:
                if attempt == 0:
                    continue
                raise web.HTTPBadGateway() from None
            if up.status >= 500 and attempt == 0:
                up.release()
                continue
            out = web.StreamResponse(status=up.status, reason=up.reason)
            out.headers.extend((k, v) for k, v in up.headers.items() if k.lower() not in HOP)
            await out.prepare(request)
            async for chunk in up.content.iter_any():
                await out.write(chunk)
            up.release()
            await out.write_eof()
            return out
        raise web.HTTPBadGateway()

    app.cleanup_ctx.append(session_ctx)
    app.router.add_route("*", "/{tail:.*}", handle)
    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", action="append", required=True)
    args = parser.parse_args()
    upstreams = [u.rstrip("/") for u in args.upstream]
    web.run_app(
        build_app(upstreams),
        host="127.0.0.1",
        port=args.port,
        access_log=None,
        loop=uvloop.new_event_loop(),
        print=None,
    )


if __name__ == "__main__":
    main()
