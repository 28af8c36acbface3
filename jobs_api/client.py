"""Async client of the jobs API: submit, inspect, list, cancel, stream events and wait.

`wait` follows the job's event stream and falls back to polling (with backoff) when the stream is
unavailable or breaks, so it also works behind proxies that do not pass Server-Sent Events.
"""

from __future__ import annotations

import asyncio
import builtins
import logging
from collections.abc import AsyncIterator, Callable, Mapping
from types import TracebackType
from typing import Any, Final

import aiohttp
import orjson

log = logging.getLogger(__name__)

TERMINAL: Final = frozenset({"completed", "failed", "cancelled", "timed_out"})
# The server sends a keepalive every 15 s (its default JOBS_SSE_KEEPALIVE_S); a silence of three
# of them means the stream is dead.
STREAM_READ_TIMEOUT_S: Final = 45.0
MAX_POLL_INTERVAL_S: Final = 5.0
POLL_BACKOFF: Final = 1.5

OnUpdate = Callable[[dict[str, Any]], None]


class JobsClientError(Exception):
    """The jobs API answered with an error: HTTP status, error type and message."""

    def __init__(self, status: int, type: str, message: str) -> None:
        super().__init__(f"{status} {type}: {message}")
        self.status = status
        self.type = type
        self.message = message


def _client_error(status: int, body: bytes) -> JobsClientError:
    try:
        data = orjson.loads(body)
        error = data["error"]
        return JobsClientError(status, str(error["type"]), str(error["message"]))
    except (orjson.JSONDecodeError, KeyError, TypeError):
        text = body.decode("utf-8", "replace").strip()[:500]
        return JobsClientError(status, "http_error", text or f"HTTP {status}")


async def parse_sse(lines: AsyncIterator[bytes]) -> AsyncIterator[dict[str, Any]]:
    """Server-Sent Events from raw lines: `{"id": int | None, "event": str, "data": Any}`."""
    event_id: int | None = None
    event_type = "message"
    data: builtins.list[str] = []
    async for raw in lines:
        line = raw.decode("utf-8").rstrip("\r\n")
        if not line:
            if data:
                yield {"id": event_id, "event": event_type, "data": orjson.loads("\n".join(data))}
            event_type, data = "message", []
            continue
        if line.startswith(":"):
            continue  # a comment: keepalive
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "data":
            data.append(value)
        elif name == "event":
            event_type = value
        elif name == "id" and value.isdigit():
            event_id = int(value)


