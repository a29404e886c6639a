"""Cold start on the GPU: the first request after /health turns 200 costs no more than 1.5x the same request later.

The server is the real command line (`python -m trillm serve api_server`) on a random-weight preset. The request
is the one that used to pay for lazy initialisation: an interactive turn of about 2,100 prompt tokens (longer than
the default 2,048-token prefill chunk, so it prefills in two chunks) and a few output tokens. Each request gets its
own text and session, so the prefix cache cannot make a later one cheaper than the first. The start-up time (process
start to /health 200) is printed for docs/perf.md.

Environment: TRILLM_COLD_START_MODEL (default random:llama2-7b), TRILLM_TEST_TOKENIZER (a tokenizer folder; random
presets otherwise use the default model's tokenizer, which needs the gguf package).
"""

from __future__ import annotations

import json
import os
import random
import statistics
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from served import ServedProcess

pytestmark = [pytest.mark.gpu, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
WORDS = ("alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india", "juliet", "kilo")


def _post(url: str, body: dict[str, object]) -> dict[str, object]:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as response:
        result: dict[str, object] = json.loads(response.read())
        return result


def _turn(url: str, session_id: int, seed: int) -> tuple[float, int]:
    rng = random.Random(seed)
    prompt = " ".join(f"{rng.choice(WORDS)} {rng.randrange(10_000)}" for _ in range(330))  # ~2,130 tokens (about 6.5 a pair)
    start = time.perf_counter()
    try:
        answer = _post(f"{url}/v1/chat/interactive", {"prompt": prompt, "session_id": session_id,
                                                   "interactive_mode": False, "request_output_len": 8,
                                                   "temperature": 0.0})  # fmt: skip
    except urllib.error.HTTPError as exc:
        raise AssertionError(f"HTTP {exc.code}: {exc.read().decode(errors='replace')}") from exc
    return time.perf_counter() - start, int(answer["input_tokens"])  # type: ignore[call-overload]


def test_first_request_after_health_is_as_fast_as_later_ones() -> None:
    model = os.environ.get("TRILLM_COLD_START_MODEL", "random:llama2-7b")
    flags = ["--dtype", "bfloat16", "--session-len", "4096", "--log-level", "warning"]
    if tokenizer := os.environ.get("TRILLM_TEST_TOKENIZER"):
        flags += ["--tokenizer", tokenizer]
    started = time.perf_counter()
    server = ServedProcess(model, *flags, cwd=ROOT)
    try:
        deadline = time.monotonic() + 300
        while True:
            try:
                with urllib.request.urlopen(f"{server.url}/health", timeout=5) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            assert server.process.poll() is None and time.monotonic() < deadline, "".join(server.output[-30:])
            time.sleep(0.05)
        startup_s = time.perf_counter() - started
        first, tokens = _turn(server.url, 1, seed=0)
        later = [_turn(server.url, 2 + i, seed=1 + i)[0] for i in range(4)]
        typical = statistics.median(later)
        print(f"cold start: {model} up in {startup_s:.1f} s; first {tokens}-token turn {first * 1e3:.0f} ms, "
              f"later median {typical * 1e3:.0f} ms ({first / typical:.2f}x)")  # fmt: skip
        assert tokens > 2048, tokens  # the turn spans two prefill chunks
        assert first <= 1.5 * typical, (first, later)
    finally:
        server.process.terminate()
        try:
            server.process.wait(timeout=30)
        except Exception:  # noqa: BLE001 - a server that ignores SIGTERM is killed
            server.stop()
