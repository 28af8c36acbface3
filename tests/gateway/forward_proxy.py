"""A small HTTP/1.1 forward proxy on loopback for the egress tests.

It forwards absolute-form requests (`GET http://127.0.0.1:8000/x HTTP/1.1`) on kept-alive
connections and tunnels CONNECT, records every request it was asked (with the number of the
client connection it came on), and answers 407 without the expected Proxy-Authorization. Only
127.0.0.1 may be a target; anything else gets 403.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
from dataclasses import dataclass
from urllib.parse import urlsplit

HOP_BY_HOP = frozenset({"proxy-authorization", "proxy-connection"})


@dataclass
class ProxiedRequest:
    """One request the proxy was asked, as it arrived."""

    conn: int  # which client connection (0, 1, ...) it came on
    method: str
    target: str
    headers: dict[str, str]  # lowercased names


class ForwardProxy:
    """`async with ForwardProxy(...) as proxy:`; `proxy.url` for the environment."""

    def __init__(
        self, *, credentials: tuple[str, str] | None = None, connect_status: int | None = None
    ) -> None:
        self.requests: list[ProxiedRequest] = []
        self.accepted = 0
        self._auth = None
        if credentials is not None:
            self._auth = "Basic " + base64.b64encode(":".join(credentials).encode()).decode()
        self._connect_status = connect_status  # answer CONNECT with this instead of tunnelling
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.port = 0

    async def __aenter__(self) -> ForwardProxy:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._server.wait_closed()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def methods(self) -> list[str]:
        return [r.method for r in self.requests]

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        conn = self.accepted
        self.accepted += 1
        upstreams: dict[tuple[str, int], tuple[asyncio.StreamReader, asyncio.StreamWriter]] = {}
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
                    return
                line, *fields = head[:-4].decode("latin-1").split("\r\n")
                method, target, _ = line.split(" ", 2)
                headers = {}
                for f in fields:
                    name, _, value = f.partition(":")
                    headers[name.strip().lower()] = value.strip()
                self.requests.append(ProxiedRequest(conn, method, target, headers))
                if self._auth is not None and headers.get("proxy-authorization") != self._auth:
                    await self._answer(writer, 407, 'Proxy-Authenticate: Basic realm="test"\r\n')
                    return
                if method == "CONNECT":
                    await self._tunnel(target, reader, writer)
                    return
                if not await self._forward(method, target, fields, headers, reader, writer, upstreams):
                    return
        finally:
            for _, up_writer in upstreams.values():
                up_writer.close()
            writer.close()
            self._tasks.discard(task)

    @staticmethod
    async def _answer(writer: asyncio.StreamWriter, status: int, extra: str = "") -> None:
        writer.write(f"HTTP/1.1 {status} Proxy Says No\r\n{extra}Content-Length: 0\r\n\r\n".encode())
        with contextlib.suppress(ConnectionError):
            await writer.drain()

    async def _tunnel(self, target: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        host, _, port = target.rpartition(":")
        if host.strip("[]") != "127.0.0.1":
            await self._answer(writer, 403)
            return
        if self._connect_status is not None:
            await self._answer(writer, self._connect_status)
            return
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", int(port))
        except OSError:
            await self._answer(writer, 502)
            return
        writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
        try:
            await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))
        finally:
            up_writer.close()

    async def _forward(
        self,
        method: str,
        target: str,
        fields: list[str],
        headers: dict[str, str],
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        upstreams: dict[tuple[str, int], tuple[asyncio.StreamReader, asyncio.StreamWriter]],
    ) -> bool:
        """Forward one absolute-form request; False when the client connection must close."""
        url = urlsplit(target)
        if url.scheme != "http" or url.hostname != "127.0.0.1" or url.port is None:
            await self._answer(writer, 403, "Connection: close\r\n")
            return False
        key = (url.hostname, url.port)
        if key not in upstreams:
            upstreams[key] = await asyncio.open_connection(*key)
        up_reader, up_writer = upstreams[key]
        path = (url.path or "/") + (f"?{url.query}" if url.query else "")
        kept = [f for f in fields if f.partition(":")[0].strip().lower() not in HOP_BY_HOP]
        head_out = "".join(f"{f}\r\n" for f in [f"{method} {path} HTTP/1.1", *kept]) + "\r\n"
        up_writer.write(head_out.encode("latin-1"))
        await _relay_body(reader, up_writer, headers)
        head = await up_reader.readuntil(b"\r\n\r\n")
        writer.write(head)
        status_line, *resp_fields = head[:-4].decode("latin-1").split("\r\n")
        resp_headers = {f.partition(":")[0].strip().lower(): f.partition(":")[2].strip() for f in resp_fields}
        status = int(status_line.split(" ")[1])
        if method == "HEAD" or status in (204, 304):
            pass
        elif not ("content-length" in resp_headers or "chunked" in resp_headers.get("transfer-encoding", "")):
            await _pipe(up_reader, writer)  # the body runs to the upstream's close
            return False
        else:
            await _relay_body(up_reader, writer, resp_headers)
        await writer.drain()
        return "close" not in resp_headers.get("connection", "").lower()


async def _relay_body(src: asyncio.StreamReader, dst: asyncio.StreamWriter, headers: dict[str, str]) -> None:
    """Copy one message body framed by Content-Length or chunked encoding."""
    if "chunked" in headers.get("transfer-encoding", ""):
        while True:
            size_line = await src.readuntil(b"\r\n")
            dst.write(size_line)
            if int(size_line.split(b";")[0], 16) == 0:
                while (line := await src.readuntil(b"\r\n")) != b"\r\n":
                    dst.write(line)
                dst.write(b"\r\n")
                return
            dst.write(await src.readexactly(int(size_line.split(b";")[0], 16) + 2))
            await dst.drain()
    length = int(headers.get("content-length", "0"))
    if length:
        dst.write(await src.readexactly(length))
        await dst.drain()


async def _pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
    """Copy bytes until EOF, then half-close (or close) the other side."""
    try:
        while data := await src.read(65536):
            dst.write(data)
            await dst.drain()
        if dst.can_write_eof():
            dst.write_eof()
    except (ConnectionError, OSError):
        dst.close()
