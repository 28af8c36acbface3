"""Job stores behind one interface, chosen by URL scheme."""

from __future__ import annotations

from urllib.parse import urlsplit

from jobs_api.store.base import JobEvent, JobQuery, JobStore, LogLevel, LogLine

__all__ = ["JobEvent", "JobQuery", "JobStore", "LogLevel", "LogLine", "open_store", "redacted_url"]

DEFAULT_REDIS_PREFIX = "jobs:"
DEFAULT_RETENTION_S = 7 * 24 * 3600.0


def open_store(
    url: str, *, prefix: str = DEFAULT_REDIS_PREFIX, retention_s: float = DEFAULT_RETENTION_S
) -> JobStore:
    """The store for `url`: `sqlite:///path.db`, or `redis://[:password@]host:port/db` (`rediss://`
    for TLS), whose keys all start with `prefix` and whose finished jobs expire after `retention_s`.
    Raises ValueError for an unusable URL; nothing connects until `open()`.
    """
    scheme = urlsplit(url).scheme
    if scheme == "sqlite":
        from jobs_api.store.sqlite import SqliteJobStore

        return SqliteJobStore.from_url(url)
    if scheme in ("redis", "rediss"):
        from jobs_api.store.redis import RedisJobStore

        return RedisJobStore.from_url(url, prefix=prefix, retention_s=retention_s)
    raise ValueError(
        f"unsupported store URL scheme {scheme!r}; use sqlite:///path/to/jobs.db or redis://host:6379/0"
    )


def redacted_url(url: str) -> str:
    """A store URL fit for logs: any password replaced by ***."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.netloc.rsplit("@", 1)[1]
    user = parts.username or ""
    return parts._replace(netloc=f"{user}:***@{host}").geturl()
