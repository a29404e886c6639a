"""A fake OpenAI streaming server that answers at once: the test double of bench/serve.py and its speed check.

The server is a raw asyncio TCP server that speaks just enough HTTP/1.1 (keep-alive, chunked responses) for
`GET /v1/models`, and streamed `POST /v1/completions` and `/v1/chat/completions`: each request gets `max_tokens`
content chunks of one token each (chat opens with a role-only chunk, as vLLM does), then a usage chunk and
`data: [DONE]`. `FakeBehaviour` scripts failures (HTTP 500, a connection closed mid-stream, an error event) per
request in arrival order, and the server counts requests and the most streams open at once.

`python -m bench.fake_openai --time-client` measures the client's own cost: it starts this server in a child process
(pinned to another core where there is one), runs bench/serve.py's client against it in one process on one core,
and prints the content chunks per second the client read, in two shapes of traffic:

- stepped: every stream gets one chunk per turn of the server's event loop, one send each, the way a batched decode
  step feeds many streams (the client mostly reads one chunk per socket read: its per-read cost);
- burst: each response is written in one send (the client parses many chunks per read: its per-chunk cost).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from typing import Any

import attrs

log = logging.getLogger(__name__)

MODES = ("ok", "http500", "drop", "error_event")
SERVER_CPU = 1  # the child server's core in --time-client; the client keeps core 0


@attrs.frozen(kw_only=True)
class FakeBehaviour:
    """How the fake server answers: `modes` is cycled over requests in arrival order (see MODES)."""

    modes: tuple[str, ...] = ("ok",)
    model_id: str = "fake-model"
    is_usage: bool = True  # send the usage chunk
    cached_tokens: int | None = None  # usage.prompt_tokens_details.cached_tokens, when set
    chunk_delay_s: float = 0.0  # sleep between chunks (0: just yield to the event loop)
    is_burst: bool = False  # write each response in one send; a request may ask with "fake_burst": true


def _chunked(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def _sse(event: dict[str, Any]) -> bytes:
    return _chunked(b"data: " + json.dumps(event, separators=(",", ":")).encode() + b"\n\n")


def _response_head(status: str, content_type: str, length: int | None) -> bytes:
    framing = f"Content-Length: {length}" if length is not None else "Transfer-Encoding: chunked"
    return f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\n{framing}\r\n\r\n".encode()


def _content_event(is_chat: bool, text: str, finish: str | None) -> dict[str, Any]:
    choice: dict[str, Any] = {"index": 0, "finish_reason": finish}
    choice.update({"delta": {"content": text}} if is_chat else {"text": text})
    return {"id": "fake-1", "object": "chat.completion.chunk" if is_chat else "text_completion", "created": 0,
            "model": "fake-model", "choices": [choice]}


class FakeServer:
    """Answers each connection's requests in turn; counts requests, open streams and the most open at once."""

    def __init__(self, behaviour: FakeBehaviour) -> None:
        self.behaviour = behaviour
        self.num_requests = 0
        self.num_streams_open = 0
        self.max_streams_open = 0
        self.bodies: list[dict[str, Any]] = []  # every POST body, in arrival order
        self._connections: dict[asyncio.StreamWriter, asyncio.Task[Any]] = {}

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._connections[writer] = task
        try:
            while await self._one_request(reader, writer):
                pass
        except (asyncio.IncompleteReadError, ConnectionError):
            pass  # the client went away
        finally:
            del self._connections[writer]
            writer.close()

    async def close_connections(self) -> None:
        """Close every connection and wait for its handler (Python 3.11's server close leaves them running)."""
        tasks = list(self._connections.values())
        for writer in list(self._connections):
            writer.close()  # the handler's next read sees EOF and returns
        if tasks:
            await asyncio.wait(tasks, timeout=5)

    async def _one_request(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        """Answer one request; False when the connection is done."""
        head = await reader.readuntil(b"\r\n\r\n")
        request_line, *header_lines = head.decode("latin-1").split("\r\n")
        method, path, _ = request_line.split(" ", 2)
        headers = dict((k.strip().lower(), v.strip()) for k, _, v in (h.partition(":") for h in header_lines if h))
        body = await reader.readexactly(int(headers.get("content-length", "0")))
        if method == "GET" and path == "/v1/models":
            data = json.dumps({"object": "list", "data": [{"id": self.behaviour.model_id, "object": "model"}]})
            writer.write(_response_head("200 OK", "application/json", len(data)) + data.encode())
            return True
        if method != "POST" or path not in ("/v1/completions", "/v1/chat/completions"):
            writer.write(_response_head("404 Not Found", "text/plain", 9) + b"not found")
            return True
        request = json.loads(body)
        self.bodies.append(request)
        mode = self.behaviour.modes[self.num_requests % len(self.behaviour.modes)]
        self.num_requests += 1
        if mode == "http500":
            error = b'{"error":{"message":"fake overload","type":"InternalServerError","code":500}}'
            writer.write(_response_head("500 Internal Server Error", "application/json", len(error)) + error)
            return True
        self.num_streams_open += 1
        self.max_streams_open = max(self.max_streams_open, self.num_streams_open)
        try:
            return await self._stream(writer, request, path.endswith("chat/completions"), mode)
        finally:
            self.num_streams_open -= 1

    async def _stream(self, writer: asyncio.StreamWriter, request: dict[str, Any], is_chat: bool, mode: str) -> bool:
        num_tokens = int(request.get("max_tokens") or 16)
        is_burst = self.behaviour.is_burst or bool(request.get("fake_burst"))
        parts = [_response_head("200 OK", "text/event-stream", None)]
        if is_chat:  # a role-only first chunk with empty content: not a token, so not the TTFT
            parts.append(_sse({"object": "chat.completion.chunk", "choices": [
                {"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]}))
        token, last = _sse(_content_event(is_chat, " tok", None)), _sse(_content_event(is_chat, " tok", "length"))
        for i in range(num_tokens):
            parts.append(last if i == num_tokens - 1 else token)
            if mode == "drop" and i == num_tokens // 2:
                writer.write(b"".join(parts))
                await writer.drain()
                return False  # close mid-stream: the chunked body never ends
            if mode == "error_event" and i == 0:
                parts.append(_sse({"error": {"message": "fake engine failure", "type": "InternalServerError"}}))
                break
            if not is_burst:
                writer.write(b"".join(parts))
                parts.clear()
                await asyncio.sleep(self.behaviour.chunk_delay_s)
        parts.append(self._usage(request, is_chat, num_tokens))
        parts.append(_chunked(b"data: [DONE]\n\n") + b"0\r\n\r\n")
        writer.write(b"".join(parts))
        await writer.drain()
        return True

    def _usage(self, request: dict[str, Any], is_chat: bool, num_tokens: int) -> bytes:
        if not self.behaviour.is_usage:
            return b""
        prompt: Any = request["messages"][0]["content"].split() if is_chat else request["prompt"]
        usage: dict[str, Any] = {"prompt_tokens": len(prompt), "completion_tokens": num_tokens,
                                 "total_tokens": len(prompt) + num_tokens}
        if self.behaviour.cached_tokens is not None:
            usage["prompt_tokens_details"] = {"cached_tokens": self.behaviour.cached_tokens}
        return _sse({"object": "chat.completion.chunk" if is_chat else "text_completion", "choices": [],
                     "usage": usage})


@contextlib.asynccontextmanager
async def open_fake_server(behaviour: FakeBehaviour, port: int = 0) -> AsyncIterator[tuple[FakeServer, str]]:
    """Serve on 127.0.0.1 (`port` 0: a free one) for the block; yields the server and its base URL."""
    fake = FakeServer(behaviour)
    server = await asyncio.start_server(fake.handle, "127.0.0.1", port)
    async with server:
        try:
            yield fake, f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
        finally:
            server.close()
            await fake.close_connections()


# --------------------------------------------------------------------------------------------------------------------
# --time-client: the client's chunk throughput against a server in another process


async def _serve_forever(port: int) -> None:
    async with open_fake_server(FakeBehaviour(), port) as (_, url):
        print(url, flush=True)  # the parent reads the URL from the first line
        await asyncio.Event().wait()


def _pin(cpu: int) -> None:
    with contextlib.suppress(AttributeError, OSError):
        if len(os.sched_getaffinity(0)) > 1:
            os.sched_setaffinity(0, {cpu})


def time_client(num_streams: int, output_len: int) -> list[tuple[str, int, float]]:
    """(shape, content chunks, seconds) of the bench/serve.py client against a fake server in a child process."""
    from bench.serve import BenchConfig, run_benchmark, summarize

    child = subprocess.Popen([sys.executable, "-m", "bench.fake_openai", "--serve", "--pin-cpu", str(SERVER_CPU)],
                             stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None
        url = child.stdout.readline().strip()
        _pin(0)
        rows = []
        for shape, extra in (("stepped", {}), ("burst", {"fake_burst": True})):
            config = BenchConfig(base_url=url, dataset="random", input_len=16, output_len=output_len,
                                 num_prompts=num_streams, extra_body=extra, is_save=False, is_progress=False)
            figures = summarize(asyncio.run(run_benchmark(config)))
            assert figures["failed"] == 0, figures["errors"]
            rows.append((shape, figures["total_content_chunks"], figures["duration_s"]))
        return rows
    finally:
        child.terminate()
        child.wait(timeout=10)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.fake_openai", description=__doc__.split("\n\n")[0])
    parser.add_argument("--serve", action="store_true", help="serve until killed; print the base URL first")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--pin-cpu", type=int, help="--serve: run on this core")
    parser.add_argument("--time-client", action="store_true", help="measure bench/serve.py's chunks per second")
    parser.add_argument("--streams", type=int, default=64, help="--time-client: concurrent streams")
    parser.add_argument("--output-len", type=int, default=2000, help="--time-client: chunks per stream")
    args = parser.parse_args()
    if args.serve:
        if args.pin_cpu is not None:
            _pin(args.pin_cpu)
        asyncio.run(_serve_forever(args.port))
    elif args.time_client:
        rows = time_client(args.streams, args.output_len)
        print(f"{'traffic':<10}{'chunks':>10}{'seconds':>10}{'chunks/s':>12}")
        for shape, chunks, seconds in rows:
            print(f"{shape:<10}{chunks:>10}{seconds:>10.2f}{chunks / seconds:>12,.0f}")
        shape, chunks, seconds = rows[0]
        print(f"client chunk read, {args.streams} streams x {args.output_len} chunks, {shape}: {chunks} tokens, "
              f"{seconds:.2f} s, {chunks / seconds:.0f} tok/s")
    else:
        parser.error("give --serve or --time-client")


if __name__ == "__main__":
    main()
