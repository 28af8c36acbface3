"""What a batch looks like from outside: each item's status, the counts, where its outcome is.

A batch is one `batch` job. While it runs, its attempt stores every item's status with its
progress (`Job.item_progress`); once it ends with a result (completed, or failed by `fail_fast`),
the result holds each item's outcome. Rules: a queued batch (first attempt, or again after a
retry or a lost worker) has every item queued; a running one shows what its current attempt
stored (queued until it stored anything); an ended one shows its result's items, and without a
result (cancelled, timed out, failed otherwise) the items that had not finished are `cancelled`.
An item's `result_url` is set only once its outcome is stored, i.e. in the result. Pure.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any

from jobs_api.models import Job, JobStatus

BATCH_TYPE = "batch"


class ItemStatus(StrEnum):
    """Where one item of a batch is."""

    QUEUED = "queued"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    SKIPPED = "skipped"  # fail_fast: an earlier item failed the batch first
    CANCELLED = "cancelled"  # the batch ended before the item finished

    @property
    def finished(self) -> bool:
        """True once the item will not change any more within its attempt."""
        return self in _FINISHED


_FINISHED = frozenset({ItemStatus.COMPLETED, ItemStatus.FAILED, ItemStatus.SKIPPED, ItemStatus.CANCELLED})
_NAMES = frozenset(status.value for status in ItemStatus)


def item_count(job: Job) -> int:
    """How many items the batch has (its validated input always holds the list)."""
    items = job.input.get("items")
    return len(items) if isinstance(items, list) else 0


def result_items(job: Job) -> list[dict[str, Any]] | None:
    """The stored outcome of each item (from the batch's result), or None before there is one."""
    result = job.result
    if not isinstance(result, dict):
        return None
    items = result.get("items")
    if not isinstance(items, list) or len(items) != item_count(job):
        return None
    if not all(isinstance(item, dict) and item.get("status") in _NAMES for item in items):
        return None
    return items


def item_statuses(job: Job) -> list[ItemStatus]:
    """The status of every item of the batch `job`, in item order."""
    total = item_count(job)
    stored_outcomes = result_items(job)
    if stored_outcomes is not None:
        return [ItemStatus(item["status"]) for item in stored_outcomes]
    queued = [ItemStatus.QUEUED] * total
    if job.status is JobStatus.QUEUED:
        return queued
    progress = job.item_progress
    current = queued
    if progress is not None and progress.attempt == job.attempts and len(progress.statuses) == total:
        current = [ItemStatus(s) if s in _NAMES else ItemStatus.QUEUED for s in progress.statuses]
    if job.status is JobStatus.RUNNING:
        return current
    return [s if s.finished else ItemStatus.CANCELLED for s in current]


def counts(statuses: list[ItemStatus]) -> dict[str, int]:
    """How many items are in each status; every status is present, zero or not."""
    out = {status.value: 0 for status in ItemStatus}
    for status in statuses:
        out[status.value] += 1
    return out


def item_url(batch_id: str, index: int) -> str:
    """Where the outcome of item `index` of a batch is served."""
    return f"/v1/batches/{batch_id}/items/{index}"


def batch_items(job: Job) -> list[dict[str, Any]]:
    """Each item as `GET /v1/batches/{id}` lists it: index, status, job id, result_url (and error)."""
    stored_outcomes = result_items(job)
    items = []
    for index, status in enumerate(item_statuses(job)):
        item: dict[str, Any] = {"index": index, "status": status.value, "job_id": job.id, "result_url": None}
        if stored_outcomes is not None and status in (ItemStatus.COMPLETED, ItemStatus.FAILED):
            item["result_url"] = item_url(job.id, index)
            error = stored_outcomes[index].get("error")
            if status is ItemStatus.FAILED and isinstance(error, dict):
                item["error"] = error
        items.append(item)
    return items


def item_outcome(job: Job, index: int) -> dict[str, Any] | None:
    """The stored outcome of item `index` (`{"index", "status", "result" | "error"}`), or None."""
    stored_outcomes = result_items(job)
    if stored_outcomes is None:
        return None
    outcome = stored_outcomes[index]
    status = ItemStatus(outcome["status"])
    if status not in (ItemStatus.COMPLETED, ItemStatus.FAILED):
        return None
    key = "result" if status is ItemStatus.COMPLETED else "error"
    return {"index": index, "status": status.value, key: outcome.get(key)}
