"""Heavy requests do not stall the server (issue 13): while a client keeps sending a body with 1,000,000 stop strings
or a 15 MB prompt (each refused with a 400), /health answers with p99 under 50 ms and a concurrent stream takes at
most 1.5x its unloaded time.

The bodies are refused without being walked element by element or tokenized (`decode_json` counts strings first,
`check_raw` measures the prompt before tokenizing), and a large body is decoded in a worker thread.
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import httpx
import pytest
from http_fakes import FakeEngine
from http_live import LiveServer, server_config

from trillm.http.app import create_app

pytestmark = pytest.mark.slow

STREAM = {"messages": "hi", "max_tokens": 60, "stream": True}
ATTEMPTS = 3


@pytest.fixture(scope="module")
def server() -> Iterator[LiveServer]:
    live = LiveServer(create_app(server_config(), engine=FakeEngine(step_s=0.002))).start()
    yield live
    live.stop()


def stream_s(client: httpx.Client) -> float:
    start = time.perf_counter()
    with client.stream("POST", "/v1/chat/completions", json=STREAM) as response:
        assert response.status_code == 200
        assert response.read().rstrip().endswith(b"data: [DONE]")
    return time.perf_counter() - start


def health_s(client: httpx.Client, num: int) -> list[float]:
    times = []
    for _ in range(num):
        start = time.perf_counter()
        assert client.get("/health").status_code == 200
        times.append(time.perf_counter() - start)
        time.sleep(0.005)
    return times


def p99(values: list[float]) -> float:
    return sorted(values)[int(0.99 * (len(values) - 1))]


FLOOD = """
import http.client, json, sys, urllib.parse
url = urllib.parse.urlsplit(sys.argv[1])
body = {bodies}[sys.argv[2]]
connection = http.client.HTTPConnection(url.hostname, url.port, timeout=60)
while True:
    connection.request("POST", "/v1/completions", body=body, headers={{"Content-Type": "application/json"}})
    response = connection.getresponse()
    response.read()
    assert response.status == 400, response.status
    print("sent", flush=True)
""".format(bodies='{"stops": json.dumps({"prompt": "x", "stop": ["stop-string"] * 1_000_000}).encode(), '
                  '"prompt": json.dumps({"prompt": "word " * 3_000_000}).encode()}')


class Flood:
    """Sends one kind of heavy body back to back from another process (as a client would) until stopped."""

    def __init__(self, url: str, kind: str) -> None:
        self.num_sent = 0
        self._process = subprocess.Popen([sys.executable, "-c", FLOOD, url, kind], stdout=subprocess.PIPE, text=True)
        self._thread = threading.Thread(target=self._count, daemon=True)
        self._thread.start()

    def _count(self) -> None:
        assert self._process.stdout is not None
        for _ in self._process.stdout:
            self.num_sent += 1

    def stop(self) -> None:
        self._process.kill()
        self._process.wait(timeout=30)
        self._thread.join(timeout=30)


def measure(server: LiveServer, kind: str) -> tuple[float, float, float, float]:
    """(unloaded /health p99, loaded /health p99, unloaded stream, loaded stream), in seconds."""
    with httpx.Client(base_url=server.url, timeout=60) as client:
        stream_s(client)  # warm-up
        unloaded_stream = statistics.median(stream_s(client) for _ in range(3))
        unloaded_health = p99(health_s(client, 50))
        flood = Flood(server.url, kind)
        try:
            deadline = time.monotonic() + 60
            while flood.num_sent < 1:
                assert time.monotonic() < deadline, "no heavy request was answered"
                time.sleep(0.01)
            loaded_stream = statistics.median(stream_s(client) for _ in range(3))
            loaded_health = p99(health_s(client, 100))
        finally:
            flood.stop()
    assert flood.num_sent >= 2
    print(f"{kind}: {flood.num_sent} bodies of 15 MB sent: /health p99 {unloaded_health * 1e3:.1f} -> "
          f"{loaded_health * 1e3:.1f} ms, stream {unloaded_stream * 1e3:.0f} -> {loaded_stream * 1e3:.0f} ms")
    return unloaded_health, loaded_health, unloaded_stream, loaded_stream


@pytest.mark.parametrize("kind", ["stops", "prompt"], ids=["1M-stop-strings", "15MB-prompt"])
def test_health_and_a_stream_keep_their_pace_beside_a_heavy_request(server: LiveServer, kind: str) -> None:
    # Best of ATTEMPTS: on a shared, loaded CI machine one measurement can catch the OS scheduling others. A server
    # that stalls on these bodies (the issue measured 826 ms and 6-7 s) fails every attempt.
    results = []
    for _ in range(ATTEMPTS):
        _, loaded_health, unloaded_stream, loaded_stream = measure(server, kind)
        results.append((loaded_health, loaded_stream / unloaded_stream))
        if loaded_health < 0.050 and loaded_stream < 1.5 * unloaded_stream:
            return
    raise AssertionError(f"(/health p99 s, stream slowdown) of each attempt: {results}")
