"""SQLite job store: one file in WAL mode, every change in a BEGIN IMMEDIATE transaction.

Every way out of a write ends its transaction (a cancelled request included), SQLite errors are
StoreUnavailable, and after a failed write (a full disk, a lock held too long) `ping`, so
`/readyz`, fails until a write works again.

A job is kept whole as JSON next to the columns that queries filter and sort on. One connection
serves the process and an asyncio lock keeps transactions from interleaving on it; several
processes may share the file (busy_timeout), though only one should run workers.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from collections.abc import AsyncIterator, Coroutine
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, TypeVar

import aiosqlite
import orjson

from jobs_api.caching import CacheEntry, CacheStats, is_hit
from jobs_api.errors import IdempotencyConflict, JobNotFound, StoreUnavailable
from jobs_api.models import Job, JobStatus, transition
from jobs_api.store.base import (
    EventHub,
    JobEvent,
    JobQuery,
    JobStore,
    LogLevel,
    LogLine,
    Mutation,
    event_for,
    load_job,
    undecodable,
)
from jobs_api.webhooks import Delivery, delivery_for

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    tenant TEXT NOT NULL DEFAULT '',
    type TEXT NOT NULL,
    status TEXT NOT NULL,
    priority INTEGER NOT NULL,
    created_at REAL NOT NULL,
    run_after REAL NOT NULL,
    lease_until REAL,
    finished_at REAL,
    idempotency_key TEXT,
    data TEXT NOT NULL,
    fair_tag INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    job_id TEXT NOT NULL,
    time REAL NOT NULL,
    type TEXT NOT NULL,
    data TEXT NOT NULL,
    seq INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS logs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    job_id TEXT NOT NULL,
    time REAL NOT NULL,
    level INTEGER NOT NULL,
    message TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS fair_clock (priority INTEGER PRIMARY KEY, tag INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS fair_tenants (
    priority INTEGER NOT NULL,
    tenant TEXT NOT NULL,
    tag INTEGER NOT NULL,
    PRIMARY KEY (priority, tenant)
);
CREATE TABLE IF NOT EXISTS write_probe (data BLOB);
CREATE TABLE IF NOT EXISTS result_cache (
    tenant TEXT NOT NULL,
    key TEXT NOT NULL,
    source_job_id TEXT NOT NULL,
    result TEXT NOT NULL,
    bytes INTEGER NOT NULL,
    cached_at REAL NOT NULL,
    expires_at REAL NOT NULL,
    PRIMARY KEY (tenant, key)
);
CREATE INDEX IF NOT EXISTS result_cache_expiry ON result_cache (expires_at);
CREATE TABLE IF NOT EXISTS webhook_deliveries (
    job_id TEXT PRIMARY KEY,
    next_at REAL NOT NULL,
    data TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS webhook_due ON webhook_deliveries (next_at);
CREATE TABLE IF NOT EXISTS cache_counters (
    tenant TEXT PRIMARY KEY,
    hits INTEGER NOT NULL DEFAULT 0,
    misses INTEGER NOT NULL DEFAULT 0
);
"""
# Columns a file made by an earlier version lacks: (table, column, definition, how to fill it).
# Old events keep their store-wide id as their number, so a client's Last-Event-ID still fits.
ADDED_COLUMNS = (
    ("jobs", "fair_tag", "INTEGER NOT NULL DEFAULT 0", None),
    ("events", "seq", "INTEGER NOT NULL DEFAULT 0", "UPDATE events SET seq = id"),
)
INDEXES = """
DROP INDEX IF EXISTS jobs_queue;
DROP INDEX IF EXISTS events_job;
CREATE INDEX IF NOT EXISTS jobs_fair_queue ON jobs (status, priority DESC, fair_tag, created_at, id);
CREATE INDEX IF NOT EXISTS jobs_listing ON jobs (tenant, created_at DESC, id DESC);
CREATE INDEX IF NOT EXISTS jobs_leases ON jobs (status, lease_until);
CREATE INDEX IF NOT EXISTS jobs_finished ON jobs (finished_at);
CREATE UNIQUE INDEX IF NOT EXISTS jobs_idempotency ON jobs (tenant, idempotency_key)
    WHERE idempotency_key IS NOT NULL;
CREATE INDEX IF NOT EXISTS events_seq ON events (job_id, seq);
CREATE INDEX IF NOT EXISTS logs_job ON logs (job_id, id);
"""
# What the readiness probe writes while writes are failing: about a job with large input.
PROBE_BYTES = 64 * 1024

