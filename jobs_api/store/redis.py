"""Redis job store: many replicas share one Redis; every state change is one Lua script.

A job is a hash `{prefix}job:{id}` holding its JSON (`data`) and a version (`v`). `mutate` and
`claim` read the job, apply the pure change in Python, then commit with the `COMMIT` script: a
compare-and-set on the version that writes the job, moves it between the indexes, appends its
events and publishes a wake-up, all at once (another writer in between makes it retry). Lua never
parses the job's JSON, so timestamps keep their full precision.

Indexes (sorted sets; all key names come from `Keys`):
- `queue`: claimable jobs, score -priority, member `{tag}:order(created_at):id`, so ZRANGE order
  is priority desc, then tag, then oldest. The tag (`t` and 16 hex digits, kept in the job hash)
  is the job's turn among its priority's jobs, start-time fair queuing between tenants as in
  SQLite: a tenant's jobs get increasing tags, never below the priority's clock (the tag of the
  last claimed job), both kept in the `fair` hash. Jobs stored before tags existed have none and
  keep the member `order:id`, which sorts before any tag (hex digits < `t`): they go first, like
  SQLite's tag 0. `delayed`: queued jobs with a future `run_after` (score), member
  `{-priority}|{queue member}`, moved into `queue` by the claim once due.
- `leases`: running jobs by lease_until, for `expired_leases`.
- `finished`: terminal jobs by finished_at, for `purge_finished`; the member carries what the
  purge needs to clean the indexes after the job's own keys expired.
- listings `idx:all`, `idx:tenant:{t}`, `idx:status:{s}`, `idx:tenant-status:{t}:{s}`: score 0,
  member `order(created_at):id`, read newest first with ZREVRANGEBYLEX (cursor = member bound).

Events go to a stream per job, `events:{id}`, with the entry id `{n}-0` numbered per job (one past
the stream's last entry), so an id says nothing about other jobs; replay is XRANGE. A pub/sub
message on `{prefix}events` (the job id) wakes waiters in every replica; it may be lost, which
only delays a waiter until its timeout. Logs are a capped list. When a job ends, its hash, events,
logs and idempotency key get EXPIRE(retention_s); `purge_finished` deletes them earlier if asked
and always cleans the indexes, so nothing grows without bound.
"""

from __future__ import annotations

import asyncio
import logging
import math
import struct
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any, Final
from urllib.parse import quote, urlsplit

import orjson
import redis.asyncio as aioredis
from redis.asyncio.client import PubSub
from redis.backoff import ExponentialWithJitterBackoff
from redis.exceptions import (
    AuthenticationError,
    NoScriptError,
    OutOfMemoryError,
    ReadOnlyError,
    RedisError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.retry import Retry

from jobs_api.caching import CacheEntry, CacheStats, is_hit
from jobs_api.errors import IdempotencyConflict, JobNotFound, OutcomeUnknown, StoreUnavailable
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
    redacted_url,
    undecodable,
)
from jobs_api.webhooks import Delivery, delivery_for

log = logging.getLogger(__name__)

DEFAULT_PREFIX: Final = "jobs:"
DEFAULT_RETENTION_S: Final = 7 * 24 * 3600.0
# Connections per process, and how long a call waits for a free one (JOBS_REDIS_MAX_CONNECTIONS,
# JOBS_REDIS_POOL_TIMEOUT_S): past the cap, calls queue for a connection rather than fail.
DEFAULT_MAX_CONNECTIONS: Final = 100
DEFAULT_POOL_TIMEOUT_S: Final = 5.0
# Optimistic retries of one mutate before giving up (each one means another writer won).
MAX_COMMIT_TRIES: Final = 100
# A claim looks at this many of the best queued jobs per round, for this many rounds.
CLAIM_CANDIDATES: Final = 10
CLAIM_ROUNDS: Final = 5
# Due delayed jobs moved into the queue per claim (the rest follow with the next claims).
PROMOTE_BATCH: Final = 1000
SCAN_CHUNK: Final = 200
# Fail fast when Redis is away: /readyz and submissions answer 503 within about a second.
CONNECT_TIMEOUT_S: Final = 1.0
SOCKET_TIMEOUT_S: Final = 5.0
# After a submission's write got no reply, how long (in socket timeouts) to keep re-sending it
# (under the same id, so it applies at most once) before answering outcome_unknown (504).
CONFIRM_TIMEOUTS: Final = 3

# Also a read-only replica (after a failover) and a full Redis: the service cannot store jobs.
_UNAVAILABLE = (RedisConnectionError, RedisTimeoutError, ReadOnlyError, OutOfMemoryError, OSError)

