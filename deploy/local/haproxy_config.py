"""The HAProxy configuration of the local cluster: N trillm replicas behind one address.

Routing (docs/deploy.md, "One machine, several replicas"):

- Stateless requests (everything but /v1/chat/interactive) go to the replica with the fewest open connections
  (`balance leastconn`). A request that could not reach its replica (connection refused, the replica died before
  answering, or a 503 from a draining replica) is retried on another one: such a request has changed nothing.
- /v1/chat/interactive is routed by session id: the `x-session-id` header (an integer) if the client sends one,
  else the `session_id` field of the JSON body (what LMDeploy's client sends). A session's first turn goes to the
  least loaded replica, which is then remembered for the id (a stick table, 24 h after its last turn); later
  turns, cancels and the end of the session go to that replica only. If that replica is down, the turn gets 410
  (503 for a turn already on its way when it died) with an OpenAI-style error `session_replica_gone`: never a new,
  empty session on another replica.
- Ids the balancer cannot route get 400 `session_id_not_routable`: `session_id: -1` with `interactive_mode: true`
  (the replica would pick the id, and the balancer never sees which) and ids from 2^31 up (the range replicas
  pick from, each counting from 2^31, so one id names different sessions on different replicas). Clients choose
  ids from 1 to 2^31 - 1, as trillm's own chat UIs do. A one-off `-1` turn (`interactive_mode: false`) is served.

Health: each replica's /health every second; two failures (or one refused connection) take it out, one success
brings it back. A draining replica (SIGTERM) answers 503 there, so it stops getting new requests.
"""

from __future__ import annotations

from collections.abc import Sequence

INTERACTIVE_PATH = "/v1/chat/interactive"
SESSION_HEADER = "x-session-id"
# Largest request HAProxy can inspect (session_id in the body) and retry: requests beyond it are still proxied,
# but an interactive turn's body must fit for its session to be found.
BUFFER_BYTES = 262144
GONE_MESSAGE = ("the replica that held session %[var(txn.session_id)] is gone, and the session with it; "
                "start a new session (another session_id)")
# Ids from 2^31 up are those replicas hand out for `session_id: -1` (each replica counts from 2^31, so the same id
# names different sessions on different replicas); clients pick theirs below (trillm/ui/chat_session.py does).
FIRST_REPLICA_SESSION_ID = 1 << 31
NOT_ROUTABLE_CODE = "session_id_not_routable"
NOT_ROUTABLE = ("behind the load balancer a session needs an id its client chose, from 1 to 2147483647: the ids "
                "replicas assign for session_id -1 (from 2147483648 up) overlap between replicas")
UNREACHABLE_MESSAGE = ("no replica could take this turn of session %[var(txn.session_id)]: the one that held the "
                       "session went away (start a new session), or none is up")


def _error_json(message: str, code: str = "session_replica_gone") -> str:
    """An OpenAI-style error body as an HAProxy log-format string (`"` escaped for the config's quoting)."""
    body = ('{"error":{"message":"' + message + '","type":"invalid_request_error","param":"session_id",'
            '"code":"' + code + '"}}')
    return body.replace('"', '\\"')


def _servers(ports: Sequence[int], host: str) -> list[str]:
    return [f"    server r{index} {host}:{port} id {index}" for index, port in enumerate(ports, start=1)]


def _health_lines() -> list[str]:
    return [
        "    option httpchk GET /health",
        "    http-check expect status 200",
        "    default-server check inter 1s fall 2 rise 1 observe layer4 error-limit 1 on-error mark-down",
    ]


def _frontend(listen: str) -> list[str]:
    return [
        "frontend trillm",
        f"    bind {listen}",
        "    option http-buffer-request",
        f"    acl is_interactive path {INTERACTIVE_PATH}",
        f"    http-request set-var(txn.session_id) req.hdr({SESSION_HEADER}) "
        f"if is_interactive {{ req.hdr({SESSION_HEADER}) -m reg ^-?[0-9]{{1,20}}$ }}",
        # 'int': exact 64-bit integers (without it, ids from 2^31 up come back as rounded floats).
        "    http-request set-var(txn.session_id) req.body,json_query('$.session_id','int') "
        "if is_interactive !{ var(txn.session_id) -m found }",
        "    http-request set-var(txn.interactive_mode) req.body,json_query('$.interactive_mode') if is_interactive",
        "    use_backend sessions if is_interactive",
        "    default_backend stateless",
    ]


