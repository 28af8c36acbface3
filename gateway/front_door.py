"""The async front door: `Prefer: respond-async` (RFC 7240) turns a request into a job.

With `jobs.url` configured, a proxied request that carries `Prefer: respond-async` is submitted
to the jobs API as an `inference` job (the same method, path with query, and JSON body; the
caller's `Authorization`/`api-key` go both to the jobs API and into the job's own request, so
the gateway admits it when it runs), and the client gets the jobs API's `202 Accepted` at once
with `Location` of the job (absolute, on the jobs API) and `Preference-Applied: respond-async`.
The job then runs through the gateway like any request, with its failover and retries. Without
`jobs.url` the preference is ignored, as RFC 7240 allows.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import aiohttp
import orjson

log = logging.getLogger(__name__)

PREFER = b"prefer"
_CREDENTIALS = (("Authorization", b"authorization"), ("api-key", b"api-key"))


def wants_async(prefer: bytes | None) -> bool:
    """Whether a Prefer field asks for respond-async (tokens are case-insensitive)."""
    if not prefer:
        return False
    return any(p.split(b"=", 1)[0].strip().lower() == b"respond-async" for p in prefer.split(b","))


@dataclass(frozen=True, slots=True)
class Answer:
    """What the client gets back."""

    status: int
    fields: bytes  # header lines, each ending in CRLF
    body: bytes


class FrontDoorError(Exception):
    """The request cannot become a job; `status` and `message` shape the JSON error."""

    def __init__(self, status: int, error_type: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.error_type = error_type
        self.message = message


class AsyncFrontDoor:
    """Submits requests to the jobs API; one aiohttp session, opened on first use."""

    def __init__(self, jobs_url: str, timeout_s: float) -> None:
        self._url = jobs_url.rstrip("/")
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._session: aiohttp.ClientSession | None = None

    async def submit(
        self, method: bytes, target: bytes, body: bytes | bytearray | None, captured: dict[bytes, bytes]
    ) -> Answer:
        """Submit one request as a job; raises FrontDoorError."""
        try:
            payload = orjson.loads(body) if body else None
        except orjson.JSONDecodeError:
            raise FrontDoorError(
                400, "invalid_request", "Prefer: respond-async needs a JSON request body"
            ) from None
        credentials = {name: captured[key].decode("latin-1") for name, key in _CREDENTIALS if key in captured}
        job = {
            "type": "inference",
            "input": {
                "method": method.decode("ascii"),
                "path": target.decode("latin-1"),
                "body": payload,
                "headers": credentials,
            },
        }
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=self._timeout, trust_env=False)
        try:
            async with self._session.post(
                f"{self._url}/v1/jobs",
                data=orjson.dumps(job),
                headers={"Content-Type": "application/json", **credentials},
                allow_redirects=False,
            ) as resp:
                answer = await resp.read()
                status = resp.status
                location = resp.headers.get("Location")
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            log.warning("jobs API at %s did not take a respond-async request: %s", self._url, exc)
            raise FrontDoorError(
                503, "jobs_unavailable", f"the jobs API did not take the request ({type(exc).__name__})"
            ) from None
        fields = b"Content-Type: application/json\r\n"
        if status == 202:
            fields += b"Preference-Applied: respond-async\r\n"
            if location:
                absolute = location if "://" in location else self._url + location
                fields += b"Location: %b\r\n" % absolute.encode("latin-1")
        return Answer(status, fields, answer)

    async def close(self) -> None:
        """Close the session."""
        if self._session is not None:
            await self._session.close()
            self._session = None