# KEYS: 1 job, 2 events, 3 logs, 4 idempotency, 5 fair, 6 queue, 7 delayed, 8 leases,
#   9 finished, 10 idx:all, 11 idx:tenant, 12 idx:status:old, 13 idx:tenant-status:old,
#   14 idx:status:new, 15 idx:tenant-status:new, 16 webhook due, 17 the job's webhook delivery
# ARGV: 1 expected version ('' = create), 2 job JSON, 3 id, 4 order member, 5 old status ('' on
#   create), 6 new status, 7 tenant, 8 '1' if a queued job waits in `delayed` ('' = claimable at
#   once, into the queue), 9 run_after, 10 queue score (-priority), 11 lease_until, 12 old finished
#   member, 13 new finished member, 14 finished_at, 15 ttl seconds, 16 has idempotency key
#   ('1'/'0'), 17 channel, 18 event count, then (type, time, data) for each event, then the
#   webhook delivery's JSON ('' for none) and its due time.
# A Lua error would leave earlier writes in place, so every argument is checked in Python first.
COMMIT: Final = """
local v = redis.call('HGET', KEYS[1], 'v')
local creating = ARGV[1] == ''
if creating then
  if v then return {'exists'} end
  if ARGV[16] == '1' then
    local owner = redis.call('GET', KEYS[4])
    if owner then return {'idem', owner} end
    redis.call('SET', KEYS[4], ARGV[3])
  end
elseif v ~= ARGV[1] then
  return {'conflict'}
end
local version = (tonumber(v) or 0) + 1
redis.call('HSET', KEYS[1], 'data', ARGV[2], 'v', version)
local id, member, old, new = ARGV[3], ARGV[4], ARGV[5], ARGV[6]
local score = ARGV[10]
local tag = redis.call('HGET', KEYS[1], 'tag')
if creating and new == 'queued' then
  local turn = score .. ':' .. ARGV[7]
  local n = math.max(tonumber(redis.call('HGET', KEYS[5], score)) or 0,
    (tonumber(redis.call('HGET', KEYS[5], turn)) or 0) + 1)
  redis.call('HSET', KEYS[5], turn, n)
  tag = string.format('t%016x', n)
  redis.call('HSET', KEYS[1], 'tag', tag)
end
local queued = tag and (tag .. ':' .. member) or member
if creating then
  redis.call('ZADD', KEYS[10], 0, member)
  redis.call('ZADD', KEYS[11], 0, member)
end
if old ~= new then
  if not creating then
    redis.call('ZREM', KEYS[12], member)
    redis.call('ZREM', KEYS[13], member)
  end
  redis.call('ZADD', KEYS[14], 0, member)
  redis.call('ZADD', KEYS[15], 0, member)
end
redis.call('ZREM', KEYS[6], queued)
if old == 'queued' and not creating then redis.call('ZREM', KEYS[7], score .. '|' .. queued) end
redis.call('ZREM', KEYS[8], id)
if ARGV[12] ~= '' then redis.call('ZREM', KEYS[9], ARGV[12]) end
if new == 'queued' then
  if ARGV[8] == '' then
    redis.call('ZADD', KEYS[6], score, queued)
  else
    redis.call('ZADD', KEYS[7], ARGV[9], score .. '|' .. queued)
  end
elseif new == 'running' then
  redis.call('ZADD', KEYS[8], ARGV[11], id)
  if old == 'queued' and tag then  -- a claim: the priority's clock moves to the claimed job's turn
    local n = tonumber(string.sub(tag, 2), 16)
    if n > (tonumber(redis.call('HGET', KEYS[5], score)) or 0) then redis.call('HSET', KEYS[5], score, n) end
  end
elseif ARGV[13] ~= '' then
  redis.call('ZADD', KEYS[9], ARGV[14], ARGV[13])
end
local count = tonumber(ARGV[18])
if count > 0 then
  local last = redis.call('XREVRANGE', KEYS[2], '+', '-', 'COUNT', 1)[1]
  local n = last and tonumber(string.match(last[1], '^%d+')) or 0
  for i = 0, count - 1 do
    n = n + 1
    redis.call('XADD', KEYS[2], n .. '-0', 'type', ARGV[19 + 3 * i], 'time', ARGV[20 + 3 * i],
      'data', ARGV[21 + 3 * i])
  end
end
if count > 0 then redis.call('PUBLISH', ARGV[17], id) end
local delivery = ARGV[19 + 3 * count]
if delivery ~= '' and redis.call('EXISTS', KEYS[17]) == 0 then
  redis.call('SET', KEYS[17], delivery)
  redis.call('ZADD', KEYS[16], ARGV[20 + 3 * count], id)
end
if ARGV[13] ~= '' then
  local ttl = tonumber(ARGV[15])
  redis.call('EXPIRE', KEYS[1], ttl)
  redis.call('EXPIRE', KEYS[2], ttl)
  redis.call('EXPIRE', KEYS[3], ttl)
  if ARGV[16] == '1' and redis.call('GET', KEYS[4]) == id then redis.call('EXPIRE', KEYS[4], ttl) end
end
return {'ok', tostring(version)}
"""

# KEYS: 1 delayed, 2 queue. ARGV: 1 now, 2 how many queued members to return, 3 promote batch.
# A delayed member is `{queue score}|{queue member}`.
PEEK: Final = """
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[3]))
for _, m in ipairs(due) do
  local sep = string.find(m, '|', 1, true)
  redis.call('ZADD', KEYS[2], string.sub(m, 1, sep - 1), string.sub(m, sep + 1))
  redis.call('ZREM', KEYS[1], m)
end
return redis.call('ZRANGE', KEYS[2], 0, tonumber(ARGV[2]) - 1)
"""

