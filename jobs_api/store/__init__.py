"""Job stores behind one interface, chosen by URL scheme."""

from __future__ import annotations

from urllib.parse import urlsplit

from jobs_api.store.base import JobEvent, JobQuery, JobStore, LogLevel, LogLine

__all__ = ["JobEvent", "JobQuery", "JobStore", "LogLevel", "LogLine", "open_store"]


def open_store(url: str) -> JobStore:
    """The store for `url`: `sqlite:///path.db` (Redis follows in its own issue)."""
    scheme = urlsplit(url).scheme
    if scheme == "sqlite":
        from jobs_api.store.sqlite import SqliteJobStore

        return SqliteJobStore.from_url(url)
    raise ValueError(f"unsupported store URL scheme {scheme!r}; use sqlite:///path/to/jobs.db")
