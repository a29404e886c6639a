"""A trillm replica on the FakeEngine: `python -m tests.deploy.fake_replica --port N`, for the local cluster tests.

The real app (routes, validation, /health, /metrics) served by hypercorn over `tests/http/http_fakes.FakeEngine`,
which keeps interactive sessions' history and counts computed prompt tokens: a cheap stand-in for
`trillm serve api_server` as a replica of deploy/local/cluster.py (its `--replica-command`). SIGTERM drains like
the real server: /health turns 503 and new requests get 503 while those in flight finish.
"""

from __future__ import annotations

import argparse
import signal
from functools import partial

import hypercorn.config
import hypercorn.trio
import trio

from tests.http.http_fakes import FakeEngine
from tests.http.http_live import server_config
from trillm.http.app import create_app


async def _drain_on_signal(state: object, engine: FakeEngine) -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for _ in signals:
            engine.drain()
            await trio.sleep(0.5)  # the fake's requests finish within milliseconds
            return


async def _serve(port: int, step_s: float) -> None:
    engine = FakeEngine(step_s=step_s, max_model_len=4096, num_total_blocks=4096)
    app = create_app(server_config(), engine=engine)
    config = hypercorn.config.Config()
    config.bind = [f"127.0.0.1:{port}"]
    config.accesslog = None
    config.graceful_timeout = 1.0
    await hypercorn.trio.serve(app, config, shutdown_trigger=partial(_drain_on_signal, app, engine))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--step-s", type=float, default=0.002, help="seconds per fake decode step")
    args = parser.parse_args()
    print(f"fake replica: serving on http://127.0.0.1:{args.port}", flush=True)
    trio.run(_serve, args.port, args.step_s)


if __name__ == "__main__":
    main()
