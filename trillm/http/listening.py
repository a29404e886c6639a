"""Listening: how the server takes connections — hypercorn's settings for LLM streams, and the kernel's drop count.

Thousands of clients may connect at once (a benchmark's burst, a batch job, a load balancer's reconnects). Three
settings decide whether they all get in:

- `backlog` (`--backlog`, default 4096): the kernel queues connections the event loop has not accepted yet. Hypercorn's
  default of 100 overflowed with 1,000 clients connecting at once, and the kernel then drops handshakes: 20-50 % of
  those clients saw their connection closed (`ReadError`) with nothing in the server's log. The kernel caps the
  value at `net.core.somaxconn`.
- open files: every connection is a file descriptor. The server raises its soft `RLIMIT_NOFILE` to the hard limit at
  start-up, so accepting does not stall on EMFILE.
- `keep_alive_timeout` (`--keep-alive-timeout`, default 75 s): an idle keep-alive connection is closed by whichever
  side's timer runs out first. If the server's ran out first (hypercorn's default is 5 s, the same as httpx's and the
  OpenAI SDK's pool expiry), a client could reuse a connection at the moment the server closes it and see a reset. A
  server timeout longer than the clients' pool expiry leaves the closing to the clients.

There is no read timeout: during a long stream the client sends nothing, and a read timeout would cut the stream.

Drops the server cannot see itself (a full accept queue) are counted by the kernel, per network namespace, in
`/proc/net/netstat` (TcpExt ListenOverflows / ListenDrops). `ListenQueueWatch` reads them every few seconds, logs a
warning when they grew, and /metrics exports the growth since start-up (`trillm:listen_drops`).
"""

from __future__ import annotations

import errno
import logging
import resource
import socket
from pathlib import Path

import hypercorn.config
import trio

from trillm.config import ServerConfig

log = logging.getLogger(__name__)

NETSTAT = Path("/proc/net/netstat")
WATCH_INTERVAL_S = 5.0


def bind_host(server_name: str) -> str:
    """The host part of a bind address (IPv6 addresses in brackets)."""
    return f"[{server_name}]" if ":" in server_name else server_name


def hypercorn_settings(config: ServerConfig) -> hypercorn.config.Config:
    """Hypercorn's Config for `config`: bind, backlog, keep-alive and shutdown grace (module docstring says why)."""
    settings = hypercorn.config.Config()
    settings.bind = [f"{bind_host(config.server_name)}:{config.server_port}"]
    settings.backlog = config.backlog
    settings.keep_alive_timeout = config.keep_alive_timeout_s
    settings.graceful_timeout = config.graceful_timeout_s
    settings.accesslog = None  # every request already leaves one log line (http/app.py)
    # Hypercorn's own handler on "hypercorn.error" also propagated to the root logger: every line ("Running on")
    # came out twice. Given a Logger, hypercorn uses it as it is, through the handlers logging was configured with.
    settings.errorlog = logging.getLogger("hypercorn.error")
    return settings


def check_port_free(server_name: str, port: int) -> None:
    """Fail at once if the address is taken, before the model loads (hypercorn would say so only after it).

    Raises:
        OSError: the port is in use (or the address cannot be bound); the message names both and what to do.
    """
    family = socket.AF_INET6 if ":" in server_name else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as hypercorn binds: TIME_WAIT is no conflict
        try:
            probe.bind((server_name, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise OSError(exc.errno, f"port {port} on {server_name} is already in use: stop the server that "
                                         f"holds it, or choose another with --server-port") from None
            raise OSError(exc.errno, f"cannot listen on {server_name}:{port}: {exc.strerror}; check --server-name "
                                     "and --server-port") from None


def raise_open_file_limit() -> int:
    """Raise this process's soft limit of open files to its hard limit; returns the limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError) as exc:  # e.g. an unlimited hard limit the kernel refuses as a soft one
            log.warning("could not raise the open-file limit from %d to %d: %s", soft, hard, exc)
    return soft


def read_listen_drops(path: Path = NETSTAT) -> int | None:
    """The kernel's count of connections dropped at a full listen queue (ListenDrops, else ListenOverflows)."""
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return None
    for names, values in zip(lines[::2], lines[1::2]):
        if not names.startswith("TcpExt:"):
            continue
        fields = dict(zip(names.split()[1:], values.split()[1:]))
        for name in ("ListenDrops", "ListenOverflows"):
            if name in fields:
                return int(fields[name])
    return None


class ListenQueueWatch:
    """Counts connections the kernel dropped since start-up (this network namespace) and logs when it grows."""

    def __init__(self, backlog: int, path: Path = NETSTAT) -> None:
        self._backlog = backlog
        self._path = path
        self._start = read_listen_drops(path)
        self._last = self._start
        self._scope = trio.CancelScope()

    @property
    def num_dropped(self) -> int | None:
        """Drops since start-up as of the last check; None where the kernel does not report them."""
        if self._start is None or self._last is None:
            return None
        return self._last - self._start

    def check(self) -> None:
        current = read_listen_drops(self._path)
        if current is None or self._last is None:
            return
        if current > self._last:
            log.warning(
                "the kernel dropped %d connection(s) at a full listen queue (backlog %d): raise --backlog "
                "(and net.core.somaxconn), or add replicas",
                current - self._last, self._backlog,
            )
        self._last = current

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Check every WATCH_INTERVAL_S until `stop` (runs in the app's nursery, which waits for it at shutdown)."""
        with self._scope:
            task_status.started()
            while True:
                await trio.sleep(WATCH_INTERVAL_S)
                self.check()

    def stop(self) -> None:
        self._scope.cancel()
