"""The local cluster: N `trillm serve api_server` replicas behind HAProxy on one machine, started by one command.

    make cluster REPLICAS=2 ARGS="--max-batch-size 16"        # or:
    .venv/bin/python deploy/local/cluster.py --replicas 2 -- smollm2 --max-batch-size 16

Everything after `--` goes to every replica's `trillm serve api_server` (MODEL and flags; the replica's address
is set here). Replicas listen on 127.0.0.1, on ports from --first-replica-port; HAProxy listens on --host:--port
(default 0.0.0.0:23333) and routes as deploy/local/haproxy_config.py describes. The cluster is up once every
replica answers /health; it then prints `cluster: serving on URL`. SIGINT or SIGTERM stops it: the replicas drain
(requests in flight finish) while HAProxy stops accepting. A replica that dies is reported here and put in
maintenance in HAProxy for good (through its admin socket), so its sessions keep getting 410 even if a server
starts again on its port; the cluster stops when HAProxy or the last replica exits.

Logs and the generated haproxy.cfg go to --run-dir (default: a new temporary directory, printed at start).
Needs `haproxy` on PATH (Debian/Ubuntu: `apt-get install haproxy`; `make haproxy` does it).
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from haproxy_config import haproxy_config  # noqa: E402  (a script's sibling module)

REPLICA_HOST = "127.0.0.1"
POLL_S = 0.25


def _replica_command(template: str | None, serve_args: Sequence[str], index: int, port: int) -> list[str]:
    """The command of replica `index` (from 0): `trillm serve api_server ...` on REPLICA_HOST:port, or the
    template's, with {index}, {host} and {port} filled in."""
    if template:
        return [part.format(index=index, port=port, host=REPLICA_HOST) for part in shlex.split(template)]
    return [sys.executable, "-m", "trillm", "serve", "api_server", *serve_args,
            "--server-name", REPLICA_HOST, "--server-port", str(port)]


def _is_healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/health", timeout=2) as response:
            return bool(response.status == 200)
    except (urllib.error.URLError, OSError):
        return False


def _wait_healthy(names: Sequence[str], urls: Sequence[str], processes: Sequence[subprocess.Popen[bytes]],
                  timeout_s: float) -> None:
    """Return once every process answers /health at its URL with 200; raise if one exits or time runs out."""
    deadline = time.monotonic() + timeout_s
    waiting = set(range(len(urls)))
    while waiting:
        for index in sorted(waiting):
            if processes[index].poll() is not None:
                raise RuntimeError(f"{names[index]} exited with {processes[index].returncode} while starting")
            if _is_healthy(urls[index]):
                waiting.discard(index)
                print(f"cluster: {names[index]} ready at {urls[index]}", flush=True)
        if waiting and time.monotonic() > deadline:
            late = ", ".join(names[index] for index in sorted(waiting))
            raise TimeoutError(f"{late}: not ready after {timeout_s:.0f} s")
        time.sleep(POLL_S)


