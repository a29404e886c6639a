"""The local cluster (deploy/local/cluster.py): two replicas behind HAProxy, on loopback, with the FakeEngine.

One cluster for the module; its tests run in order: sessions keep their history on their replica, stateless
requests spread over both replicas, then one replica is killed mid-run: stateless requests keep succeeding and that
replica's sessions get a clear error, never a new empty session elsewhere. The replicas are the real app over
tests/http/http_fakes.FakeEngine (tests/deploy/fake_replica.py), which keeps session history and counts the
prompt tokens it computes, so each replica's /metrics shows what it prefilled.
"""

from __future__ import annotations

import os
import random
import re
import signal
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from deploy_files import ROOT

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("haproxy") is None,
                       reason="haproxy not installed (`make haproxy`: apt-get install haproxy)"),
]

NUM_SESSIONS = 20
NUM_TURNS = 3
NUM_STATELESS = 200
HEADER_SESSION_ID = 501
EDGE_SESSION_IDS = (2**31 - 2, 2**31 - 1)
ALL_SESSION_IDS = (*range(1, NUM_SESSIONS + 1), HEADER_SESSION_ID, *EDGE_SESSION_IDS)  # every session the tests open
READY_TIMEOUT_S = 60.0


def free_port_pair() -> int:
    """A port p with p and p + 1 both free on loopback (the replicas' ports)."""
    for _ in range(100):
        base = random.randrange(30000, 60000)
        try:
            with socket.socket() as one, socket.socket() as two:
                one.bind(("127.0.0.1", base))
                two.bind(("127.0.0.1", base + 1))
            return base
        except OSError:
            continue
    raise RuntimeError("no free port pair")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class RunningCluster:
    """`python deploy/local/cluster.py` in a child process; `output` collects its lines."""

    def __init__(self, tmp_path: Path) -> None:
        self.port = free_port()
        self.replica_ports = [free_port_pair()]
        self.replica_ports.append(self.replica_ports[0] + 1)
        self.url = f"http://127.0.0.1:{self.port}"
        self.output: list[str] = []
        self.replica_pids: dict[int, int] = {}
        self._ready = threading.Event()
        command = [sys.executable, "deploy/local/cluster.py", "--replicas", "2", "--host", "127.0.0.1",
                   "--port", str(self.port), "--first-replica-port", str(self.replica_ports[0]),
                   "--run-dir", str(tmp_path), "--ready-timeout", str(READY_TIMEOUT_S), "--graceful-timeout", "5",
                   "--replica-command", f"{sys.executable} -m tests.deploy.fake_replica --port {{port}} --step-s 0.004"]
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        self.process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                        stderr=subprocess.STDOUT, text=True)
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.output.append(line)
            pid = re.match(r"cluster: replica (\d+) pid (\d+)", line)
            if pid:
                self.replica_pids[int(pid.group(1))] = int(pid.group(2))
            if line.startswith("cluster: serving on"):
                self._ready.set()

    def wait_ready(self) -> None:
        assert self._ready.wait(READY_TIMEOUT_S + 30), "".join(self.output)

    def replica_metrics(self, index: int) -> dict[str, Any]:
        """{metric name: {labels tuple: value}} of replica `index` (1-based), scraped directly."""
        text = httpx.get(f"http://127.0.0.1:{self.replica_ports[index - 1]}/metrics", timeout=10).text
        metrics: dict[str, Any] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                metrics.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
        return metrics

    def replica_metrics_or_none(self, index: int) -> dict[str, Any] | None:
        try:
            return self.replica_metrics(index)
        except httpx.HTTPError:
            return None

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                return self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
        return self.process.wait()


def one_value(metrics: dict[str, Any], name: str) -> float:
    return float(sum(metrics.get(name, {}).values()))


def completions_200(metrics: dict[str, Any]) -> float:
    """Completions this replica answered with 200."""
    return sum(float(value) for labels, value in metrics.get("trillm:http_requests_total", {}).items()
               if ("status", "200") in labels and ("endpoint", "/v1/completions") in labels)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningCluster]:
    running = RunningCluster(tmp_path_factory.mktemp("cluster"))
    try:
        running.wait_ready()
        yield running
    finally:
        running.stop()


