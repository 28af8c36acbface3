"""Fixtures of the gateway tests that speak raw HTTP/1.1 (see raw_http.py)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from tests.gateway.raw_http import OpenRaw, StartRaw, raw_clients, raw_upstreams


@pytest.fixture
async def start_raw() -> AsyncIterator[StartRaw]:
    """Start a scripted raw upstream; closed after the test."""
    async with raw_upstreams() as start:
        yield start


@pytest.fixture
async def open_raw() -> AsyncIterator[OpenRaw]:
    """Open a raw client connection to a loopback port; closed after the test."""
    async with raw_clients() as opener:
        yield opener
