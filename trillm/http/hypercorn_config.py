"""Hypercorn settings for serving `trillm.http.app:app` with hypercorn's own command line.

    TRILLM_MODEL=... hypercorn --worker-class trio --config python:trillm.http.hypercorn_config trillm.http.app:app

Hypercorn's CLI runs the app in worker processes that are daemonic by default, and a daemonic process may not start
children; the Engine starts one rank process per tensor-parallel rank, so `daemon = False` is required. The bind
address comes from TRILLM_SERVER_NAME / TRILLM_SERVER_PORT (the same names as `trillm serve api_server`'s flags;
hypercorn's own --bind still wins), and in-flight requests get TRILLM_GRACEFUL_TIMEOUT_S on shutdown. Every other
setting of the app is read from TRILLM_* variables by `trillm.http.app` itself.

Hypercorn copies every name of this module that is not a module or a dunder onto its Config; the `_` helpers land
there unused.
"""

from __future__ import annotations

import trillm.config as _config

_server = _config.server_config_from_env()
_host = f"[{_server.server_name}]" if ":" in _server.server_name else _server.server_name

worker_class = "trio"
daemon = False  # the Engine spawns rank processes: a daemonic worker cannot
bind = [f"{_host}:{_server.server_port}"]
graceful_timeout = _server.graceful_timeout_s
