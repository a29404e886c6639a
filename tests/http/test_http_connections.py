"""Connection handling under a burst: 1,000 streaming clients connecting at once to `trillm serve api_server`.

The real command line serves the default model on a loopback port; every client opens its own connection (no
pooling) at the same moment and streams a short completion. Before the listen backlog was raised (hypercorn's default
is 100) 20-50 % of these clients saw their connection closed with nothing in the server's log.
"""

from __future__ import annotations

import collections
import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import trio

from served import ServedProcess

NUM_CLIENTS = 1000
TIMEOUT_S = 600.0


@pytest.fixture
def served_url(smollm2_folder: str, tmp_path: Path) -> Iterator[str]:
    served = ServedProcess(smollm2_folder, "--session-len", "256", "--model-name", "smol", "--log-level", "warning",
                           cwd=tmp_path)
    try:
        served.wait_ready()
        yield served.url
    finally:
        served.process.terminate()
        served.process.wait(timeout=60)
    assert "Traceback" not in "".join(served.output), "".join(served.output)


async def stream_one(client: httpx.AsyncClient, index: int, outcomes: collections.Counter[str]) -> None:
    body = {"model": "smol", "prompt": f"Count to {index}:", "max_tokens": 2, "ignore_eos": True, "stream": True}
    try:
        async with client.stream("POST", "/v1/completions", json=body) as response:
            text = (await response.aread()).decode()
    except httpx.TransportError as exc:
        outcomes[type(exc).__name__] += 1
        return
    if response.status_code != 200:
        outcomes[f"status {response.status_code}"] += 1
    elif not text.rstrip().endswith("data: [DONE]") or text.count('"finish_reason":"length"') != 1:
        outcomes["incomplete stream"] += 1
    else:
        outcomes["ok"] += 1


@pytest.mark.slow
async def test_a_thousand_streaming_clients_connecting_at_once_all_complete(served_url: str) -> None:
    outcomes: collections.Counter[str] = collections.Counter()
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=0)  # one connection per client
    timeout = httpx.Timeout(TIMEOUT_S, connect=TIMEOUT_S)
    async with httpx.AsyncClient(base_url=served_url, limits=limits, timeout=timeout) as client:
        with trio.fail_after(TIMEOUT_S):
            async with trio.open_nursery() as nursery:
                for index in range(NUM_CLIENTS):
                    nursery.start_soon(stream_one, client, index, outcomes)
        metrics = (await client.get("/metrics")).text
    assert outcomes == {"ok": NUM_CLIENTS}
    drops = re.search(r"^trillm:listen_drops_total (\S+)$", metrics, re.M)
    assert drops is None or float(drops.group(1)) == 0.0
    completed = re.search(r'^trillm:http_requests_total\{endpoint="/v1/completions",status="200"\} (\S+)$', metrics,
                          re.M)
    assert completed is not None and float(completed.group(1)) == NUM_CLIENTS
