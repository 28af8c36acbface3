"""What the optional fields of a submission do before it is stored: `webhook` and `cache`.

Called by `routes.submit` between validation and `store.create`, in this order: `with_webhook`
checks the URL against JOBS_WEBHOOK_ALLOWED_HOSTS (422 otherwise) and keeps it on the job, then
`from_cache` marks the job for the result cache and, on a hit, completes it at once
(`jobs_api.caching`); such a job's webhook is called too.
"""

from __future__ import annotations

import logging

import orjson
from aiohttp import web

from jobs_api.caching import CacheSpec, cache_key, complete_from, tenant_of
from jobs_api.config import JobsSettings
from jobs_api.errors import ValidationFailed
from jobs_api.keys import STORE
from jobs_api.models import Job
from jobs_api.webhooks import WebhookSpec, check_url

log = logging.getLogger(__name__)


def with_webhook(settings: JobsSettings, job: Job, spec: WebhookSpec | None) -> Job:
    """The job with its webhook URL; ValidationFailed (422) for a URL that may not be called."""
    if spec is None:
        return job
    try:
        url = check_url(spec.url, settings.webhook_allowed_hosts)
    except ValueError as exc:
        raise ValidationFailed(f"webhook.url: {exc}") from None
    return job.model_copy(update={"webhook_url": url})


async def from_cache(app: web.Application, job: Job, spec: CacheSpec | None) -> Job:
    """The new job, marked for caching; completed at once from a live entry of its tenant, if any."""
    if spec is None:
        return job
    job = job.model_copy(update={"cache_ttl_s": spec.ttl_s, "cache_key": cache_key(job.type, job.input)})
    assert job.cache_key is not None
    entry = await app[STORE].cache_lookup(tenant_of(job), job.cache_key, job.created_at, spec.ttl_s)
    if entry is None:
        return job
    log.info("job %s (%s): result from the cache (job %s)", job.id, job.type, entry.source_job_id)
    return complete_from(job, entry, orjson.loads(entry.result_json), job.created_at)