class JobsClient:
    """Client of one jobs API; use as `async with JobsClient(url, api_key=...) as jobs:`.

    A session passed in is used as is and left open; otherwise the client owns one.
    """

    def __init__(
        self,
        base_url: str,
        *,
        api_key: str | None = None,
        session: aiohttp.ClientSession | None = None,
        request_timeout_s: float = 30.0,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self._api_key = api_key
        self._session = session
        self._owns_session = session is None
        self._timeout = aiohttp.ClientTimeout(total=request_timeout_s)

    async def __aenter__(self) -> JobsClient:
        self._http()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the session if this client opened it."""
        if self._owns_session and self._session is not None:
            await self._session.close()
            self._session = None

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None, sock_connect=10))
        return self._session

    def _headers(self, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        headers = {"Accept": "application/json"}
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
        headers.update(extra or {})
        return headers

    async def _request(
        self,
        method: str,
        path: str,
        *,
        body: Any = None,
        params: Mapping[str, str] | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> dict[str, Any]:
        extra = dict(headers or {})
        data = None
        if body is not None:
            data = orjson.dumps(body)
            extra["Content-Type"] = "application/json"
        async with self._http().request(
            method,
            self.base_url + path,
            data=data,
            params=params,
            headers=self._headers(extra),
            timeout=self._timeout,
        ) as resp:
            raw = await resp.read()
            if resp.status >= 400:
                raise _client_error(resp.status, raw)
            result: dict[str, Any] = orjson.loads(raw)
            return result

    async def submit(self, job: Mapping[str, Any], idempotency_key: str | None = None) -> dict[str, Any]:
        """Submit a job (`{"type", "input", ...}`); returns it as accepted (status queued)."""
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key is not None else None
        return await self._request("POST", "/v1/jobs", body=dict(job), headers=headers)

    async def get(self, job_id: str) -> dict[str, Any]:
        """The job as it is now."""
        return await self._request("GET", f"/v1/jobs/{job_id}")

    async def cancel(self, job_id: str) -> dict[str, Any]:
        """Ask the job to stop; a queued job is cancelled at once, a running one soon after."""
        return await self._request("POST", f"/v1/jobs/{job_id}/cancel")

    async def result(self, job_id: str) -> dict[str, Any]:
        """The finished job's result or error; JobsClientError 409 while it has not finished."""
        return await self._request("GET", f"/v1/jobs/{job_id}/result")

    async def logs(self, job_id: str, level: str = "debug") -> builtins.list[dict[str, Any]]:
        """The job's log lines at `level` or above."""
        data = await self._request("GET", f"/v1/jobs/{job_id}/logs", params={"level": level})
        lines: builtins.list[dict[str, Any]] = data["logs"]
        return lines

    async def events(self, job_id: str, last_event_id: int | None = None) -> AsyncIterator[dict[str, Any]]:
        """The job's events (`{"id", "event", "data"}`) after `last_event_id`, to its terminal state."""
        headers = {"Accept": "text/event-stream"}
        if last_event_id is not None:
            headers["Last-Event-ID"] = str(last_event_id)
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=STREAM_READ_TIMEOUT_S)
        async with self._http().get(
            f"{self.base_url}/v1/jobs/{job_id}/events", headers=self._headers(headers), timeout=timeout
        ) as resp:
            if resp.status >= 400:
                raise _client_error(resp.status, await resp.read())
            if resp.content_type != "text/event-stream":
                raise JobsClientError(resp.status, "not_an_event_stream", f"got {resp.content_type}")
            async for event in parse_sse(resp.content.__aiter__()):
                yield event

    async def wait(
        self,
        job_id: str,
        timeout_s: float | None,
        poll_interval_s: float = 0.5,
        *,
        on_update: OnUpdate | None = None,
    ) -> dict[str, Any]:
        """The job once it has finished; raises TimeoutError after `timeout_s` (None: no limit).

        `on_update` gets each snapshot seen on the way (status, attempts, progress).
        """
        async with asyncio.timeout(timeout_s):
            last_id = await self._follow(job_id, on_update)
            if last_id is None:
                return await self.get(job_id)
            return await self._poll(job_id, poll_interval_s, on_update)

    async def _follow(self, job_id: str, on_update: OnUpdate | None) -> int | None:
        """Follow the event stream to the terminal state: None when it got there, else the last id.

        Returns the last event id seen (0 if none) when the stream is unavailable or broke.
        """
        last_id = 0
        try:
            async for event in self.events(job_id, last_event_id=last_id or None):
                last_id = event["id"] or last_id
                data = event["data"]
                if on_update is not None and isinstance(data, dict):
                    on_update(data)
                if event["event"] == "state" and isinstance(data, dict) and data.get("status") in TERMINAL:
                    return None
        except (TimeoutError, JobsClientError, aiohttp.ClientError, ValueError) as exc:
            if isinstance(exc, JobsClientError) and exc.status in (400, 401, 403):
                raise  # polling would be refused the same way
            log.info("event stream of job %s unavailable (%s); polling instead", job_id, exc)
        return last_id

    async def _poll(self, job_id: str, interval_s: float, on_update: OnUpdate | None) -> dict[str, Any]:
        delay = interval_s
        while True:
            try:
                job = await self.get(job_id)
            except aiohttp.ClientError as exc:
                log.info("polling job %s: %s; retrying in %.1f s", job_id, exc, delay)
            except JobsClientError as exc:
                if exc.status < 500:
                    raise
                log.info("polling job %s: %s; retrying in %.1f s", job_id, exc, delay)
            else:
                if on_update is not None:
                    on_update(job)
                if job.get("status") in TERMINAL:
                    return job
            await asyncio.sleep(delay)
            delay = min(delay * POLL_BACKOFF, max(interval_s, MAX_POLL_INTERVAL_S))

    async def list(self, **filters: Any) -> dict[str, Any]:
        """One page of jobs, newest first: `{"jobs": [...], "next_cursor": str | None}`.

        Filters: status, type, created_after, created_before (RFC 3339 or epoch seconds),
        limit (1..100) and cursor (the previous page's next_cursor); None values are left out.
        """
        params = {k: str(v) for k, v in filters.items() if v is not None}
        return await self._request("GET", "/v1/jobs", params=params)