def turn(client: httpx.Client, session_id: int, prompt: str, **extra: Any) -> httpx.Response:
    return client.post("/v1/chat/interactive", json={"prompt": prompt, "session_id": session_id,
                                                     "interactive_mode": True, "request_output_len": 4, **extra})


def completion(client: httpx.Client, index: int) -> httpx.Response:
    return client.post("/v1/completions", json={"model": "fake-model", "prompt": f"request {index}",
                                                "max_tokens": 4})


def completion_status(client: httpx.Client, index: int) -> int:
    """The status of one completion, 0 when the connection broke mid-answer."""
    try:
        return completion(client, index).status_code
    except httpx.RemoteProtocolError:
        return 0


def run_session(url: str, session_id: int) -> list[dict[str, Any]]:
    """Three turns of one session, one after the other; the answers."""
    answers = []
    with httpx.Client(base_url=url, timeout=30) as client:
        for index in range(NUM_TURNS):
            response = turn(client, session_id, f"turn {index} of session {session_id}")
            assert response.status_code == 200, response.text
            answers.append(response.json())
    return answers


def test_sessions_keep_their_history_on_one_replica(cluster: RunningCluster) -> None:
    with ThreadPoolExecutor(NUM_SESSIONS) as pool:
        sessions = list(pool.map(lambda sid: run_session(cluster.url, sid), range(1, NUM_SESSIONS + 1)))
    new_tokens = 0
    for answers in sessions:
        history = 0
        for answer in answers:
            assert answer["history_tokens"] == history  # the replica holds every earlier turn
            history += answer["input_tokens"] + answer["tokens"]
            new_tokens += answer["input_tokens"]
    replicas = [cluster.replica_metrics(index) for index in (1, 2)]
    # Each session lives on exactly one replica (a session split over two would count twice) ...
    assert sum(one_value(m, "trillm:num_sessions") for m in replicas) == NUM_SESSIONS
    assert all(one_value(m, "trillm:num_sessions") > 0 for m in replicas)  # ... and both replicas got sessions
    # ... and each turn prefilled only its new tokens: the history came from the replica's own session.
    assert sum(one_value(m, "trillm:computed_prompt_tokens_total") for m in replicas) == new_tokens
    assert sum(one_value(m, "trillm:cached_prompt_tokens_total") for m in replicas) > 0


def test_the_session_header_routes_like_the_body_field(cluster: RunningCluster) -> None:
    with httpx.Client(base_url=cluster.url, timeout=30) as client:
        header = {"x-session-id": str(HEADER_SESSION_ID)}
        first = client.post("/v1/chat/interactive", headers=header,
                            json={"prompt": "hello", "session_id": HEADER_SESSION_ID, "interactive_mode": True,
                                  "request_output_len": 4})
        for _ in range(3):  # with the header, the balancer reads no body
            later = client.post("/v1/chat/interactive", headers=header,
                                json={"prompt": "again", "session_id": HEADER_SESSION_ID, "interactive_mode": True,
                                      "request_output_len": 4})
            assert later.status_code == 200 and later.json()["history_tokens"] > 0
    assert first.status_code == 200 and first.json()["history_tokens"] == 0


def test_ids_next_to_each_other_below_two_to_the_31_are_distinct_sessions(cluster: RunningCluster) -> None:
    with httpx.Client(base_url=cluster.url, timeout=30) as client:
        for sid in EDGE_SESSION_IDS:  # exact 64-bit ids: no rounding merges them into one table entry
            assert turn(client, sid, "first").json()["history_tokens"] == 0
            assert turn(client, sid, "second").json()["history_tokens"] > 0


@pytest.mark.parametrize(("session_id", "interactive_mode"), [(-1, True), (2**31, True), (2**31 + 7, False)])
def test_ids_the_balancer_cannot_route_are_refused(cluster: RunningCluster, session_id: int,
                                                   interactive_mode: bool) -> None:
    with httpx.Client(base_url=cluster.url, timeout=30) as client:
        response = turn(client, session_id, "hello", interactive_mode=interactive_mode)
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "session_id_not_routable"


def test_a_one_off_turn_with_a_server_picked_id_is_served(cluster: RunningCluster) -> None:
    with httpx.Client(base_url=cluster.url, timeout=30) as client:
        response = turn(client, -1, "just once", interactive_mode=False)
    assert response.status_code == 200 and response.json()["tokens"] > 0


