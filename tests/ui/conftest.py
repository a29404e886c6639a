"""Fixtures of the UI tests: live servers over FakeEngines whose answers take long enough to be interrupted."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.http.http_fakes import FakeEngine
from tests.http.http_live import LiveServer, server_config
from trillm.http.app import create_app

STEP_S = 0.04  # one token per step: the fake's whole answer (SCRIPT, then EOS) takes about 3 s
LONG_STEP_S = 0.25  # for an answer to interrupt: 19 s, so a Ctrl-C or Cancel lands mid-answer on a busy machine


def serve(engine: FakeEngine) -> LiveServer:
    return LiveServer(create_app(server_config(), engine=engine)).start()


@pytest.fixture(scope="module")
def slow_engine() -> FakeEngine:
    return FakeEngine(step_s=STEP_S)


@pytest.fixture(scope="module")
def slow_server(slow_engine: FakeEngine) -> Iterator[LiveServer]:
    server = serve(slow_engine)
    yield server
    server.stop()