class Cluster:
    """The replica processes and HAProxy of one run; `stop()` drains them."""

    def __init__(self, args: argparse.Namespace, serve_args: Sequence[str]) -> None:
        self.run_dir = Path(args.run_dir or tempfile.mkdtemp(prefix="trillm-cluster-"))
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.ports = [args.first_replica_port + index for index in range(args.replicas)]
        self.urls = [f"http://{REPLICA_HOST}:{port}" for port in self.ports]
        self.replicas: list[subprocess.Popen[bytes]] = []
        self.haproxy: subprocess.Popen[bytes] | None = None
        self.admin_socket = self.run_dir / "haproxy.sock"
        self._args = args
        self._serve_args = serve_args

    def start(self) -> None:
        print(f"cluster: logs and haproxy.cfg in {self.run_dir}", flush=True)
        for index, port in enumerate(self.ports, start=1):
            command = _replica_command(self._args.replica_command, self._serve_args, index - 1, port)
            log = open(self.run_dir / f"replica-{index}.log", "wb")  # noqa: SIM115 (owned by the child)
            # A session of its own: Ctrl-C in the terminal reaches only this script, which then drains each
            # replica with one SIGTERM (a second signal would stop a replica at once).
            self.replicas.append(subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                                  start_new_session=True))
            print(f"cluster: replica {index} pid {self.replicas[-1].pid} port {port}: {shlex.join(command)}",
                  flush=True)
        names = [f"replica {index} (log: {self.run_dir}/replica-{index}.log)"
                 for index in range(1, len(self.ports) + 1)]
        _wait_healthy(names, self.urls, self.replicas, self._args.ready_timeout)
        listen = f"{self._args.host}:{self._args.port}"
        stats = f"{self._args.host}:{self._args.stats_port}" if self._args.stats_port else None
        config_path = self.run_dir / "haproxy.cfg"
        config_path.write_text(haproxy_config(listen, self.ports, replica_host=REPLICA_HOST, stats_listen=stats,
                                              admin_socket=str(self.admin_socket)))
        log = open(self.run_dir / "haproxy.log", "wb")  # noqa: SIM115 (owned by the child)
        self.haproxy = subprocess.Popen([self._args.haproxy, "-db", "-f", str(config_path)], stdout=log,
                                        stderr=subprocess.STDOUT, start_new_session=True)
        host = "127.0.0.1" if self._args.host == "0.0.0.0" else self._args.host
        front = f"http://{host}:{self._args.port}"
        _wait_healthy([f"HAProxy (log: {self.run_dir}/haproxy.log)"], [front], [self.haproxy], 30.0)
        print(f"cluster: serving on {front} ({len(self.ports)} replicas)"
              + (f"; HAProxy stats on http://{host}:{self._args.stats_port}/" if stats else ""), flush=True)

    def watch(self) -> int:
        """Report replicas that exit; return when HAProxy or the last replica has exited."""
        reported: set[int] = set()
        while self.haproxy is not None and self.haproxy.poll() is None:
            for index, process in enumerate(self.replicas, start=1):
                if process.poll() is not None and index not in reported:
                    reported.add(index)
                    self._retire(index)
                    print(f"cluster: replica {index} exited with {process.returncode}; HAProxy routes around it",
                          flush=True)
            if len(reported) == len(self.replicas):
                print("cluster: no replica left", flush=True)
                return 1
            time.sleep(POLL_S)
        print("cluster: HAProxy exited", flush=True)
        return 1

    def _retire(self, index: int) -> None:
        """Put replica `index` in maintenance for good: a process started again on its port is not sent requests,
        so the sessions bound to the dead replica keep getting 410 instead of starting afresh there."""
        for backend in ("stateless", "sessions"):
            try:
                with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as admin:
                    admin.settimeout(2.0)
                    admin.connect(str(self.admin_socket))
                    admin.sendall(f"disable server {backend}/r{index}\n".encode())
                    admin.recv(4096)
            except OSError as exc:
                print(f"cluster: could not take replica {index} out of {backend}: {exc}", flush=True)

    def stop(self) -> None:
        """Drain the replicas (SIGTERM) and soft-stop HAProxy (SIGUSR1); kill what outlives the grace period.

        A second SIGINT or SIGTERM while they drain kills them at once.
        """
        live = [process for process in self.replicas if process.poll() is None]
        for process in live:
            process.send_signal(signal.SIGTERM)
        if self.haproxy is not None and self.haproxy.poll() is None:
            self.haproxy.send_signal(signal.SIGUSR1)
            live.append(self.haproxy)
        deadline = time.monotonic() + self._args.graceful_timeout + 10
        try:
            for process in live:
                try:
                    process.wait(timeout=max(deadline - time.monotonic(), 0.1))
                except subprocess.TimeoutExpired:
                    process.kill()
        except KeyboardInterrupt:  # a second Ctrl-C or SIGTERM: stop at once
            print("cluster: second signal: killing what is left", flush=True)
        for process in live:
            if process.poll() is None:
                process.kill()
            process.wait()


def _interrupt(*_: object) -> None:
    """SIGTERM stops the cluster like Ctrl-C."""
    raise KeyboardInterrupt


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="N trillm replicas behind HAProxy on this machine (least-loaded routing, sticky sessions).",
        epilog="Arguments after `--` go to every replica's `trillm serve api_server` (MODEL and flags).")
    parser.add_argument("--replicas", type=int, default=2, help="number of replicas (default 2)")
    parser.add_argument("--host", default="0.0.0.0", help="address HAProxy listens on (default 0.0.0.0)")
    parser.add_argument("--port", type=int, default=23333, help="port HAProxy listens on (default 23333)")
    parser.add_argument("--first-replica-port", type=int, default=23401,
                        help="replica i listens on 127.0.0.1:(this + i - 1) (default 23401)")
    parser.add_argument("--stats-port", type=int, default=0, help="serve HAProxy's stats page here (default off)")
    parser.add_argument("--haproxy", default=shutil.which("haproxy") or "haproxy", help="the haproxy binary")
    parser.add_argument("--run-dir", help="where logs and haproxy.cfg go (default: a new temporary directory)")
    parser.add_argument("--ready-timeout", type=float, default=600.0,
                        help="seconds to wait for every replica's /health (default 600: first runs convert "
                             "or download the model)")
    parser.add_argument("--graceful-timeout", type=float, default=30.0,
                        help="seconds the replicas get to drain at stop (match the replicas' own flag; default 30)")
    parser.add_argument("--replica-command", metavar="TEMPLATE",
                        help="run this instead of `trillm serve api_server ARGS`: {port}, {host} and {index} (the "
                             "replica's number from 0, e.g. for CUDA_VISIBLE_DEVICES={index}) are filled in")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    serve_args: list[str] = []
    if "--" in argv:
        split = argv.index("--")
        argv, serve_args = argv[:split], argv[split + 1:]
    args = _parser().parse_args(argv)
    if args.replicas < 1:
        raise SystemExit("--replicas must be at least 1")
    if shutil.which(args.haproxy) is None:
        raise SystemExit(f"{args.haproxy!r} not found: install HAProxy (`make haproxy`, or apt-get install haproxy)")
    cluster = Cluster(args, serve_args)
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        cluster.start()
        return cluster.watch()
    except KeyboardInterrupt:
        print("cluster: stopping (replicas drain)", flush=True)
        return 0
    finally:
        cluster.stop()
        print("cluster: stopped", flush=True)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
