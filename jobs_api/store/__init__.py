"""Job stores behind one interface, chosen by URL scheme."""

from __future__ import annotations

from urllib.parse import urlsplit

from jobs_api.store.base import JobEvent, JobQuery, JobStore, LogLevel, LogLine, redacted_url
from jobs_api.store.redis import (
    DEFAULT_MAX_CONNECTIONS,
    DEFAULT_POOL_TIMEOUT_S,
    DEFAULT_PREFIX,
    DEFAULT_RETENTION_S,
    RedisJobStore,
)
from jobs_api.store.sqlite import SqliteJobStore

__all__ = ["JobEvent", "JobQuery", "JobStore", "LogLevel", "LogLine", "open_store", "redacted_url"]


def open_store(
    url: str,
    *,
    prefix: str = DEFAULT_PREFIX,
    retention_s: float = DEFAULT_RETENTION_S,
    max_connections: int = DEFAULT_MAX_CONNECTIONS,
    pool_timeout_s: float = DEFAULT_POOL_TIMEOUT_S,
) -> JobStore:
    """The store for `url`: `sqlite:///path.db`, or `redis://[:password@]host:port/db` (`rediss://`
    for TLS), whose keys all start with `prefix` and whose finished jobs expire after `retention_s`,
    over at most `max_connections` connections (a call waits up to `pool_timeout_s` for one).
    Raises ValueError for an unusable URL; nothing connects until `open()`.
    """
    scheme = urlsplit(url).scheme
    if scheme == "sqlite":
        return SqliteJobStore.from_url(url)
    if scheme in ("redis", "rediss"):
        return RedisJobStore.from_url(
            url,
            prefix=prefix,
            retention_s=retention_s,
            max_connections=max_connections,
            pool_timeout_s=pool_timeout_s,
        )
    raise ValueError(
        f"unsupported store URL scheme {scheme!r}; use sqlite:///path/to/jobs.db or redis://host:6379/0"
    )