# KEYS: 1 job, 2 logs. ARGV: 1 line, 2 max lines. A job's log lives (and expires) with the job.
APPEND_LOG: Final = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('RPUSH', KEYS[2], ARGV[1])
redis.call('LTRIM', KEYS[2], -tonumber(ARGV[2]), -1)
local ttl = redis.call('PTTL', KEYS[1])
if ttl > 0 then redis.call('PEXPIRE', KEYS[2], ttl) end
return 1
"""

# KEYS: 1 finished, 2 job, 3 events, 4 logs, 5 idempotency, 6-9 the listing indexes.
# ARGV: 1 finished member, 2 order member, 3 id. Returns 1 if this call purged the job.
PURGE: Final = """
if redis.call('ZREM', KEYS[1], ARGV[1]) == 0 then return 0 end
redis.call('DEL', KEYS[2], KEYS[3], KEYS[4])
if redis.call('GET', KEYS[5]) == ARGV[3] then redis.call('DEL', KEYS[5]) end
for i = 6, 9 do redis.call('ZREM', KEYS[i], ARGV[2]) end
return 1
"""

# KEYS: 1 key. ARGV: 1 expected value. Deletes the key only if it still holds that value.
DELETE_IF: Final = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


# KEYS: 1 entry hash, 2 tenant's index (key by expires_at), 3 tenant's sizes, 4 tenants set.
# ARGV: 1 key, 2 source job, 3 result JSON, 4 cached_at, 5 expires_at, 6 ttl ms, 7 bytes, 8 tenant.
CACHE_PUT: Final = """
redis.call('HSET', KEYS[1], 'src', ARGV[2], 'result', ARGV[3], 'at', ARGV[4], 'exp', ARGV[5])
redis.call('PEXPIRE', KEYS[1], ARGV[6])
redis.call('ZADD', KEYS[2], ARGV[5], ARGV[1])
redis.call('HSET', KEYS[3], ARGV[1], ARGV[7])
redis.call('SADD', KEYS[4], ARGV[8])
return 1
"""

# KEYS: 1 tenant's index, 2 tenant's sizes, 3 tenant's counters. ARGV: 1 now.
# Drops index entries of expired keys (the entries themselves expired by TTL), then counts.
CACHE_STATS: Final = """
local gone = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1])
for _, key in ipairs(gone) do redis.call('HDEL', KEYS[2], key) end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[1])
local size = 0
for _, n in ipairs(redis.call('HVALS', KEYS[2])) do size = size + tonumber(n) end
local counts = redis.call('HMGET', KEYS[3], 'hits', 'misses')
return {redis.call('ZCARD', KEYS[1]), size, counts[1] or 0, counts[2] or 0}
"""


# KEYS: 1 webhook due. ARGV: 1 now, 2 put off until, 3 limit. Returns the claimed job ids.
WEBHOOK_CLAIM: Final = """
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[3]))
for _, id in ipairs(ids) do redis.call('ZADD', KEYS[1], ARGV[2], id) end
return ids
"""


class _Unanswered(Exception):
    """A command was sent and no answer came: Redis may or may not have run it."""


class Keys:
    """Every Redis key (and the pub/sub channel) of one deployment, under one prefix."""

    def __init__(self, prefix: str = DEFAULT_PREFIX) -> None:
        self.prefix = prefix
        self.fairness = f"{prefix}fair"
        self.queue = f"{prefix}queue"
        self.delayed = f"{prefix}delayed"
        self.leases = f"{prefix}leases"
        self.finished = f"{prefix}finished"
        self.all_jobs = f"{prefix}idx:all"
        self.channel = f"{prefix}events"

        self.cache_tenants = f"{prefix}cache:tenants"
        self.webhooks_due = f"{prefix}webhooks:due"

    def webhook(self, job_id: str) -> str:
        """The pending webhook delivery of a job (JSON)."""
        return f"{self.prefix}webhook:{job_id}"

    def cache_entry(self, tenant: str, key: str) -> str:
        """The hash of one cached result (expires with its TTL)."""
        return f"{self.prefix}cache:entry:{quote(tenant, safe='')}:{key}"

    def cache_index(self, tenant: str) -> str:
        """A tenant's cache keys by expires_at (for stats and clearing)."""
        return f"{self.prefix}cache:idx:{quote(tenant, safe='')}"

    def cache_sizes(self, tenant: str) -> str:
        """A tenant's cache keys and the bytes of their results."""
        return f"{self.prefix}cache:size:{quote(tenant, safe='')}"

    def cache_counters(self, tenant: str) -> str:
        """A tenant's cache hits and misses."""
        return f"{self.prefix}cache:count:{quote(tenant, safe='')}"

    def job(self, job_id: str) -> str:
        """The hash holding the job's JSON and version."""
        return f"{self.prefix}job:{job_id}"

    def events(self, job_id: str) -> str:
        """The stream of the job's events."""
        return f"{self.prefix}events:{job_id}"

    def logs(self, job_id: str) -> str:
        """The capped list of the job's log lines."""
        return f"{self.prefix}logs:{job_id}"

    def idempotency(self, tenant: str, key: str) -> str:
        """The job id an idempotency key of `tenant` was used for (tenant quoted: no ':' clash)."""
        return f"{self.prefix}idem:{quote(tenant, safe='')}:{key}"

    def tenant_jobs(self, tenant: str) -> str:
        """Listing of one tenant's jobs."""
        return f"{self.prefix}idx:tenant:{quote(tenant, safe='')}"

    def status_jobs(self, status: JobStatus) -> str:
        """Listing of the jobs in one status."""
        return f"{self.prefix}idx:status:{status.value}"

    def tenant_status_jobs(self, tenant: str, status: JobStatus) -> str:
        """Listing of one tenant's jobs in one status."""
        return f"{self.prefix}idx:tenant-status:{quote(tenant, safe='')}:{status.value}"

    def listing(self, tenant: str | None, status: JobStatus | None) -> str:
        """The narrowest listing index for a tenant and status filter (None: any)."""
        if tenant is not None and status is not None:
            return self.tenant_status_jobs(tenant, status)
        if tenant is not None:
            return self.tenant_jobs(tenant)
        if status is not None:
            return self.status_jobs(status)
        return self.all_jobs


