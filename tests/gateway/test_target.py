"""Request targets that would leave the upstream's path prefix (pure)."""

from __future__ import annotations

import pytest

from gateway.http.target import escapes_prefix


@pytest.mark.parametrize(
    "target",
    [
        b"/..",
        b"/../x",
        b"/v1/../../x",
        b"/v1/%2e%2e/x",
        b"/v1/%2E%2e/x",
        b"/v1/.%2e/x",
        b"/v1/..%2fx",
        b"/v1/%2e%2e%2f%2e%2e%2fx",
        b"/v1/..%5cx",
        b"/v1/..\\x",
        b"/v1/x/..?q=1",
    ],
)
def test_escapes_prefix_finds_dot_dot_however_encoded(target: bytes) -> None:
    assert escapes_prefix(target)


@pytest.mark.parametrize(
    "target",
    [
        b"/",
        b"/v1/chat/completions",
        b"/v1/models/llama-3.1-8b",
        b"/v1/models/meta-llama%2FLlama-3",
        b"/v1/a..b/c",
        b"/v1/./x",
        b"/v1/...",
        b"/v1/x?next=../../y",
        b"/v1/x?%2e%2e",
    ],
)
def test_escapes_prefix_leaves_harmless_targets_alone(target: bytes) -> None:
    assert not escapes_prefix(target)
