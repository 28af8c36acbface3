"""Header rewriting in both directions, and Retry-After parsing."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

import pytest
from multidict import CIMultiDict

from gateway.http.headers import (
    HOP_BY_HOP,
    RequestFieldReader,
    StaticFields,
    client_response_fields,
    field_value,
    parse_retry_after,
    upstream_request_fields,
)

Fields = list[tuple[bytes, bytes]]


def raw(*pairs: tuple[str, str]) -> Fields:
    return [(n.encode(), v.encode()) for n, v in pairs]


def parse_block(block: bytes) -> CIMultiDict[str]:
    """A header block ("Name: value\\r\\n" lines) back into a multidict, checking its form."""
    out: CIMultiDict[str] = CIMultiDict()
    assert block == b"" or block.endswith(b"\r\n")
    for line in block.split(b"\r\n")[:-1]:
        name, sep, value = line.partition(b": ")
        assert sep and name and b"\n" not in line
        out.add(name.decode(), value.decode())
    return out


def up(
    *pairs: tuple[str, str],
    client_ip: str | None = "10.0.0.9",
    scheme: str = "http",
    host: str | None = "gw.example",
    request_id: str = "req-1",
    static: Iterable[tuple[str, str]] = (),
) -> CIMultiDict[str]:
    fields = raw(*pairs)
    if host is not None:
        fields.append((b"Host", host.encode()))
    block = upstream_request_fields(
        RequestFieldReader().read(fields),
        client_ip=client_ip,
        scheme=scheme.encode(),
        host=host.encode() if host else None,
        request_id=request_id.encode(),
        static=StaticFields(static),
    )
    return parse_block(block)


def client_response_headers(pairs: Fields) -> CIMultiDict[str]:
    return parse_block(client_response_fields(pairs).block)


def hdrs(*pairs: tuple[str, str]) -> Fields:
    return raw(*pairs)


HOP_HEADERS = [
    "Connection",
    "Keep-Alive",
    "Proxy-Connection",
    "TE",
    "Trailer",
    "Transfer-Encoding",
    "Upgrade",
    "Proxy-Authenticate",
    "Proxy-Authorization",
]


def test_hop_by_hop_set_matches_rfc_list() -> None:
    assert {h.lower() for h in HOP_HEADERS} == HOP_BY_HOP


# --- request direction ---------------------------------------------------------------------


@pytest.mark.parametrize("name", HOP_HEADERS + [h.upper() for h in HOP_HEADERS])
def test_request_hop_by_hop_headers_stripped(name: str) -> None:
    out = up((name, "x"), ("Accept", "application/json"))
    assert name not in out
    assert out["Accept"] == "application/json"


@pytest.mark.parametrize("name", ["Host", "Expect", "host", "EXPECT"])
def test_request_host_and_expect_owned_by_gateway(name: str) -> None:
    out = up((name, "100-continue" if name.lower() == "expect" else "client.example"))
    assert name not in out


def test_request_headers_named_in_connection_stripped() -> None:
    out = up(
        ("Connection", "keep-alive, X-Secret , x-other"),
        ("X-Secret", "s"),
        ("X-Other", "o"),
        ("X-Kept", "k"),
    )
    assert "X-Secret" not in out
    assert "X-Other" not in out
    assert out["X-Kept"] == "k"


def test_request_headers_named_in_repeated_connection_lines_stripped() -> None:
    out = up(
        ("Connection", "X-A"),
        ("Connection", "X-B,,"),
        ("X-A", "1"),
        ("X-B", "2"),
        ("X-C", "3"),
    )
    assert "X-A" not in out and "X-B" not in out
    assert out["X-C"] == "3"


def test_request_end_to_end_headers_kept_with_values() -> None:
    out = up(
        ("Content-Type", "application/json"),
        ("Authorization", "Bearer client"),
        ("Accept-Encoding", "gzip"),
        ("X-Custom", "v"),
    )
    assert out["Content-Type"] == "application/json"
    assert out["Authorization"] == "Bearer client"
    assert out["Accept-Encoding"] == "gzip"
    assert out["X-Custom"] == "v"


def test_request_repeated_headers_preserved_in_order() -> None:
    out = up(("Cookie", "a=1"), ("X-Multi", "one"), ("Cookie", "b=2"), ("X-Multi", "two"))
    assert out.getall("Cookie") == ["a=1", "b=2"]
    assert out.getall("X-Multi") == ["one", "two"]


def test_request_x_forwarded_for_set_when_absent() -> None:
    out = up(client_ip="203.0.113.7")
    assert out.getall("X-Forwarded-For") == ["203.0.113.7"]


def test_request_x_forwarded_for_appended_to_existing_chain() -> None:
    out = up(("x-forwarded-for", "198.51.100.1, 198.51.100.2"), client_ip="203.0.113.7")
    assert out.getall("X-Forwarded-For") == ["198.51.100.1, 198.51.100.2, 203.0.113.7"]


def test_request_x_forwarded_for_repeated_lines_all_kept() -> None:
    out = up(
        ("X-Forwarded-For", "198.51.100.1"),
        ("X-Forwarded-For", "198.51.100.2"),
        client_ip="203.0.113.7",
    )
    assert out.getall("X-Forwarded-For") == ["198.51.100.1, 198.51.100.2, 203.0.113.7"]


def test_request_x_forwarded_for_untouched_without_client_ip() -> None:
    assert "X-Forwarded-For" not in up(client_ip=None)
    out = up(("X-Forwarded-For", "198.51.100.1"), client_ip=None)
    assert out.getall("X-Forwarded-For") == ["198.51.100.1"]


def test_request_x_forwarded_proto_set_and_appended() -> None:
    assert up(scheme="https").getall("X-Forwarded-Proto") == ["https"]
    out = up(("X-Forwarded-Proto", "https"), scheme="http")
    assert out.getall("X-Forwarded-Proto") == ["https, http"]


def test_request_x_forwarded_host_set_and_appended() -> None:
    assert up(host="api.example:8443").getall("X-Forwarded-Host") == ["api.example:8443"]
    out = up(("X-Forwarded-Host", "edge.example"), host="gw.example")
    assert out.getall("X-Forwarded-Host") == ["edge.example, gw.example"]
    assert "X-Forwarded-Host" not in up(host=None)


def test_request_x_request_id_set_replacing_client_value() -> None:
    assert up(request_id="abc").getall("X-Request-ID") == ["abc"]
    out = up(("x-request-id", "client-1"), ("X-Request-Id", "client-2"), request_id="abc")
    assert out.getall("X-Request-ID") == ["abc"]


def test_request_static_headers_override_client_headers() -> None:
    out = up(
        ("Authorization", "Bearer client"),
        ("authorization", "Bearer again"),
        static=[("Authorization", "Bearer upstream-key"), ("X-Team", "ml")],
    )
    assert out.getall("Authorization") == ["Bearer upstream-key"]
    assert out["X-Team"] == "ml"


def test_request_static_headers_override_forwarding_headers() -> None:
    out = up(static=[("X-Request-ID", "fixed"), ("X-Forwarded-Proto", "https")])
    assert out.getall("X-Request-ID") == ["fixed"]
    assert out.getall("X-Forwarded-Proto") == ["https"]


def test_request_input_not_modified() -> None:
    incoming = hdrs(("Connection", "close"), ("X-Forwarded-For", "1.2.3.4"))
    fields = RequestFieldReader().read(incoming)
    upstream_request_fields(fields, client_ip="5.6.7.8", scheme=b"http", host=None, request_id=b"r")
    assert incoming == [(b"Connection", b"close"), (b"X-Forwarded-For", b"1.2.3.4")]


def test_request_framing_read_and_not_forwarded() -> None:
    fields = RequestFieldReader().read(hdrs(("Content-Length", "12"), ("X-A", "1")))
    assert fields.content_length == 12 and not fields.chunked
    chunked = RequestFieldReader().read(hdrs(("Transfer-Encoding", "chunked")))
    assert chunked.content_length is None and chunked.chunked
    out = up(("Content-Length", "12"), ("Transfer-Encoding", "chunked"), ("X-A", "1"))
    assert "Content-Length" not in out and "Transfer-Encoding" not in out
    assert out["X-A"] == "1"


def test_request_extra_names_captured_and_still_forwarded() -> None:
    reader = RequestFieldReader(extra=("X-Gateway-Timeout",))
    fields = reader.read(hdrs(("x-gateway-timeout", "2.5"), ("X-Request-Id", "abc")))
    assert fields.get(b"x-gateway-timeout") == b"2.5"
    assert fields.get(b"x-request-id") == b"abc"
    block = upstream_request_fields(fields, client_ip=None, scheme=b"http", host=None, request_id=b"abc")
    assert parse_block(block)["X-Gateway-Timeout"] == "2.5"


# --- response direction --------------------------------------------------------------------


@pytest.mark.parametrize("name", HOP_HEADERS)
def test_response_hop_by_hop_headers_stripped(name: str) -> None:
    out = client_response_headers(hdrs((name, "x"), ("Content-Type", "text/plain")))
    assert name not in out
    assert out["Content-Type"] == "text/plain"


def test_response_content_length_dropped() -> None:
    out = client_response_headers(hdrs(("Content-Length", "42"), ("content-type", "a/b")))
    assert "Content-Length" not in out
    assert out["Content-Type"] == "a/b"


def test_response_values_the_gateway_reads() -> None:
    fields = client_response_fields(
        hdrs(("Content-Length", "42"), ("content-type", "text/event-stream"), ("Retry-After", "3"))
    )
    assert fields.content_length == 42
    assert fields.content_type == b"text/event-stream"
    assert b"Retry-After: 3\r\n" in fields.block
    empty = client_response_fields([])
    assert (empty.block, empty.content_length, empty.content_type) == (b"", None, None)


def test_field_value_is_the_first_value_case_insensitively() -> None:
    fields = hdrs(("retry-after", "3"), ("Retry-After", "9"))
    assert field_value(fields, b"retry-after") == "3"
    assert field_value(fields, b"x-missing") is None


def test_response_gateway_tracing_headers_replaced_not_forwarded() -> None:
    out = client_response_headers(
        hdrs(("X-Request-ID", "theirs"), ("X-Gateway-Upstream", "x"), ("X-Gateway-Attempts", "9"), ("A", "1"))
    )
    assert list(out.items()) == [("A", "1")]


def test_response_headers_named_in_connection_stripped() -> None:
    out = client_response_headers(hdrs(("Connection", "X-Internal"), ("X-Internal", "1"), ("X-Public", "2")))
    assert "X-Internal" not in out
    assert out["X-Public"] == "2"


def test_response_set_cookie_and_vary_stay_repeated() -> None:
    out = client_response_headers(
        hdrs(
            ("Set-Cookie", "a=1; Path=/"),
            ("Vary", "Accept"),
            ("Set-Cookie", "b=2; Expires=Wed, 21 Oct 2015 07:28:00 GMT"),
            ("Vary", "Accept-Encoding"),
        )
    )
    assert out.getall("Set-Cookie") == ["a=1; Path=/", "b=2; Expires=Wed, 21 Oct 2015 07:28:00 GMT"]
    assert out.getall("Vary") == ["Accept", "Accept-Encoding"]


def test_response_end_to_end_headers_kept_in_order() -> None:
    pairs = [
        ("Content-Type", "text/event-stream"),
        ("Cache-Control", "no-cache"),
        ("Retry-After", "3"),
        ("Content-Encoding", "gzip"),
    ]
    assert list(client_response_headers(hdrs(*pairs)).items()) == pairs


def test_response_host_and_expect_not_stripped() -> None:
    # only the request direction owns those
    out = client_response_headers(hdrs(("Expect", "x")))
    assert out["Expect"] == "x"


# --- Retry-After ---------------------------------------------------------------------------

NOW = datetime(2024, 5, 1, 12, 0, 0, tzinfo=UTC)
NOW_S = NOW.timestamp()


@pytest.mark.parametrize(
    ("value", "expected"),
    [("120", 120.0), ("0", 0.0), ("  7 ", 7.0), ("007", 7.0), ("1.5", 1.5)],
)
def test_parse_retry_after_delta_seconds(value: str, expected: float) -> None:
    assert parse_retry_after(value, NOW_S) == expected


def test_parse_retry_after_http_date_in_future() -> None:
    value = format_datetime(NOW + timedelta(seconds=90), usegmt=True)
    assert value.endswith("GMT")
    assert parse_retry_after(value, NOW_S) == pytest.approx(90.0)


def test_parse_retry_after_http_date_uses_given_clock() -> None:
    value = format_datetime(NOW + timedelta(seconds=90), usegmt=True)
    assert parse_retry_after(value, NOW_S + 30.0) == pytest.approx(60.0)


def test_parse_retry_after_http_date_in_past_is_zero() -> None:
    value = format_datetime(NOW - timedelta(hours=1), usegmt=True)
    assert parse_retry_after(value, NOW_S) == 0.0


def test_parse_retry_after_http_date_with_numeric_zone() -> None:
    assert parse_retry_after("Wed, 01 May 2024 14:00:30 +0200", NOW_S) == pytest.approx(30.0)


@pytest.mark.parametrize(
    "value",
    [
        None,
        "",
        "   ",
        "-5",
        "-0.5",
        "nan",
        "soon",
        "0x10",
        "12 seconds",
        "Wed, 01 May 2024 12:00:30",  # no zone: ambiguous
        "Wed, 32 May 2024 12:00:30 GMT",  # impossible date
        "Wed, 01 May 99999 12:00:30 GMT",
        "\u00b2",  # superscript two: str.isdigit() is True but float() rejects it
        "\u00b9\u00b2",
    ],
)
def test_parse_retry_after_garbage_is_none(value: str | None) -> None:
    assert parse_retry_after(value, NOW_S) is None
