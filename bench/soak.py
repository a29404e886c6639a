"""Soak: mixed, abusive traffic against a trillm server for a bounded time, then the server must be whole.

    python -m bench.soak http://127.0.0.1:23333 --duration 60 --concurrency 16 --seed 0

Each worker loops until the duration is up, picking (from `--seed`) one of:

- a streamed chat or text completion, read to `[DONE]` — or, one time in four, cut off after a few chunks (the client
  disconnects mid-stream);
- an interactive session of two or three turns, sometimes cancelled mid-turn from a second connection, then ended;
- a bad request (invalid Unicode, wrong types, a limit passed, an unknown route or method), which must be a 4xx.

What must hold: no response is a 5xx, every stream that was read to its end has `[DONE]` and a finish_reason, no
error event comes from a surviving request, and once the load stops, `/metrics` shows the KV pool all free and no
request running (polled for `--settle` seconds: aborts free their blocks at the engine's next step). The script
prints a JSON summary and exits 1 if anything failed; `tests/test_soak.py` runs it against `trillm serve`.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
import time
from collections import Counter
from typing import Any

import httpx
import trio

# All zero once the server is idle: the KV pool is all free (usage 0 counts blocks of requests and of sessions).
GAUGES = ("num_requests_running", "num_requests_waiting", "num_sessions", "kv_cache_usage_perc",
          "session_kv_usage_perc")
KINDS = ("stream", "session", "bad")
BAD_BODIES: list[tuple[str, str, bytes]] = [  # (method, path, raw body)
    ("POST", "/v1/chat/completions", b'{"messages":[{"role":"user","content":"\\ud800"}],"max_tokens":1}'),
    ("POST", "/v1/completions", b'{"prompt":"x","logit_bias":{"\xc2\xb2":1}}'),
    ("POST", "/v1/completions", b'{"prompt":"x","n":100000}'),
    ("POST", "/v1/completions", b'{"prompt":"x","max_tokens":"5"}'),
    ("POST", "/v1/chat/interactive", b'{"prompt":"\\udfff"}'),
    ("POST", "/v1/encode", b'{"input":["\\ud83d"]}'),
    ("POST", "/v1/completions", b"{not json"),
    ("GET", "/v1/chat/completions", b""),
    ("POST", "/v1/nothing", b"{}"),
]


class Soak:
    """Shared counters of one run; every worker reports here."""

    def __init__(self, url: str, seed: int) -> None:
        self.url = url
        self.random = random.Random(seed)
        self.counts: Counter[str] = Counter()
        self.failures: list[str] = []

    def fail(self, what: str) -> None:
        self.counts["failures"] += 1
        if len(self.failures) < 10:
            self.failures.append(what[:300])

    def check_status(self, response: httpx.Response, what: str) -> None:
        if response.status_code >= 500:
            self.fail(f"{what}: {response.status_code} {response.text[:200]}")

    async def stream(self, client: httpx.AsyncClient, worker: random.Random) -> None:
        chat = worker.random() < 0.5
        path = "/v1/chat/completions" if chat else "/v1/completions"
        body: dict[str, Any] = {"stream": True, "max_tokens": worker.randint(1, 12), "temperature": 0.7}
        body.update({"messages": f"Tell me about {worker.random():.3f}"} if chat else {"prompt": "Once upon"})
        cut_after = worker.randint(1, 3) if worker.random() < 0.25 else None
        async with client.stream("POST", path, json=body) as response:
            self.check_status(response, path)
            if response.status_code != 200:
                await response.aread()
                return
            events = []
            async for line in response.aiter_lines():
                if line:
                    events.append(line)
                if cut_after is not None and len(events) >= cut_after:
                    self.counts["disconnects"] += 1
                    return  # leaving the context closes the connection mid-stream
        if not events or events[-1] != "data: [DONE]":
            self.fail(f"{path}: stream without [DONE]: {events[-2:]}")
        elif any('"error"' in event for event in events):
            self.fail(f"{path}: error event: {[e for e in events if 'error' in e][:1]}")
        elif not any('"finish_reason":"' in event for event in events):
            self.fail(f"{path}: no finish_reason")
        else:
            self.counts["streams"] += 1

    async def session(self, client: httpx.AsyncClient, worker: random.Random) -> None:
        first = await client.post("/v1/chat/interactive", json={"prompt": "Hi", "interactive_mode": True,
                                                                "request_output_len": 8})
        self.check_status(first, "interactive")
        if first.status_code != 200:
            return
        session_id = first.json()["session_id"]
        for _ in range(worker.randint(1, 2)):
            body = {"prompt": "And then?", "session_id": session_id, "interactive_mode": True,
                    "request_output_len": 16, "stream": True}
            if worker.random() < 0.3:  # cancel this turn from another connection while it streams
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._turn, client, body)
                    await trio.sleep(worker.random() * 0.2)
                    cancel = await client.post("/v1/chat/interactive", json={"prompt": "", "session_id": session_id,
                                                                             "cancel": True})
                    self.check_status(cancel, "cancel")
                    self.counts["cancels"] += 1
            else:
                await self._turn(client, body)
        end = await client.post("/v1/chat/interactive", json={"prompt": "", "session_id": session_id,
                                                              "request_output_len": 0, "interactive_mode": False})
        self.check_status(end, "end")
        self.counts["sessions"] += 1

    async def _turn(self, client: httpx.AsyncClient, body: dict[str, Any]) -> None:
        async with client.stream("POST", "/v1/chat/interactive", json=body) as response:
            self.check_status(response, "turn")
            lines = [json.loads(line) async for line in response.aiter_lines() if line]
        if response.status_code == 200 and (not lines or "error" in lines[-1] or lines[-1].get("finish_reason") is None):
            self.fail(f"turn: bad ending {lines[-1:]}")

    async def bad(self, client: httpx.AsyncClient, worker: random.Random) -> None:
        method, path, raw = worker.choice(BAD_BODIES)
        response = await client.request(method, path, content=raw, headers={"Content-Type": "application/json"})
        if not 400 <= response.status_code < 500:
            self.fail(f"bad request {method} {path} {raw[:40]!r}: {response.status_code}")
        self.counts["bad_requests"] += 1

    async def worker(self, deadline: float, seed: int, index: int) -> None:
        worker = random.Random(seed)
        kind = KINDS[index % len(KINDS)]  # the first action: every kind runs even in a short soak
        async with httpx.AsyncClient(base_url=self.url, timeout=120) as client:
            while time.monotonic() < deadline:
                try:
                    await getattr(self, kind)(client, worker)
                except httpx.TransportError as exc:
                    self.fail(f"{kind}: {type(exc).__name__}: {exc}")
                kind = worker.choices(KINDS, weights=(6, 2, 2))[0]

    async def settled(self, settle_s: float) -> dict[str, float]:
        """Poll /metrics until the KV pool is all free and nothing runs (or `settle_s` passes); the last values."""
        values: dict[str, float] = {}
        async with httpx.AsyncClient(base_url=self.url, timeout=30) as client:
            with trio.move_on_after(settle_s):
                while True:
                    text = (await client.get("/metrics")).text
                    for name in GAUGES:
                        found = re.search(rf"^trillm:{name}\{{[^}}]*\}} (\S+)$", text, re.M)
                        values[name] = float(found.group(1)) if found else -1.0
                    if all(value == 0 for value in values.values()):
                        break
                    await trio.sleep(0.2)
        return values


async def run(url: str, duration_s: float, concurrency: int, seed: int, settle_s: float) -> dict[str, Any]:
    soak = Soak(url, seed)
    start = time.monotonic()
    deadline = start + duration_s
    async with trio.open_nursery() as nursery:
        for index in range(concurrency):
            nursery.start_soon(soak.worker, deadline, seed * 1000 + index, index)
    load_s = time.monotonic() - start
    end = await soak.settled(settle_s)
    if any(value != 0 for value in end.values()):
        soak.fail(f"not settled (KV in use, requests or sessions left): {end}")
    return {"counts": dict(soak.counts), "end": end, "failures": soak.failures, "load_s": round(load_s, 2),
            "settle_s": round(time.monotonic() - start - load_s, 2)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("url")
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of load (default 60)")
    parser.add_argument("--concurrency", type=int, default=16, help="client workers (default 16)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--settle", type=float, default=30.0, help="seconds to wait for the server to be idle")
    args = parser.parse_args()
    result = trio.run(run, args.url, args.duration, args.concurrency, args.seed, args.settle)
    print(json.dumps(result, indent=2))
    return 1 if result["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
