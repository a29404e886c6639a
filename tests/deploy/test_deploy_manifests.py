"""deploy/k8s: every manifest validates offline, and the manifests agree with each other and with trillm.

Built-in kinds are checked by kubernetes-validate against the Kubernetes 1.37 schemas it ships (strict: unknown
fields fail); the Gateway API and Inference Extension kinds against their CRDs' schemas, vendored in deploy/schemas
(deploy/schemas/vendor_crd_schemas.py). Nothing is downloaded.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from deploy_files import (
    HF_TOKEN_PLACEHOLDER,
    K8S,
    KUBERNETES_VERSION,
    all_documents,
    crd_schema,
    epp_config,
    epp_facts,
    flag_value,
    load_documents,
    manifest_paths,
    picker_plugin,
    serve_config,
    the,
)


def validate(doc: dict[str, Any]) -> None:
    """Raise if `doc` is not a valid object of its kind (jsonschema.ValidationError or kubernetes-validate's)."""
    schema = crd_schema(doc["apiVersion"], doc["kind"])
    if schema is not None:
        jsonschema.Draft7Validator(schema).validate(doc)
        return
    kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


def trillm_container() -> dict[str, Any]:
    containers = the("Deployment", "trillm")["spec"]["template"]["spec"]["containers"]
    return next(c for c in containers if c["name"] == "trillm")


def test_the_manifests_are_all_there() -> None:
    kinds = {(doc["kind"], doc["metadata"]["name"]) for _, doc in all_documents()}
    assert {("Secret", "trillm-hf-token"), ("Deployment", "trillm"), ("Service", "trillm"),
            ("InferencePool", "trillm-pool"), ("Deployment", "trillm-epp"), ("Service", "trillm-epp"),
            ("ConfigMap", "trillm-epp"), ("HTTPRoute", "trillm"), ("Gateway", "inference-gateway")} <= kinds


@pytest.mark.parametrize("path", manifest_paths(), ids=lambda p: str(p.relative_to(K8S)))
def test_every_manifest_validates(path: Path) -> None:
    docs = load_documents(path)
    assert docs
    for doc in docs:
        validate(doc)


@pytest.mark.parametrize(("kind", "name", "path", "bad"), [
    ("Deployment", "trillm", ("spec", "template", "spec", "containers", 0), {"ports": [{"containerPort": "23333"}]}),
    ("Deployment", "trillm", ("spec", "template", "spec"), {"terminationGracePeriod": 30}),
    ("InferencePool", "trillm-pool", ("spec",), {"targetPorts": []}),
    ("InferencePool", "trillm-pool", ("spec", "endpointPickerRef"), {"failureMode": "FailSometimes"}),
    ("HTTPRoute", "trillm", ("spec", "rules", 0, "backendRefs", 0), {"weight": -1}),
])
def test_the_validation_catches_a_broken_manifest(kind: str, name: str, path: tuple[Any, ...],
                                                   bad: dict[str, Any]) -> None:
    doc = copy.deepcopy(the(kind, name))
    target = doc
    for key in path:
        target = target[key]
    target.update(bad)
    with pytest.raises(Exception, match=r"(?i)valid|not allowed|unexpected|minItems|should be|non-empty|less than"):
        validate(doc)


def test_the_guides_sed_fills_the_token_into_a_secret() -> None:
    text = (K8S / "deployment.yaml").read_text()
    assert sum(line.count(HF_TOKEN_PLACEHOLDER) for line in text.splitlines() if not line.startswith("#")) == 1
    filled = [doc for doc in yaml.safe_load_all(text.replace(HF_TOKEN_PLACEHOLDER, "hf_abc")) if doc]
    secret = next(doc for doc in filled if doc["kind"] == "Secret")
    env = {e["name"]: e for e in trillm_container()["env"]}
    ref = env["HUGGING_FACE_HUB_TOKEN"]["valueFrom"]["secretKeyRef"]
    assert ref["name"] == secret["metadata"]["name"] and secret["stringData"][ref["key"]] == "hf_abc"


def test_the_server_flags_parse_and_tp_matches_the_gpus() -> None:
    container = trillm_container()
    config = serve_config(container["args"])
    gpus = int(container["resources"]["limits"]["nvidia.com/gpu"])
    assert config.engine.tp == gpus == int(container["resources"]["requests"]["nvidia.com/gpu"])
    port = next(p for p in container["ports"] if p["name"] == "http")["containerPort"]
    assert config.server_port == port and config.server_name == "0.0.0.0"
    assert config.engine.cache_dir is not None
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    assert any(config.engine.cache_dir.startswith(m) for m in mounts)


def test_probes_scrape_and_shutdown_match_the_server() -> None:
    deployment = the("Deployment", "trillm")
    pod = deployment["spec"]["template"]
    container = trillm_container()
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"] == {"path": "/health", "port": "http"}, probe
    annotations = pod["metadata"]["annotations"]
    port = next(p for p in container["ports"] if p["name"] == "http")["containerPort"]
    assert annotations["prometheus.io/scrape"] == "true" and annotations["prometheus.io/path"] == "/metrics"
    assert int(annotations["prometheus.io/port"]) == port
    drain_s = serve_config(container["args"]).graceful_timeout_s
    pre_stop_s = container["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert pod["spec"]["terminationGracePeriodSeconds"] >= pre_stop_s + drain_s + 5


def test_the_service_selects_the_pods_and_names_their_port() -> None:
    service, pod = the("Service", "trillm"), the("Deployment", "trillm")["spec"]["template"]
    assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    names = {p["name"] for p in trillm_container()["ports"]}
    assert {p["targetPort"] for p in service["spec"]["ports"]} <= names


def test_the_pool_selects_the_trillm_pods_and_points_at_the_picker() -> None:
    pool = the("InferencePool", "trillm-pool")["spec"]
    pod = the("Deployment", "trillm")["spec"]["template"]
    assert pool["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    assert [p["number"] for p in pool["targetPorts"]] == [p["containerPort"] for p in trillm_container()["ports"]]
    picker = the("Service", pool["endpointPickerRef"]["name"])
    ext_proc = next(p for p in picker["spec"]["ports"] if p["name"] == "grpc-ext-proc")
    assert pool["endpointPickerRef"]["port"]["number"] == ext_proc["port"]
    epp_pod = the("Deployment", "trillm-epp")["spec"]["template"]
    assert picker["spec"]["selector"].items() <= epp_pod["metadata"]["labels"].items()
    container_ports = {p["name"] for p in epp_pod["spec"]["containers"][0]["ports"]}
    assert {p["targetPort"] for p in picker["spec"]["ports"]} <= container_ports


def test_the_route_sends_the_gateways_traffic_to_the_pool() -> None:
    route = the("HTTPRoute", "trillm")["spec"]
    assert [ref["name"] for ref in route["parentRefs"]] == [the("Gateway", "inference-gateway")["metadata"]["name"]]
    backends = [ref for rule in route["rules"] for ref in rule["backendRefs"]]
    assert backends == [{"group": "inference.networking.k8s.io", "kind": "InferencePool", "name": "trillm-pool"}]


def test_the_picker_runs_with_flags_and_plugins_of_its_release() -> None:
    facts = epp_facts()
    container = the("Deployment", "trillm-epp")["spec"]["template"]["spec"]["containers"][0]
    assert container["image"].endswith(":v0.10.0")
    flags = {arg[2:].split("=")[0] for arg in container["args"] if arg.startswith("--")}
    assert flags <= set(facts["flags"])
    assert flag_value(container["args"], "--pool-name") == the("InferencePool", "trillm-pool")["metadata"]["name"]
    config = epp_config()
    assert config["kind"] == "EndpointPickerConfig"
    declared = {p.get("name", p["type"]) for p in config["plugins"]}
    assert {p["type"] for p in config["plugins"]} <= set(facts["plugin_types"])
    for profile in config["schedulingProfiles"]:
        assert {ref["pluginRef"] for ref in profile["plugins"]} <= declared


def test_the_picker_keeps_sessions_by_the_header_clients_send() -> None:
    affinity = picker_plugin("session-affinity-filter")["parameters"]
    assert affinity["strategy"] == "session_id"
    assert affinity["sessionIdConfig"]["sources"] == [{"header": "x-session-id"}]
    assert affinity["sessionIdConfig"]["evictionTtlSeconds"] >= 3600


def test_the_picker_reads_trillm_metrics_from_metrics_path() -> None:
    assert picker_plugin("metrics-data-source")["parameters"]["path"] == "/metrics"
    extractor = picker_plugin("core-metrics-extractor")["parameters"]
    engine = next(e for e in extractor["engineConfigs"] if e["name"] == extractor["defaultEngine"])
    assert engine == {"name": "trillm", "queuedRequestsSpec": "trillm:num_requests_waiting",
                      "runningRequestsSpec": "trillm:num_requests_running",
                      "kvUsageSpec": "trillm:kv_cache_usage_perc"}
