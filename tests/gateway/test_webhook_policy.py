"""Webhook decisions for fleet state changes (pure): events, payload, signature, retries, queue bound."""

from __future__ import annotations

import base64
import json
from datetime import UTC, datetime

import pytest
from standardwebhooks.webhooks import Webhook

from gateway.config import GatewaySettings, WebhookEvent, load_webhook_secret
from gateway.policy.outlier import State, Transition
from gateway.policy.redundancy import Member, assess
from gateway.policy.webhooks import (
    MAX_QUEUED,
    Delivery,
    FleetWatch,
    Outbox,
    Result,
    RetryPolicy,
    decide,
    payload,
    sign,
    upstream_event,
)

SECRET = "whsec_" + base64.b64encode(b"0123456789abcdef0123456789abcdef").decode()


def t(before: State, after: State) -> Transition:
    return Transition(before, after, "why")


def test_upstream_events_by_transition() -> None:
    assert upstream_event(t(State.HEALTHY, State.EJECTED)) is WebhookEvent.EJECTED
    assert upstream_event(t(State.HEALTHY, State.UNHEALTHY)) is WebhookEvent.EJECTED
    assert upstream_event(t(State.EJECTED, State.UNHEALTHY)) is None  # still out: said once
    assert upstream_event(t(State.EJECTED, State.HEALTHY)) is WebhookEvent.RECOVERED
    assert upstream_event(t(State.UNHEALTHY, State.HEALTHY)) is WebhookEvent.RECOVERED
    assert upstream_event(t(State.DRAINED, State.HEALTHY)) is WebhookEvent.RECOVERED
    assert upstream_event(t(State.HEALTHY, State.DRAINED)) is WebhookEvent.DRAINED
    assert upstream_event(t(State.HEALTHY, State.COOLING_DOWN)) is None
    assert upstream_event(t(State.COOLING_DOWN, State.HEALTHY)) is None


def test_fleet_watch_reports_failover_and_degraded_changes_once() -> None:
    both = assess([Member("a", 0, True), Member("b", 1, True)])
    primary_out = assess([Member("a", 0, False), Member("b", 1, True)])
    watch = FleetWatch(both, 0)
    assert watch.observe(both, 0) == []
    events = watch.observe(primary_out, 1)
    assert [e for e, _ in events] == [WebhookEvent.FAILOVER, WebhookEvent.DEGRADED]
    assert events[0][1] == {"from_tier": 0, "to_tier": 1}
    assert events[1][1]["degraded"] is True and events[1][1]["level"] == "none"
    assert watch.observe(primary_out, 1) == []
    back = watch.observe(both, 0)
    assert back == [
        (WebhookEvent.FAILOVER, {"from_tier": 1, "to_tier": 0}),
        (WebhookEvent.DEGRADED, {"degraded": False, "level": "single", "reasons": []}),
    ]


def test_payload_is_typed_json_and_signature_matches_standardwebhooks() -> None:
    body = payload(WebhookEvent.DRAINED, {"upstream": "a"}, 1_700_000_000.5)
    assert json.loads(body) == {
        "type": "drained",
        "timestamp": "2023-11-14T22:13:20.500Z",
        "data": {"upstream": "a"},
    }
    key = load_webhook_secret(SECRET)
    expected = Webhook(SECRET).sign("msg_1", datetime.fromtimestamp(1_700_000_000, UTC), body.decode())
    assert sign(key, "msg_1", 1_700_000_000, body) == expected


def test_decide_delivers_fails_and_backs_off_for_an_hour() -> None:
    policy = RetryPolicy()
    d = Delivery(0, "msg_1", b"{}", next_at=0.0)
    assert decide(d, 204, 0.0, policy) == (Result.DELIVERED, None)
    assert decide(d, 400, 0.0, policy) == (Result.FAILED, None)
    assert decide(d, 302, 0.0, policy) == (Result.FAILED, None)
    delays: list[float] = []
    now = 0.0
    while True:
        result, kept = decide(d, 503 if len(delays) % 2 else None, now, policy)
        if kept is None:
            assert result is Result.FAILED
            break
        assert result is Result.RETRIED and kept.first_attempt_at == 0.0
        delays.append(kept.next_at - now)
        d, now = kept, kept.next_at
    assert delays[:5] == [1.0, 2.0, 4.0, 8.0, 16.0]
    assert max(delays) == 300.0
    assert now <= 3600.0 < now + 300.0  # gave up within an hour of the first attempt
    assert decide(Delivery(0, "m", b"{}", 0.0), 429, 0.0, policy)[0] is Result.RETRIED


def test_outbox_drops_the_oldest_when_full_and_takes_due_ones() -> None:
    box = Outbox(limit=3)
    items = [Delivery(0, f"m{i}", b"", next_at=float(i)) for i in range(4)]
    assert [box.push(d) for d in items[:3]] == [None, None, None]
    assert box.push(items[3]) == items[0]
    assert len(box) == 3 and box.next_due() == 1.0
    assert box.take_due(2.0, most=10) == items[1:3]
    assert box.take_due(2.0, most=10) == []
    assert Outbox().limit == MAX_QUEUED == 1000


def test_webhook_settings_validate_secret_url_and_events(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOOK_SECRET", SECRET)
    s = GatewaySettings(
        upstreams=["http://127.0.0.1:1"],
        webhooks=[{"url": "http://127.0.0.1:2/h", "events": ["ejected"], "secret": "${HOOK_SECRET}"}],
    )
    assert s.webhooks[0].secret.get_secret_value() == SECRET
    assert s.webhooks[0].events == {WebhookEvent.EJECTED}
    every = GatewaySettings(
        upstreams=["http://127.0.0.1:1"], webhooks=[{"url": "https://x/", "secret": SECRET}]
    )
    assert every.webhooks[0].events == set(WebhookEvent)
    for bad, match in (
        ({"url": "ftp://x/", "secret": SECRET}, "not an http"),
        ({"url": "http://x/", "secret": "plain"}, "whsec_"),
        ({"url": "http://x/", "secret": SECRET, "events": ["exploded"]}, "events"),
        ({"url": "http://x/", "secret": SECRET, "events": []}, "at least one"),
    ):
        with pytest.raises(ValueError, match=match):
            GatewaySettings(upstreams=["http://127.0.0.1:1"], webhooks=[bad])