def sortable(value: float) -> str:
    """16 hex digits whose byte order is the numeric order of `value` (any float but NaN)."""
    (bits,) = struct.unpack(">Q", struct.pack(">d", value + 0.0))  # + 0.0: -0.0 sorts as 0.0
    bits = bits ^ 0xFFFF_FFFF_FFFF_FFFF if bits >> 63 else bits | 1 << 63
    return f"{bits:016x}"


def order_member(created_at: float, job_id: str) -> str:
    """Member of the queue and listing indexes: sorts by created_at, then id."""
    return f"{sortable(created_at)}:{job_id}"


def _score(value: float | None) -> str:
    """A sorted-set score; None (no lease) is +inf."""
    if value is None:
        return "+inf"
    if math.isnan(value):
        raise ValueError("a job timestamp is NaN")
    return repr(float(value))


def _finished_member(job: Job) -> str:
    """What purging a finished job needs once its own keys may have expired."""
    order = order_member(job.created_at, job.id)
    return orjson.dumps([job.id, job.tenant or "", job.status.value, order, job.idempotency_key]).decode()


class RedisJobStore(JobStore):
    """Jobs in Redis, shared by any number of replicas (standalone Redis, not Cluster)."""

    def __init__(
        self,
        url: str,
        *,
        prefix: str = DEFAULT_PREFIX,
        retention_s: float = DEFAULT_RETENTION_S,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
        pool_timeout_s: float = DEFAULT_POOL_TIMEOUT_S,
        socket_timeout_s: float = SOCKET_TIMEOUT_S,
    ) -> None:
        self.url = url
        self.socket_timeout_s = socket_timeout_s
        self.safe_url = redacted_url(url)
        self.keys = Keys(prefix)
        self.retention_s = retention_s
        self.max_connections = max_connections
        self.pool_timeout_s = pool_timeout_s
        self._ttl = str(max(1, math.ceil(retention_s)))
        self._redis: aioredis.Redis | None = None
        self._hub = EventHub()
        self._listener: asyncio.Task[None] | None = None
        self._closing = False

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        prefix: str = DEFAULT_PREFIX,
        retention_s: float = DEFAULT_RETENTION_S,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
        pool_timeout_s: float = DEFAULT_POOL_TIMEOUT_S,
        socket_timeout_s: float = SOCKET_TIMEOUT_S,
    ) -> RedisJobStore:
        """`redis://[:password@]host[:port][/db]` or `rediss://` (TLS); nothing connects yet."""
        parts = urlsplit(url)
        if parts.scheme not in ("redis", "rediss"):
            raise ValueError(f"not a Redis URL: {redacted_url(url)}")
        if not parts.hostname:
            raise ValueError(
                f"a Redis store URL needs a host, e.g. redis://127.0.0.1:6379/0 (got {redacted_url(url)})"
            )
        try:
            parts.port  # noqa: B018 - raises ValueError for a bad port
        except ValueError:
            raise ValueError(f"bad port in Redis store URL {redacted_url(url)}") from None
        db = parts.path.strip("/")
        if db and not db.isdigit():
            raise ValueError(f"the path of a Redis store URL is the database number, got {db!r}")
        if not prefix:
            raise ValueError("the Redis key prefix must not be empty (JOBS_REDIS_PREFIX)")
        if max_connections < 2:  # the event listener holds one for good
            raise ValueError("the Redis pool needs at least 2 connections (JOBS_REDIS_MAX_CONNECTIONS)")
        return cls(
            url,
            prefix=prefix,
            retention_s=retention_s,
            max_connections=max_connections,
            pool_timeout_s=pool_timeout_s,
            socket_timeout_s=socket_timeout_s,
        )

    # --- connection ---

    async def open(self) -> None:
        """Create the client and start listening for other replicas' events.

        An unreachable Redis is not fatal here: the service starts, /readyz fails and requests
        answer 503 until it answers. Bad credentials are.
        """
        # A blocking pool: under a burst, calls wait for a free connection (up to pool_timeout_s)
        # instead of failing with "Too many connections" once max_connections are in use.
        pool = aioredis.BlockingConnectionPool.from_url(
            self.url,
            max_connections=self.max_connections,
            timeout=self.pool_timeout_s,
            decode_responses=True,
            socket_connect_timeout=CONNECT_TIMEOUT_S,
            socket_timeout=self.socket_timeout_s,
            retry=Retry(ExponentialWithJitterBackoff(base=0.05, cap=0.2), retries=1),
            health_check_interval=10,
        )
        self._redis = aioredis.Redis.from_pool(pool)  # the client owns the pool and closes it
        self._closing = False
        client = self._redis
        self._commit = client.register_script(COMMIT)
        self._peek = client.register_script(PEEK)
        self._append_log = client.register_script(APPEND_LOG)
        self._purge = client.register_script(PURGE)
        self._delete_if = client.register_script(DELETE_IF)
        self._cache_put = client.register_script(CACHE_PUT)
        self._cache_stats = client.register_script(CACHE_STATS)
        self._webhook_claim = client.register_script(WEBHOOK_CLAIM)
        try:
            await client.ping()
        except AuthenticationError as exc:
            await self.close()
            raise StoreUnavailable(f"redis {self.safe_url}: {exc}") from None
        except _UNAVAILABLE as exc:
            log.warning("redis %s is not reachable yet (%s); retrying as requests come", self.safe_url, exc)
        self._listener = asyncio.create_task(self._listen(), name="jobs-redis-events")

    async def close(self) -> None:
        """Stop listening and close the connections."""
        self._closing = True
        if self._listener is not None:
            self._listener.cancel()
            await asyncio.gather(self._listener, return_exceptions=True)
            self._listener = None
        if self._redis is not None:
            await self._redis.aclose()
            self._redis = None

    @property
    def redis(self) -> aioredis.Redis:
        """The client (StoreUnavailable before open or after close)."""
        if self._redis is None:
            raise StoreUnavailable("the store is not open")
        return self._redis

    @asynccontextmanager
    async def _unavailable(self) -> AsyncIterator[None]:
        """Redis connection errors and timeouts as StoreUnavailable (503, /readyz fails)."""
        try:
            yield
        except _UNAVAILABLE as exc:
            raise StoreUnavailable(f"redis {self.safe_url}: {exc or type(exc).__name__}") from None

    async def _listen(self) -> None:
        """Relay other replicas' event notifications to local waiters; reconnect on errors."""
        delay = 0.1
        while not self._closing:
            pubsub: PubSub = self.redis.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(self.keys.channel)
                delay = 0.1
                # The flag, not only cancellation, ends the loop: a cancel that lands as a read
                # times out can come back from redis-py as a plain timeout (asyncio.timeout, 3.11).
                while not self._closing:
                    message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
                    if message is not None and message.get("type") == "message":
                        self._hub.notify(str(message["data"]))
            except (RedisError, OSError) as exc:
                log.debug("redis event listener: %s; reconnecting in %.1f s", exc, delay)
            finally:
                await pubsub.aclose()  # type: ignore[no-untyped-call]
            if not self._closing:
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

    async def ping(self) -> None:
        """Raise StoreUnavailable unless Redis answers."""
        async with self._unavailable():
            await self.redis.ping()

    # --- writes ---

    async def _write(self, before: Job | None, version: str, after: Job) -> list[str]:
        """Run COMMIT for `before` (stored with `version`; None to create) -> `after`."""
        if before is not None and (
            (before.id, before.tenant, before.created_at, before.priority, before.idempotency_key)
            != (after.id, after.tenant, after.created_at, after.priority, after.idempotency_key)
        ):
            raise ValueError(
                f"job {before.id}: id, tenant, created_at, priority and idempotency_key never change"
            )
        k = self.keys
        tenant = after.tenant or ""
        old = before.status if before is not None else after.status
        keys = [
            k.job(after.id),
            k.events(after.id),
            k.logs(after.id),
            k.idempotency(tenant, after.idempotency_key or ""),
            k.fairness,
            k.queue,
            k.delayed,
            k.leases,
            k.finished,
            k.all_jobs,
            k.tenant_jobs(tenant),
            k.status_jobs(old),
            k.tenant_status_jobs(tenant, old),
            k.status_jobs(after.status),
            k.tenant_status_jobs(tenant, after.status),
            k.webhooks_due,
            k.webhook(after.id),
        ]
        args: list[str] = [
            version,
            after.model_dump_json(),
            after.id,
            order_member(after.created_at, after.id),
            "" if before is None else before.status.value,
            after.status.value,
            tenant,
            # run_after 0 (never retried): claimable by any claim, so straight into the queue.
            "1" if after.run_after > 0 else "",
            _score(after.run_after),
            str(-after.priority),
            _score(after.lease_until),
            _finished_member(before) if before is not None and before.status.terminal else "",
            _finished_member(after) if after.status.terminal else "",
            _score(after.finished_at if after.finished_at is not None else after.updated_at),
            self._ttl,
            "1" if after.idempotency_key is not None else "0",
            k.channel,
        ]
        events = event_for(before, after)
        args.append(str(len(events)))
        for kind, data in events:
            args.extend((kind, repr(after.updated_at), orjson.dumps(data).decode()))
        # Recorded with the change that ends the job: a crash cannot lose it.
        delivery = delivery_for(before, after)
        args.extend(("", "0") if delivery is None else (delivery.to_json(), _score(delivery.next_at)))
        if before is None:
            result = await self._send_once(COMMIT, self._commit.sha, keys, args)
        else:
            async with self._unavailable():
                result = await self._commit(keys=keys, args=args)
        outcome = [str(part) for part in result]
        if outcome[0] == "ok" and events:
            self._hub.notify(after.id)
        return outcome

    async def _read(self, job_id: str) -> tuple[Job, str] | None:
        async with self._unavailable():
            data, version = await self.redis.hmget(self.keys.job(job_id), ["data", "v"])
        if data is None:
            return None
        return load_job(data), str(version)

    async def _send_once(self, script: str, sha: str, keys: list[str], args: list[str]) -> Any:
        """Run a script exactly once on one connection, without redis-py's retry (a re-send).

        StoreUnavailable when it certainly did not run (no connection, a failed health check);
        `_Unanswered` once it was sent and no answer came, so it may or may not have run.
        """
        pool = self.redis.connection_pool
        async with self._unavailable():
            conn = await pool.get_connection()  # type: ignore[no-untyped-call]
        try:
            async with self._unavailable():
                await conn.check_health()
            try:
                try:
                    await conn.send_command("EVALSHA", sha, len(keys), *keys, *args, check_health=False)
                    return await conn.read_response()
                except NoScriptError:  # an error reply: nothing ran; send the script itself
                    await conn.send_command("EVAL", script, len(keys), *keys, *args, check_health=False)
                    return await conn.read_response()
            except (ReadOnlyError, OutOfMemoryError) as exc:  # an error reply: the script did not run
                raise StoreUnavailable(f"redis {self.safe_url}: {exc}") from None
            except _UNAVAILABLE as exc:
                await conn.disconnect()  # its reply, if any, must never reach another caller
                raise _Unanswered(f"redis {self.safe_url}: {exc or type(exc).__name__}") from None
        finally:
            await pool.release(conn)

    async def create(self, job: Job) -> tuple[Job, bool]:
        """Store the job, or return the tenant's job with the same idempotency key.

        The write is one script under the job's id, chosen before it is sent. StoreUnavailable
        means it was not stored: the write never left. If the write left and no answer came, it is
        sent again (a second copy finds the job and writes nothing) until one is answered;
        OutcomeUnknown if none is, within CONFIRM_TIMEOUTS socket timeouts.
        """
        for _ in range(MAX_COMMIT_TRIES):
            if job.idempotency_key is not None:
                existing = await self._idempotent(job)
                if existing is not None:
                    return existing, False
            try:
                outcome = await self._write(None, "", job)
            except _Unanswered as exc:
                outcome = await self._write_again(job, str(exc))
            if outcome[0] == "ok":
                return job, True
            if outcome[0] == "exists":
                try:
                    stored = await self.get(job.id)
                except StoreUnavailable:
                    return job, True  # a fresh id that exists is this write, applied by a copy
                # Our own write, re-sent; a runner may have claimed the job since.
                if stored is None or (stored.created_at, stored.tenant) == (job.created_at, job.tenant):
                    return stored or job, True
                raise ValueError(f"job {job.id} already exists")
            # "idem": another submission took the key in between; answer as it does.
        raise StoreUnavailable(f"redis: could not create job {job.id}: too much contention")

    async def _write_again(self, job: Job, reason: str) -> list[str]:
        """Re-send the create of `job` until Redis answers one copy (at most one applies)."""
        delay = 0.05
        try:
            async with asyncio.timeout(CONFIRM_TIMEOUTS * self.socket_timeout_s):
                while True:
                    try:
                        return await self._write(None, "", job)
                    except (StoreUnavailable, _Unanswered) as exc:
                        # Even "never left" proves nothing now: the first copy may still apply.
                        log.debug("job %s: create still unanswered: %s", job.id, exc)
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 0.5)
        except TimeoutError:
            raise OutcomeUnknown(
                f"{reason}; whether job {job.id} was stored is unknown: GET /v1/jobs/{job.id} to check, "
                "or submit again with the same Idempotency-Key (it never runs twice)",
                job.id,
            ) from None

    async def _idempotent(self, job: Job) -> Job | None:
        """The job that used `job`'s idempotency key, if any (IdempotencyConflict if another body)."""
        assert job.idempotency_key is not None
        key = self.keys.idempotency(job.tenant or "", job.idempotency_key)
        async with self._unavailable():
            owner = await self.redis.get(key)
        if owner is None:
            return None
        existing = await self.get(str(owner))
        if existing is None:  # the job expired a moment before its key: the key is free
            async with self._unavailable():
                await self._delete_if(keys=[key], args=[owner])
            return None
        if existing.request_hash != job.request_hash:
            raise IdempotencyConflict(
                f"Idempotency-Key {job.idempotency_key!r} was already used with a different request"
            )
        return existing

    async def mutate(self, job_id: str, change: Mutation) -> Job:
        """Apply `change` to the stored job atomically (optimistic: `change` may run again)."""
        for _ in range(MAX_COMMIT_TRIES):
            current = await self._read(job_id)
            if current is None:
                raise JobNotFound(f"job {job_id} not found")
            before, version = current
            after = change(before)
            if after == before:
                return before
            outcome = await self._write(before, version, after)
            if outcome[0] == "ok":
                return after
        raise StoreUnavailable(f"redis: could not update job {job_id}: too much contention")

    async def claim(self, worker: str, now: float, lease_s: float) -> Job | None:
        """Take the best eligible queued job under a lease, counting the attempt."""
        for _ in range(CLAIM_ROUNDS):
            async with self._unavailable():
                members = await self._peek(
                    keys=[self.keys.delayed, self.keys.queue],
                    args=[_score(now), CLAIM_CANDIDATES, PROMOTE_BATCH],
                )
            if not members:
                return None
            ids = [str(m).rsplit(":", 1)[1] for m in members]
            async with self._unavailable(), self.redis.pipeline(transaction=False) as pipe:
                for job_id in ids:
                    pipe.hmget(self.keys.job(job_id), ["data", "v"])
                rows = await pipe.execute()
            for member, (data, version) in zip(members, rows, strict=True):
                if data is None:  # a job purged under the queue (should not happen): drop it
                    async with self._unavailable():
                        await self.redis.zrem(self.keys.queue, member)
                    continue
                before = load_job(data)
                if before.status is not JobStatus.QUEUED or before.run_after > now:
                    continue  # changed since the peek, or promoted by a replica whose clock runs ahead
                if undecodable(before):  # it can never run: it fails alone rather than stop the queue
                    failed = transition(before, JobStatus.FAILED, now)
                    if (await self._write(before, str(version), failed))[0] == "ok":
                        log.warning("job %s cannot be read back (nested too deep); failed it", before.id)
                    continue
                after = transition(
                    before,
                    JobStatus.RUNNING,
                    now,
                    attempts=before.attempts + 1,
                    worker=worker,
                    lease_until=now + lease_s,
                )
                if (await self._write(before, str(version), after))[0] == "ok":
                    return after
        return None

    # --- reads ---

    async def get(self, job_id: str) -> Job | None:
        """The job, or None (also once it expired after its retention)."""
        async with self._unavailable():
            data = await self.redis.hget(self.keys.job(job_id), "data")
        return None if data is None else load_job(data)

    async def list_jobs(self, query: JobQuery) -> tuple[list[Job], tuple[float, str] | None]:
        """Jobs matching `query`, newest first, plus the next page's cursor."""
        index = self.keys.listing(query.tenant, query.status)
        upper = "+"
        if query.created_before is not None:
            upper = "(" + sortable(query.created_before)
        if query.cursor is not None:
            cursor = order_member(*query.cursor)
            if upper == "+" or cursor < upper[1:]:
                upper = "(" + cursor
        # Members of created_after itself are "X:id" < "X;": an exclusive lower bound.
        lower = "-" if query.created_after is None else "(" + sortable(query.created_after) + ";"
        found: list[Job] = []
        while len(found) <= query.limit:
            async with self._unavailable():
                members = await self.redis.zrevrangebylex(index, upper, lower, start=0, num=SCAN_CHUNK)
            if not members:
                break
            found.extend(await self._matching(members, query, query.limit + 1 - len(found)))
            upper = "(" + str(members[-1])
            if len(members) < SCAN_CHUNK:
                break
        jobs = found[: query.limit]
        next_cursor = (jobs[-1].created_at, jobs[-1].id) if len(found) > query.limit else None
        return jobs, next_cursor

    async def _matching(self, members: Sequence[Any], query: JobQuery, wanted: int) -> list[Job]:
        async with self._unavailable(), self.redis.pipeline(transaction=False) as pipe:
            for member in members:
                pipe.hget(self.keys.job(str(member).split(":", 1)[1]), "data")
            rows = await pipe.execute()
        jobs: list[Job] = []
        for data in rows:
            if data is None:
                continue  # expired after its retention; purge_finished drops the member
            job = load_job(data)
            if query.type is not None and job.type != query.type:
                continue
            jobs.append(job)
            if len(jobs) == wanted:
                break
        return jobs

    async def expired_leases(self, now: float) -> list[str]:
        """Running jobs whose worker stopped renewing its lease."""
        async with self._unavailable():
            ids = await self.redis.zrangebyscore(self.keys.leases, "-inf", "(" + _score(now))
        return [str(i) for i in ids]

    async def events_after(self, job_id: str, after_id: int) -> list[JobEvent]:
        """Events of the job after `after_id` (stream entry ids are the event ids)."""
        async with self._unavailable():
            entries: Any = await self.redis.xrange(self.keys.events(job_id), f"{after_id + 1}-0", "+")
        return [
            JobEvent(
                int(str(entry_id).split("-", 1)[0]),
                job_id,
                str(fields["type"]),
                orjson.loads(fields["data"]),
                float(fields["time"]),
            )
            for entry_id, fields in entries
        ]

    async def wait_for_events(self, job_id: str, timeout_s: float) -> None:
        """Wait for a change of the job, in any replica (pub/sub), or the timeout."""
        await self._hub.wait(job_id, timeout_s)

    async def append_log(self, job_id: str, line: LogLine) -> None:
        """Add a log line, keeping the newest max_log_lines (nothing for a job that is gone)."""
        entry = orjson.dumps([line.time, int(line.level), line.message]).decode()
        k = self.keys
        async with self._unavailable():
            await self._append_log(keys=[k.job(job_id), k.logs(job_id)], args=[entry, self.max_log_lines])

    async def logs(self, job_id: str, min_level: LogLevel) -> list[LogLine]:
        """The job's log lines at min_level or above, oldest first."""
        async with self._unavailable():
            entries = await self.redis.lrange(self.keys.logs(job_id), 0, -1)
        lines = []
        for entry in entries:
            time, level, message = orjson.loads(entry)
            if level >= min_level:
                lines.append(LogLine(float(time), LogLevel(level), str(message)))
        return lines

    async def count_by_status(self) -> dict[JobStatus, int]:
        """Job counts per status (finished jobs count until purged)."""
        async with self._unavailable(), self.redis.pipeline(transaction=False) as pipe:
            for status in JobStatus:
                pipe.zcard(self.keys.status_jobs(status))
            counts = await pipe.execute()
        return {status: int(n) for status, n in zip(JobStatus, counts, strict=True) if n}

    async def purge_finished(self, before: float) -> int:
        """Delete jobs finished before `before` (or already expired) and their index entries."""
        k = self.keys
        purged = 0
        while True:
            async with self._unavailable():
                members: Any = await self.redis.zrangebyscore(
                    k.finished, "-inf", "(" + _score(before), start=0, num=SCAN_CHUNK
                )
            for member in members:
                job_id, tenant, status_value, order, idem_key = orjson.loads(member)
                status = JobStatus(status_value)
                keys = [
                    k.finished,
                    k.job(job_id),
                    k.events(job_id),
                    k.logs(job_id),
                    k.idempotency(tenant, idem_key or ""),
                    k.all_jobs,
                    k.tenant_jobs(tenant),
                    k.status_jobs(status),
                    k.tenant_status_jobs(tenant, status),
                ]
                async with self._unavailable():
                    purged += int(await self._purge(keys=keys, args=[member, order, job_id]))
            if len(members) < SCAN_CHUNK:
                return purged

    # --- result cache ---

    async def cache_lookup(self, tenant: str, key: str, now: float, max_age_s: float) -> CacheEntry | None:
        """The live entry (Redis expires entries by TTL); counts the lookup."""
        k = self.keys
        async with self._unavailable():
            raw: dict[Any, Any] = await self.redis.hgetall(k.cache_entry(tenant, key))
        entry = None
        if raw:
            entry = CacheEntry(
                tenant, key, str(raw["src"]), str(raw["result"]), float(raw["at"]), float(raw["exp"])
            )
            if not is_hit(entry, now, max_age_s):
                entry = None
        async with self._unavailable(), self.redis.pipeline(transaction=False) as pipe:
            pipe.hincrby(k.cache_counters(tenant), "hits" if entry else "misses", 1)
            pipe.sadd(k.cache_tenants, tenant)  # the admin's stats add up every tenant in this set
            await pipe.execute()
        return entry

    async def cache_put(self, entry: CacheEntry) -> None:
        """Store the entry with a key TTL that ends at its expiry."""
        k = self.keys
        ttl_ms = max(1, math.ceil((entry.expires_at - entry.cached_at) * 1000))
        keys = [
            k.cache_entry(entry.tenant, entry.key),
            k.cache_index(entry.tenant),
            k.cache_sizes(entry.tenant),
            k.cache_tenants,
        ]
        args = [
            entry.key,
            entry.source_job_id,
            entry.result_json,
            repr(entry.cached_at),
            repr(entry.expires_at),
            str(ttl_ms),
            str(entry.size),
            entry.tenant,
        ]
        async with self._unavailable():
            await self._cache_put(keys=keys, args=args)

    async def _cache_tenants(self, tenant: str | None) -> list[str]:
        if tenant is not None:
            return [tenant]
        async with self._unavailable():
            members = await self.redis.smembers(self.keys.cache_tenants)
        return sorted(str(m) for m in members)

    async def cache_stats(self, tenant: str | None, now: float) -> CacheStats:
        """Counts of one tenant (None: every tenant that ever looked up or stored an entry)."""
        k = self.keys
        total = CacheStats()
        for name in await self._cache_tenants(tenant):
            keys = [k.cache_index(name), k.cache_sizes(name), k.cache_counters(name)]
            async with self._unavailable():
                entries, size, hits, misses = await self._cache_stats(keys=keys, args=[_score(now)])
            total += CacheStats(int(hits), int(misses), int(entries), int(size))
        return total

    async def cache_clear(self) -> int:
        """Delete every tenant's entries and indexes."""
        k = self.keys
        deleted = 0
        for name in await self._cache_tenants(None):
            async with self._unavailable():
                members = await self.redis.zrange(k.cache_index(name), 0, -1)
            for start in range(0, len(members), SCAN_CHUNK):
                chunk = [k.cache_entry(name, str(m)) for m in members[start : start + SCAN_CHUNK]]
                async with self._unavailable():
                    deleted += int(await self.redis.unlink(*chunk))
            async with self._unavailable():
                await self.redis.unlink(k.cache_index(name), k.cache_sizes(name))
        return deleted

    async def cache_sweep(self, now: float) -> int:
        """Drop index entries of expired results (the results themselves expire by key TTL)."""
        k = self.keys
        swept = 0
        for name in await self._cache_tenants(None):
            async with self._unavailable():
                gone = await self.redis.zrangebyscore(k.cache_index(name), "-inf", _score(now))
                if gone:
                    async with self.redis.pipeline(transaction=True) as pipe:
                        pipe.hdel(k.cache_sizes(name), *gone)
                        pipe.zrem(k.cache_index(name), *gone)
                        await pipe.execute()
            swept += len(gone)
        return swept

    # --- webhook deliveries ---

    async def webhook_claim(self, now: float, lease_s: float, limit: int) -> list[Delivery]:
        """Due deliveries, put off by `lease_s` atomically (one script), so replicas share them."""
        k = self.keys
        async with self._unavailable():
            ids = await self._webhook_claim(
                keys=[k.webhooks_due], args=[_score(now), _score(now + lease_s), limit]
            )
        if not ids:
            return []
        async with self._unavailable():
            rows = await self.redis.mget([k.webhook(str(i)) for i in ids])
        claimed = []
        for job_id, data in zip(ids, rows, strict=True):
            if data is None:  # deleted meanwhile (delivered by another replica)
                async with self._unavailable():
                    await self.redis.zrem(k.webhooks_due, job_id)
                continue
            claimed.append(Delivery.from_json(data))
        return claimed

    async def webhook_save(self, delivery: Delivery) -> None:
        """Store the delivery and its next attempt time together."""
        k = self.keys
        async with self._unavailable(), self.redis.pipeline(transaction=True) as pipe:
            pipe.set(k.webhook(delivery.job_id), delivery.to_json())
            pipe.zadd(k.webhooks_due, {delivery.job_id: delivery.next_at})
            await pipe.execute()

    async def webhook_delete(self, job_id: str) -> None:
        """Forget the job's delivery."""
        k = self.keys
        async with self._unavailable(), self.redis.pipeline(transaction=True) as pipe:
            pipe.zrem(k.webhooks_due, job_id)
            pipe.delete(k.webhook(job_id))
            await pipe.execute()

    async def webhook_pending(self) -> int:
        """Deliveries waiting."""
        async with self._unavailable():
            return int(await self.redis.zcard(self.keys.webhooks_due))
