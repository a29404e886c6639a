"""Hypercorn settings for serving `trillm.http.app:app` with hypercorn's own command line.

    TRILLM_MODEL=... hypercorn --worker-class trio --config python:trillm.http.hypercorn_config trillm.http.app:app

The plain `hypercorn --worker-class trio trillm.http.app:app` works too (rank processes are plain subprocesses, which
hypercorn's daemonic workers may start); this module adds what hypercorn's own defaults lack, the same settings
`trillm serve api_server` uses (`trillm.http.listening`): the bind address from TRILLM_SERVER_NAME /
TRILLM_SERVER_PORT (hypercorn's own --bind still wins), a listen backlog for thousands of clients
(TRILLM_BACKLOG), a keep-alive timeout longer than clients' pools (TRILLM_KEEP_ALIVE_TIMEOUT_S), in-flight requests
given TRILLM_GRACEFUL_TIMEOUT_S on shutdown, and the open-file limit raised. Every other setting of the app is read
from TRILLM_* variables by `trillm.http.app` itself.

Hypercorn copies every name of this module that is not a module or a dunder onto its Config; the `_` helpers land
there unused.
"""

from __future__ import annotations

import trillm.config as _config
import trillm.http.listening as _listening

_server = _config.server_config_from_env()
_settings = _listening.hypercorn_settings(_server)
_listening.raise_open_file_limit()

worker_class = "trio"
daemon = False  # ranks start either way; a non-daemonic worker also survives its parent's quick exit
bind = _settings.bind
backlog = _settings.backlog
keep_alive_timeout = _settings.keep_alive_timeout
graceful_timeout = _settings.graceful_timeout
