"""Reading 4xx bodies: context-window errors and content-policy rejections of the servers we front."""

from __future__ import annotations

import orjson
import pytest

from gateway.policy.classify import Outcome
from gateway.policy.rejections import Rejection, classify_rejection
from gateway.policy.retry import GiveUp, GiveUpReason, Retry, RetryPolicy


@pytest.mark.parametrize(
    ("body", "verdict"),
    [
        # OpenAI
        (
            {
                "error": {
                    "message": "too long",
                    "type": "invalid_request_error",
                    "code": "context_length_exceeded",
                }
            },
            Rejection.CONTEXT_LENGTH,
        ),
        # vLLM (OpenAI shape, its own message)
        (
            {
                "error": {
                    "message": "This model's maximum context length is 4096 tokens. However, you requested 5",
                    "type": "BadRequestError",
                    "param": None,
                    "code": 400,
                }
            },
            Rejection.CONTEXT_LENGTH,
        ),
        # older vLLM
        (
            {
                "object": "error",
                "message": "This model's maximum context length is 2048 tokens.",
                "type": "BadRequestError",
                "code": 400,
            },
            Rejection.CONTEXT_LENGTH,
        ),
        # SGLang
        (
            {
                "object": "error",
                "message": "The input (5000 tokens) is longer than the model's context length (4096 tokens).",
                "type": "BadRequestError",
                "code": 400,
            },
            Rejection.CONTEXT_LENGTH,
        ),
        # TGI
        (
            {
                "error": "Input validation error: `inputs` tokens + `max_new_tokens` must be <= 4096.",
                "error_type": "validation",
            },
            Rejection.CONTEXT_LENGTH,
        ),
        # Azure OpenAI content filter
        (
            {
                "error": {
                    "message": "The response was filtered due to the prompt triggering "
                    "Azure OpenAI's content management policy.",
                    "code": "content_filter",
                    "innererror": {"code": "ResponsibleAIPolicyViolation"},
                }
            },
            Rejection.CONTENT_POLICY,
        ),
        ({"error": {"message": "blocked", "code": "content_policy_violation"}}, Rejection.CONTENT_POLICY),
        ({"error": {"message": "model not found", "code": "model_not_found"}}, Rejection.OTHER),
        ({"detail": "nope"}, Rejection.OTHER),
    ],
)
def test_classify_rejection(body: object, verdict: Rejection) -> None:
    assert classify_rejection(orjson.dumps(body)) is verdict


@pytest.mark.parametrize("raw", [b"", b"not json", b"[1, 2]", b'"text"'])
def test_bodies_that_are_not_error_objects_are_other(raw: bytes) -> None:
    assert classify_rejection(raw) is Rejection.OTHER


POLICY = RetryPolicy(3, frozenset({400, 503}))


def decide(rejection: Rejection) -> Retry | GiveUp:
    return POLICY.decide(
        attempt=1,
        outcome=Outcome.HTTP_4XX,
        status=400,
        body_replayable=True,
        deadline_left_s=None,
        rejection=rejection,
    )


def test_a_policy_rejection_is_final_even_for_a_retried_status() -> None:
    assert decide(Rejection.CONTENT_POLICY) == GiveUp(GiveUpReason.NOT_RETRYABLE)


def test_a_context_error_is_retried_even_when_its_status_is_not_listed() -> None:
    policy = RetryPolicy(3, frozenset({503}))
    got = policy.decide(
        attempt=1,
        outcome=Outcome.HTTP_4XX,
        status=400,
        body_replayable=True,
        deadline_left_s=None,
        rejection=Rejection.CONTEXT_LENGTH,
    )
    assert got == Retry(Outcome.HTTP_4XX)
