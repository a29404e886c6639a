"""Listening settings and the kernel's listen-queue drop count (trillm/http/listening.py)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from trillm.config import ServerConfig
from trillm.http.listening import ListenQueueWatch, hypercorn_settings, read_listen_drops
from trillm.http.metrics import ServerMetrics

NETSTAT = """TcpExt: SyncookiesSent ListenOverflows ListenDrops TCPHPHits
TcpExt: 0 {overflows} {drops} 12
IpExt: InNoRoutes InTruncatedPkts
IpExt: 0 0
"""


def netstat(path: Path, drops: int) -> Path:
    path.write_text(NETSTAT.format(overflows=drops, drops=drops))
    return path


def test_hypercorn_gets_a_deep_backlog_and_a_keep_alive_longer_than_client_pools() -> None:
    settings = hypercorn_settings(ServerConfig(server_name="::1", server_port=8000, backlog=2048))
    assert settings.bind == ["[::1]:8000"]
    assert settings.backlog == 2048 and ServerConfig().backlog == 4096
    assert settings.keep_alive_timeout == 75.0 > 5.0  # httpx's and the OpenAI SDK's pool expiry
    assert settings.read_timeout is None  # a read timeout would cut long streams


def test_listen_drops_are_read_from_netstat(tmp_path: Path) -> None:
    assert read_listen_drops(netstat(tmp_path / "netstat", 17)) == 17
    assert read_listen_drops(tmp_path / "missing") is None


def test_the_watch_counts_drops_since_start_and_warns_when_they_grow(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = netstat(tmp_path / "netstat", 100)
    watch = ListenQueueWatch(backlog=4096, path=path)
    watch.check()
    assert watch.num_dropped == 0 and not caplog.records
    netstat(path, 103)
    with caplog.at_level(logging.WARNING):
        watch.check()
    assert watch.num_dropped == 3
    assert "the kernel dropped 3 connection(s) at a full listen queue (backlog 4096)" in caplog.text


def test_metrics_export_the_drops_and_client_disconnects(tmp_path: Path) -> None:
    path = netstat(tmp_path / "netstat", 5)
    watch = ListenQueueWatch(backlog=100, path=path)
    metrics = ServerMetrics(lambda: None, lambda: "m", lambda: watch.num_dropped)
    netstat(path, 9)
    watch.check()
    trace = metrics.trace("chat")
    trace.on_tokens(3)
    trace.finish(is_disconnected=True)
    text = metrics.render().decode()
    assert "trillm:listen_drops_total 4.0" in text
    assert 'trillm:client_disconnects_total{endpoint="chat"} 1.0' in text
    assert "trillm:e2e_request_latency_seconds_count 0.0" in text  # a disconnect is not a latency sample