log = logging.getLogger(__name__)

T = TypeVar("T")

_COLUMNS = (
    "id, tenant, type, status, priority, created_at, run_after, lease_until, finished_at, "
    "idempotency_key, data, fair_tag"
)


async def _add_columns(db: aiosqlite.Connection) -> None:
    """Bring a file made by an earlier version up to SCHEMA (one transaction: another process
    opening it at the same time waits, then finds nothing to do)."""
    await db.execute("BEGIN IMMEDIATE")
    try:
        for table, column, definition, fill in ADDED_COLUMNS:
            columns = {row[1] for row in await db.execute_fetchall(f"PRAGMA table_info({table})")}
            if column not in columns:
                await db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {definition}")
                if fill is not None:
                    await db.execute(fill)
        await db.execute("COMMIT")
    except BaseException:
        await db.rollback()
        raise


def _row(job: Job, fair_tag: int) -> tuple[Any, ...]:
    return (
        job.id,
        job.tenant or "",
        job.type,
        job.status.value,
        job.priority,
        job.created_at,
        job.run_after,
        job.lease_until,
        job.finished_at,
        job.idempotency_key,
        job.model_dump_json(),
        fair_tag,
    )


async def _to_the_end(step: Coroutine[Any, Any, T]) -> T:
    """Run `step` to its end even if the caller is cancelled meanwhile (re-raised afterwards)."""
    task = asyncio.ensure_future(step)
    cancelled = False
    while not task.done():
        try:
            await asyncio.wait({task})
        except asyncio.CancelledError:
            cancelled = True
    if cancelled:
        raise asyncio.CancelledError
    return task.result()