def test_stateless_requests_spread_over_both_replicas(cluster: RunningCluster) -> None:
    before = [completions_200(cluster.replica_metrics(index)) for index in (1, 2)]
    with httpx.Client(base_url=cluster.url, timeout=30) as client, ThreadPoolExecutor(16) as pool:
        statuses = list(pool.map(lambda i: completion(client, i).status_code, range(NUM_STATELESS)))
    assert statuses == [200] * NUM_STATELESS
    served = [completions_200(cluster.replica_metrics(index)) - before[index - 1] for index in (1, 2)]
    assert sum(served) == NUM_STATELESS
    assert min(served) >= NUM_STATELESS // 5, served  # least-connections, 16 at a time: no replica left idle


def test_a_killed_replica_fails_only_its_sessions_and_loudly(cluster: RunningCluster) -> None:
    on_replica_1 = one_value(cluster.replica_metrics(1), "trillm:num_sessions")
    assert on_replica_1 > 0
    statuses: list[int] = []
    with httpx.Client(base_url=cluster.url, timeout=30) as client, ThreadPoolExecutor(16) as pool:
        load = pool.map(lambda i: completion_status(client, i), range(NUM_STATELESS))
        time.sleep(0.2)  # requests are in flight on both replicas
        os.kill(cluster.replica_pids[1], signal.SIGKILL)
        statuses = list(load)
        # Retried on replica 2 when replica 1 vanished; only a request whose answer replica 1 had begun to send
        # when it died can be lost (a balancer cannot retry a response it has started to forward): 0 here.
        assert set(statuses) <= {200, 0} and statuses.count(0) <= 2, statuses
        answers = {sid: turn(client, sid, "one more turn") for sid in ALL_SESSION_IDS}
    gone = {sid: r for sid, r in answers.items() if r.status_code != 200}
    assert len(gone) == on_replica_1  # exactly replica 1's sessions
    for response in gone.values():
        assert response.status_code in (410, 503), response.text
        assert response.json()["error"]["code"] == "session_replica_gone"
    for sid, response in answers.items():
        if sid not in gone:
            assert response.json()["history_tokens"] > 0  # replica 2's sessions go on, history intact
    assert any("replica 1 exited" in line for line in cluster.output) or cluster.process.poll() is None


@pytest.mark.parametrize("num_replicas", [1, 3])
def test_haproxy_accepts_the_generated_configuration(num_replicas: int, tmp_path: Path) -> None:
    sys.path.insert(0, str(ROOT / "deploy/local"))
    try:
        from haproxy_config import haproxy_config
    finally:
        sys.path.pop(0)
    ports = list(range(40001, 40001 + num_replicas))
    config = haproxy_config("127.0.0.1:40000", ports, stats_listen="127.0.0.1:40100")
    assert config.count("use-server r") == num_replicas
    path = tmp_path / "haproxy.cfg"
    path.write_text(config)
    checked = subprocess.run(["haproxy", "-c", "-f", str(path)], capture_output=True, text=True, timeout=30)
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_a_server_started_again_on_a_dead_replicas_port_gets_no_traffic(cluster: RunningCluster) -> None:
    port = cluster.replica_ports[0]
    restarted = subprocess.Popen([sys.executable, "-m", "tests.deploy.fake_replica", "--port", str(port)],
                                 cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while not cluster.replica_metrics_or_none(1) and time.monotonic() < deadline:
            time.sleep(0.2)
        time.sleep(2.5)  # more than HAProxy needs to bring a server back (one health check a second)
        with httpx.Client(base_url=cluster.url, timeout=30) as client:
            answers = [turn(client, sid, "still there?") for sid in ALL_SESSION_IDS]
            statuses = [completion(client, i).status_code for i in range(20)]
        assert statuses == [200] * 20
        assert completions_200(cluster.replica_metrics(1)) == 0  # the new server on the port got none of them
        assert all(r.status_code == 200 and r.json()["history_tokens"] > 0 for r in answers
                   if r.status_code != 410), [r.text for r in answers]
        assert sum(r.status_code == 410 for r in answers) > 0  # the dead replica's sessions: still 410
    finally:
        restarted.kill()
        restarted.wait()


def test_the_cluster_stops_on_sigterm(cluster: RunningCluster) -> None:
    assert cluster.stop() == 0
    assert cluster.output[-1].startswith("cluster: stopped")
    for pid in cluster.replica_pids.values():
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