def _stateless_backend(ports: Sequence[int], host: str) -> list[str]:
    return [
        "backend stateless",
        "    balance leastconn",
        *_health_lines(),
        "    retries 3",
        "    option redispatch 1",
        "    retry-on conn-failure empty-response 503",
        *_servers(ports, host),
    ]


def _sessions_backend(ports: Sequence[int], host: str) -> list[str]:
    gone = _error_json(GONE_MESSAGE)
    not_routable = f'content-type application/json lf-string "{_error_json(NOT_ROUTABLE, NOT_ROUTABLE_CODE)}"'
    lines = [
        "backend sessions",
        "    balance leastconn",
        *_health_lines(),
        "    stick-table type string len 32 size 1m expire 24h store gpt0",
        "    acl has_id var(txn.session_id) -m found",
        "    acl server_picks_id var(txn.session_id) -m beg -- -",
        "    http-request track-sc0 var(txn.session_id) if has_id !server_picks_id",
        f"    acl replica_range var(txn.session_id) -m int ge {FIRST_REPLICA_SESSION_ID}",
        "    acl keeps_session var(txn.interactive_mode) -m bool",
        # A session the server would number (-1), or an id from the replicas' range: refused, as its later turns
        # could not be routed to the one replica that knows them (a -1 one-off turn, interactive_mode false, is fine).
        f"    http-request return status 400 {not_routable} if server_picks_id keeps_session",
        f"    http-request return status 400 {not_routable} if replica_range",
    ]
    for index in range(1, len(ports) + 1):
        lines.append(f"    acl bound_r{index} sc_get_gpt0(0) eq {index}")
    for index in range(1, len(ports) + 1):
        lines.append(f'    http-request return status 410 content-type application/json lf-string "{gone}" '
                     f"if bound_r{index} !{{ srv_is_up(sessions/r{index}) }}")
    for index in range(1, len(ports) + 1):
        lines.append(f"    use-server r{index} if bound_r{index}")
    lines += [
        # A first turn binds its id to the replica that answered it (gpt0 = that server's id).
        "    http-response sc-set-gpt0(0) srv_id if { sc_get_gpt0(0) eq 0 }",
        # Only the bound replica may serve a session's turn: retry there, never elsewhere.
        "    retries 2",
        "    retry-on conn-failure",
        "    no option redispatch",
        f'    http-error status 503 content-type application/json lf-string "{_error_json(UNREACHABLE_MESSAGE)}"',
        *_servers(ports, host),
    ]
    return lines


def haproxy_config(listen: str, replica_ports: Sequence[int], *, replica_host: str = "127.0.0.1",
                   stats_listen: str | None = None, admin_socket: str | None = None) -> str:
    """The whole configuration: `listen` ("host:port") in front of the replicas on `replica_host:port`.

    `admin_socket`: a Unix socket path for HAProxy's runtime API (cluster.py takes a dead replica out for good).
    """
    if not replica_ports:
        raise ValueError("a cluster needs at least one replica")
    lines = [
        "global",
        f"    tune.bufsize {BUFFER_BYTES}",
        "    log stdout format raw local0 info",
        *([f"    stats socket {admin_socket} mode 600 level admin"] if admin_socket else []),
        "defaults",
        "    mode http",
        "    log global",
        "    option dontlog-normal",
        "    timeout connect 2s",
        "    timeout http-request 60s",
        "    timeout queue 60s",
        # Streams and long generations: generous idle timeouts (a stream sends a token at least now and then).
        "    timeout client 1h",
        "    timeout server 1h",
        "    timeout http-keep-alive 75s",
        *_frontend(listen),
        *_stateless_backend(replica_ports, replica_host),
        *_sessions_backend(replica_ports, replica_host),
    ]
    if stats_listen:
        lines += ["frontend stats", f"    bind {stats_listen}", "    stats enable", "    stats uri /",
                  "    stats refresh 2s"]
    return "\n".join(lines) + "\n"