class SqliteJobStore(JobStore):
    """Jobs in one SQLite file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._db: aiosqlite.Connection | None = None
        self._lock = asyncio.Lock()
        self._hub = EventHub()
        # Why the last write failed; None once a write changed something (or before any failed).
        self._write_failure: str | None = None

    @classmethod
    def from_url(cls, url: str) -> SqliteJobStore:
        """`sqlite:///relative/path.db` or `sqlite:////absolute/path.db`."""
        path = url.removeprefix("sqlite://")
        if path.startswith("/"):
            path = path[1:]
        if not path:
            raise ValueError("a sqlite store URL needs a file path, e.g. sqlite:///./jobs.db")
        return cls(Path(path))

    async def open(self) -> None:
        """Open the file (creating it and the schema if needed) in WAL mode."""
        if self.path.parent and not self.path.parent.exists():
            raise StoreUnavailable(f"directory {self.path.parent} does not exist")
        try:
            self._db = await self._connect()
        except sqlite3.Error as exc:
            raise StoreUnavailable(f"cannot open {self.path}: {exc}") from None

    async def _connect(self) -> aiosqlite.Connection:
        db = await aiosqlite.connect(self.path, isolation_level=None)
        try:
            await db.execute("PRAGMA journal_mode=WAL")
            await db.execute("PRAGMA busy_timeout=5000")
            await db.execute("PRAGMA synchronous=FULL")
            await db.executescript(SCHEMA)
            await _add_columns(db)
            await db.executescript(INDEXES)
        except BaseException:
            await db.close()
            raise
        return db

    async def close(self) -> None:
        """Close the connection."""
        if self._db is not None:
            await self._db.close()
            self._db = None

    @property
    def db(self) -> aiosqlite.Connection:
        if self._db is None:
            raise StoreUnavailable(self._write_failure or "the store is not open")
        return self._db

    @asynccontextmanager
    async def _write(self) -> AsyncIterator[aiosqlite.Connection]:
        """A BEGIN IMMEDIATE transaction: committed when the block ends, rolled back on any other exit.

        Every exit ends the transaction, a cancellation at any await included: aiosqlite runs a
        statement on its own thread even when the awaiting task is cancelled (a cancelled BEGIN
        still begins), and runs statements in order, so the ROLLBACK queued after it always ends
        what it began. A SQLite error becomes StoreUnavailable and marks writes as failing (see
        `ping`) until a write changes something again.
        """
        async with self._lock:
            db = self.db
            changes = db.total_changes
            try:
                await db.execute("BEGIN IMMEDIATE")
                yield db
                await db.execute("COMMIT")
            except BaseException as exc:
                await _to_the_end(self._roll_back(db))
                if isinstance(exc, sqlite3.Error):
                    self._write_failure = f"sqlite: {exc}"
                    raise StoreUnavailable(self._write_failure) from None
                raise
            if db.total_changes != changes:
                self._write_failure = None

    async def _roll_back(self, db: aiosqlite.Connection) -> None:
        """End whatever transaction `db` has open (none is fine); reconnect if even that fails."""
        try:
            await db.rollback()  # sqlite3's rollback() does nothing outside a transaction
        except sqlite3.Error as exc:
            # Closing the connection is the one sure end of its transaction.
            log.error("sqlite %s: rollback failed (%s); reconnecting", self.path, exc)
            self._write_failure = f"sqlite: rollback failed: {exc}"
            self._db = None
            try:
                await db.close()
                self._db = await self._connect()
            except sqlite3.Error as again:
                log.error("sqlite %s: cannot reconnect: %s", self.path, again)
        except ValueError:
            pass  # the connection was closed meanwhile (close()), which ended the transaction

    async def _read(self, sql: str, params: tuple[Any, ...] = ()) -> list[sqlite3.Row]:
        async with self._lock:
            try:
                async with self.db.execute(sql, params) as cursor:
                    return list(await cursor.fetchall())
            except sqlite3.Error as exc:
                raise StoreUnavailable(f"sqlite: {exc}") from None

    async def ping(self) -> None:
        """Raise StoreUnavailable unless a query answers and, after a write failed, a write works.

        The probe writes (and deletes) PROBE_BYTES, so a database that is still full stays not
        ready, and one that has room again is ready again without waiting for traffic.
        """
        await self._read("SELECT 1")
        if self._write_failure is not None:
            async with self._write() as db:
                await db.execute("INSERT INTO write_probe (data) VALUES (zeroblob(?))", (PROBE_BYTES,))
                await db.execute("DELETE FROM write_probe")

    async def _record(self, db: aiosqlite.Connection, before: Job | None, after: Job) -> bool:
        delivery = delivery_for(before, after)
        if delivery is not None:  # in the transaction that ends the job: a crash cannot lose it
            await db.execute(
                "INSERT OR IGNORE INTO webhook_deliveries (job_id, next_at, data) VALUES (?, ?, ?)",
                (delivery.job_id, delivery.next_at, delivery.to_json()),
            )
        events = event_for(before, after)
        for kind, data in events:
            # Numbered per job: an event id says nothing about other jobs (or tenants).
            await db.execute(
                "INSERT INTO events (job_id, seq, time, type, data) VALUES (?1, "
                "(SELECT COALESCE(MAX(seq), 0) + 1 FROM events WHERE job_id = ?1), ?2, ?3, ?4)",
                (after.id, after.updated_at, kind, orjson.dumps(data).decode()),
            )
        return bool(events)

    async def create(self, job: Job) -> tuple[Job, bool]:
        """Insert the job, or return the tenant's job with the same idempotency key."""
        async with self._write() as db:
            if job.idempotency_key is not None:
                async with db.execute(
                    "SELECT data FROM jobs WHERE tenant = ? AND idempotency_key = ?",
                    (job.tenant or "", job.idempotency_key),
                ) as cur:
                    row = await cur.fetchone()
                if row is not None:
                    existing = load_job(row[0])
                    if existing.request_hash != job.request_hash:
                        raise IdempotencyConflict(
                            f"Idempotency-Key {job.idempotency_key!r} was already used "
                            "with a different request"
                        )
                    return existing, False
            tag = await self._fair_tag(db, job) if job.status is JobStatus.QUEUED else 0
            await db.execute(
                f"INSERT INTO jobs ({_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)", _row(job, tag)
            )
            await self._record(db, None, job)
        self._hub.notify(job.id)
        return job, True

    async def _fair_tag(self, db: aiosqlite.Connection, job: Job) -> int:
        """The new job's turn among the queued jobs of its priority (start-time fair queuing).

        Claims take the lowest tag first. A tenant's jobs get increasing tags, and a job never
        gets one below its priority's clock (the tag of the last claimed job): so tenants take
        turns, and one that waits goes before one that was just served, however many jobs the
        other has queued.
        """
        tenant = job.tenant or ""
        async with db.execute(
            "SELECT MAX(COALESCE((SELECT tag FROM fair_clock WHERE priority = ?1), 0), "
            "COALESCE((SELECT tag + 1 FROM fair_tenants WHERE priority = ?1 AND tenant = ?2), 1))",
            (job.priority, tenant),
        ) as cur:
            row = await cur.fetchone()
        assert row is not None
        tag = int(row[0])
        await db.execute(
            "INSERT INTO fair_tenants (priority, tenant, tag) VALUES (?, ?, ?) "
            "ON CONFLICT (priority, tenant) DO UPDATE SET tag = excluded.tag",
            (job.priority, tenant, tag),
        )
        return tag

    async def get(self, job_id: str) -> Job | None:
        """The job, or None."""
        rows = await self._read("SELECT data FROM jobs WHERE id = ?", (job_id,))
        return load_job(rows[0][0]) if rows else None

    async def list_jobs(self, query: JobQuery) -> tuple[list[Job], tuple[float, str] | None]:
        """Jobs matching `query`, newest first, plus the next page's cursor."""
        where: list[str] = []
        params: list[Any] = []
        if query.tenant is not None:
            where.append("tenant = ?")
            params.append(query.tenant)
        if query.status is not None:
            where.append("status = ?")
            params.append(query.status.value)
        if query.type is not None:
            where.append("type = ?")
            params.append(query.type)
        if query.created_after is not None:
            where.append("created_at > ?")
            params.append(query.created_after)
        if query.created_before is not None:
            where.append("created_at < ?")
            params.append(query.created_before)
        if query.cursor is not None:
            where.append("(created_at < ? OR (created_at = ? AND id < ?))")
            params.extend([query.cursor[0], query.cursor[0], query.cursor[1]])
        sql = "SELECT data FROM jobs"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY created_at DESC, id DESC LIMIT ?"
        params.append(query.limit + 1)
        rows = await self._read(sql, tuple(params))
        jobs = [load_job(r[0]) for r in rows[: query.limit]]
        cursor = (jobs[-1].created_at, jobs[-1].id) if len(rows) > query.limit else None
        return jobs, cursor

    async def claim(self, worker: str, now: float, lease_s: float) -> Job | None:
        """Take the best eligible queued job under a lease, counting the attempt."""
        async with self._write() as db:
            before, changed = await self._next_queued(db, now)
            claimed = None
            if before is not None:
                claimed = transition(
                    before,
                    JobStatus.RUNNING,
                    now,
                    attempts=before.attempts + 1,
                    worker=worker,
                    lease_until=now + lease_s,
                )
                await self._update(db, claimed)
                await self._record(db, before, claimed)
                changed.append(claimed.id)
        for job_id in changed:
            self._hub.notify(job_id)
        return claimed

    async def _next_queued(self, db: aiosqlite.Connection, now: float) -> tuple[Job | None, list[str]]:
        """The best eligible queued job (its turn taken: the clock moves to its tag), and the ids
        of those failed on the way to it: a job that cannot be read back can never run, so it
        fails alone rather than stop the queue."""
        failed: list[str] = []
        while True:
            async with db.execute(
                "SELECT data, fair_tag FROM jobs WHERE status = 'queued' AND run_after <= ? "
                "ORDER BY priority DESC, fair_tag, created_at, id LIMIT 1",
                (now,),
            ) as cur:
                row = await cur.fetchone()
            if row is None:
                return None, failed
            job = load_job(row[0])
            if not undecodable(job):
                await db.execute(
                    "INSERT INTO fair_clock (priority, tag) VALUES (?, ?) "
                    "ON CONFLICT (priority) DO UPDATE SET tag = MAX(tag, excluded.tag)",
                    (job.priority, row[1]),
                )
                return job, failed
            after = transition(job, JobStatus.FAILED, now)
            await self._update(db, after)
            await self._record(db, job, after)
            log.warning("job %s cannot be read back (nested too deep); failed without running", job.id)
            failed.append(job.id)

    async def _update(self, db: aiosqlite.Connection, job: Job) -> None:
        await db.execute(
            "UPDATE jobs SET status = ?, priority = ?, run_after = ?, lease_until = ?, "
            "finished_at = ?, data = ? WHERE id = ?",
            (
                job.status.value,
                job.priority,
                job.run_after,
                job.lease_until,
                job.finished_at,
                job.model_dump_json(),
                job.id,
            ),
        )

    async def mutate(self, job_id: str, change: Mutation) -> Job:
        """Apply `change` to the stored job atomically."""
        async with self._write() as db:
            async with db.execute("SELECT data FROM jobs WHERE id = ?", (job_id,)) as cur:
                row = await cur.fetchone()
            if row is None:
                raise JobNotFound(f"job {job_id} not found")
            before = load_job(row[0])
            after = change(before)
            if after == before:
                return before
            await self._update(db, after)
            notify = await self._record(db, before, after)
        if notify:
            self._hub.notify(job_id)
        return after

    async def expired_leases(self, now: float) -> list[str]:
        """Running jobs whose worker stopped renewing its lease."""
        rows = await self._read("SELECT id FROM jobs WHERE status = 'running' AND lease_until < ?", (now,))
        return [r[0] for r in rows]

    async def events_after(self, job_id: str, after_id: int) -> list[JobEvent]:
        """Events of the job after `after_id`."""
        rows = await self._read(
            "SELECT seq, job_id, type, data, time FROM events WHERE job_id = ? AND seq > ? ORDER BY seq",
            (job_id, after_id),
        )
        return [JobEvent(r[0], r[1], r[2], orjson.loads(r[3]), r[4]) for r in rows]

    async def wait_for_events(self, job_id: str, timeout_s: float) -> None:
        """Wait for a change of the job in this process (or the timeout, for other writers)."""
        await self._hub.wait(job_id, timeout_s)

    async def append_log(self, job_id: str, line: LogLine) -> None:
        """Add a log line and trim the job's log to the newest max_log_lines."""
        async with self._write() as db:
            await db.execute(
                "INSERT INTO logs (job_id, time, level, message) VALUES (?, ?, ?, ?)",
                (job_id, line.time, int(line.level), line.message),
            )
            await db.execute(
                "DELETE FROM logs WHERE job_id = ? AND id <= ("
                "SELECT id FROM logs WHERE job_id = ? ORDER BY id DESC LIMIT 1 OFFSET ?)",
                (job_id, job_id, self.max_log_lines),
            )

    async def logs(self, job_id: str, min_level: LogLevel) -> list[LogLine]:
        """The job's log lines at min_level or above."""
        rows = await self._read(
            "SELECT time, level, message FROM logs WHERE job_id = ? AND level >= ? ORDER BY id",
            (job_id, int(min_level)),
        )
        return [LogLine(r[0], LogLevel(r[1]), r[2]) for r in rows]

    async def count_by_status(self) -> dict[JobStatus, int]:
        """Job counts per status."""
        rows = await self._read("SELECT status, COUNT(*) FROM jobs GROUP BY status")
        return {JobStatus(r[0]): int(r[1]) for r in rows}

    async def purge_finished(self, before: float) -> int:
        """Delete jobs finished before `before`, with their events and logs."""
        async with self._write() as db:
            async with db.execute(
                "SELECT id FROM jobs WHERE finished_at IS NOT NULL AND finished_at < ?", (before,)
            ) as cur:
                ids = [r[0] for r in await cur.fetchall()]
            for job_id in ids:
                await db.execute("DELETE FROM events WHERE job_id = ?", (job_id,))
                await db.execute("DELETE FROM logs WHERE job_id = ?", (job_id,))
                await db.execute("DELETE FROM jobs WHERE id = ?", (job_id,))
        return len(ids)

    # --- result cache ---

    async def cache_lookup(self, tenant: str, key: str, now: float, max_age_s: float) -> CacheEntry | None:
        """The live entry (expired ones are ignored here and swept later); counts the lookup."""
        async with self._write() as db:
            async with db.execute(
                "SELECT source_job_id, result, cached_at, expires_at FROM result_cache "
                "WHERE tenant = ? AND key = ?",
                (tenant, key),
            ) as cur:
                row = await cur.fetchone()
            entry = None if row is None else CacheEntry(tenant, key, row[0], row[1], row[2], row[3])
            if entry is not None and not is_hit(entry, now, max_age_s):
                entry = None
            column = "hits" if entry is not None else "misses"
            await db.execute(
                f"INSERT INTO cache_counters (tenant, {column}) VALUES (?, 1) "
                f"ON CONFLICT (tenant) DO UPDATE SET {column} = {column} + 1",
                (tenant,),
            )
        return entry

    async def cache_put(self, entry: CacheEntry) -> None:
        """Store (or replace) the tenant's entry for its key."""
        async with self._write() as db:
            await db.execute(
                "INSERT OR REPLACE INTO result_cache "
                "(tenant, key, source_job_id, result, bytes, cached_at, expires_at) VALUES (?,?,?,?,?,?,?)",
                (
                    entry.tenant,
                    entry.key,
                    entry.source_job_id,
                    entry.result_json,
                    entry.size,
                    entry.cached_at,
                    entry.expires_at,
                ),
            )

    async def cache_stats(self, tenant: str | None, now: float) -> CacheStats:
        """Counts of one tenant (None: all); entries past their expiry are not counted."""
        where, params = ("WHERE tenant = ?", (tenant,)) if tenant is not None else ("", ())
        counters = await self._read(f"SELECT SUM(hits), SUM(misses) FROM cache_counters {where}", params)
        live = await self._read(
            f"SELECT COUNT(*), SUM(bytes) FROM result_cache {where or 'WHERE 1'} AND expires_at > ?",
            (*params, now),
        )
        hits, misses = counters[0]
        entries, size = live[0]
        return CacheStats(int(hits or 0), int(misses or 0), int(entries or 0), int(size or 0))

    async def cache_clear(self) -> int:
        """Delete every entry."""
        async with self._write() as db:
            cursor = await db.execute("DELETE FROM result_cache")
            return int(cursor.rowcount)

    async def cache_sweep(self, now: float) -> int:
        """Delete entries past their expiry."""
        async with self._write() as db:
            cursor = await db.execute("DELETE FROM result_cache WHERE expires_at <= ?", (now,))
            return int(cursor.rowcount)

    # --- webhook deliveries ---

    async def webhook_claim(self, now: float, lease_s: float, limit: int) -> list[Delivery]:
        """Due deliveries, put off by `lease_s` in the same transaction."""
        async with self._write() as db:
            async with db.execute(
                "SELECT data FROM webhook_deliveries WHERE next_at <= ? ORDER BY next_at, job_id LIMIT ?",
                (now, limit),
            ) as cur:
                rows = await cur.fetchall()
            claimed = [Delivery.from_json(row[0]) for row in rows]
            for delivery in claimed:
                await db.execute(
                    "UPDATE webhook_deliveries SET next_at = ? WHERE job_id = ?",
                    (now + lease_s, delivery.job_id),
                )
        return claimed

    async def webhook_save(self, delivery: Delivery) -> None:
        """Store the delivery's attempts and next attempt time."""
        async with self._write() as db:
            await db.execute(
                "INSERT OR REPLACE INTO webhook_deliveries (job_id, next_at, data) VALUES (?, ?, ?)",
                (delivery.job_id, delivery.next_at, delivery.to_json()),
            )

    async def webhook_delete(self, job_id: str) -> None:
        """Forget the job's delivery."""
        async with self._write() as db:
            await db.execute("DELETE FROM webhook_deliveries WHERE job_id = ?", (job_id,))

    async def webhook_pending(self) -> int:
        """Deliveries waiting."""
        rows = await self._read("SELECT COUNT(*) FROM webhook_deliveries")
        return int(rows[0][0])
