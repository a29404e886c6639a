"""Shared fixtures of the HTTP tests: a FakeEngine and a live server over it (one per test module)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from http_fakes import FakeEngine
from http_live import LiveServer, server_config

from trillm.http.app import create_app


@pytest.fixture(scope="module")
def fake_engine() -> FakeEngine:
    return FakeEngine()


@pytest.fixture(scope="module")
def fake_server(fake_engine: FakeEngine) -> Iterator[LiveServer]:
    """A live server over a FakeEngine, no API keys."""
    server = LiveServer(create_app(server_config(), engine=fake_engine)).start()
    yield server
    server.stop()
