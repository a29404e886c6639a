"""Hypercorn settings for serving `trillm.http.app:app` with hypercorn's own command line.

    TRILLM_MODEL=... hypercorn --worker-class trio --config python:trillm.http.hypercorn_config trillm.http.app:app

The plain `hypercorn --worker-class trio trillm.http.app:app` works too (rank processes are plain subprocesses, which
hypercorn's daemonic workers may start); this module adds what hypercorn's own defaults lack. The bind
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
daemon = False  # ranks start either way; a non-daemonic worker also survives its parent's quick exit
bind = [f"{_host}:{_server.server_port}"]
graceful_timeout = _server.graceful_timeout_s
