"""Network faults between a client and Redis, for tests: a loopback TCP proxy a test can degrade.

The proxy forwards bytes both ways until told otherwise. `blackhole()` drops everything in both
directions while keeping every connection open (a partition: calls hang until the client's own
timeout); `drop_replies()` still forwards requests to Redis but drops its replies (the write
happens, the client never learns it did); `heal()` forwards again and `close()` resets every
connection. Only ever listens on 127.0.0.1.
"""

from __future__ import annotations

import asyncio

from tests.conftest import free_port


class FaultProxy:
    """A loopback TCP forwarder to `target` whose two directions can be stopped."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.port = free_port()
        self.forward_requests = True
        self.forward_replies = True
        self.requests_dropped = 0  # bytes
        self.replies_dropped = 0
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    def url(self, db: int = 0) -> str:
        return f"redis://127.0.0.1:{self.port}/{db}"

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)

    def blackhole(self) -> None:
        self.forward_requests = self.forward_replies = False

    def drop_replies(self) -> None:
        self.forward_requests, self.forward_replies = True, False

    def heal(self) -> None:
        self.forward_requests = self.forward_replies = True

    async def close(self) -> None:
        """Stop listening and reset every connection."""
        if self._server is not None:
            self._server.close()
            self._server = None
        for writer in list(self._writers):
            writer.close()
        self._writers.clear()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            try:
                up_reader, up_writer = await asyncio.open_connection(*self.target)
            except OSError:
                writer.close()
                return
            self._writers |= {writer, up_writer}
            await asyncio.gather(
                self._pipe(reader, up_writer, requests=True), self._pipe(up_reader, writer, requests=False)
            )
            self._writers -= {writer, up_writer}
        finally:
            self._tasks.discard(task)

    async def _pipe(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter, *, requests: bool) -> None:
        try:
            while data := await src.read(65536):
                if self.forward_requests if requests else self.forward_replies:
                    dst.write(data)
                    await dst.drain()
                elif requests:
                    self.requests_dropped += len(data)
                else:
                    self.replies_dropped += len(data)
        except (OSError, RuntimeError):
            pass
        finally:
            dst.close()
