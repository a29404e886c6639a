"""The deploy/ files as data, for the deploy tests: manifests by kind, the vendored schemas, trillm's CLI parser."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from trillm.cli import _normalize, build_parser, config_from_args
from trillm.config import ServerConfig

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
SCHEMAS = DEPLOY / "schemas"
KUBERNETES_VERSION = "1.37.0"  # the newest release kubernetes-validate ships schemas for
HF_TOKEN_PLACEHOLDER = "{{HUGGING_FACE_HUB_TOKEN}}"


def manifest_paths() -> list[Path]:
    return sorted(K8S.rglob("*.yaml"))


def load_documents(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def all_documents() -> list[tuple[Path, dict[str, Any]]]:
    return [(path, doc) for path in manifest_paths() for doc in load_documents(path)]


def the(kind: str, name: str) -> dict[str, Any]:
    """The one manifest of `kind` named `name` under deploy/k8s."""
    found = [doc for _, doc in all_documents() if doc["kind"] == kind and doc["metadata"]["name"] == name]
    assert len(found) == 1, f"{len(found)} {kind}/{name} manifests"
    return found[0]


def crd_schema(api_version: str, kind: str) -> dict[str, Any] | None:
    """The vendored schema of a custom resource (deploy/schemas/<kind>-<group>-<version>.json), if any."""
    group, _, version = api_version.rpartition("/")
    path = SCHEMAS / f"{kind}-{group}-{version}.json".lower()
    return json.loads(path.read_text()) if path.exists() else None


def epp_facts() -> dict[str, Any]:
    """Plugin types, flags and default metric names of the endpoint picker release epp.yaml runs (vendored)."""
    return dict(json.loads((SCHEMAS / "llm-d-router-v0.10.0.json").read_text()))


def serve_config(argv: list[str]) -> ServerConfig:
    """What `trillm serve api_server *argv` would serve (raises SystemExit on flags it does not know)."""
    return config_from_args(build_parser().parse_args(_normalize(["serve", "api_server", *argv])))


def flag_value(argv: list[str], flag: str) -> str:
    """The value after `flag` in `argv`."""
    return argv[argv.index(flag) + 1]


def epp_config() -> dict[str, Any]:
    """The endpoint picker's configuration: the ConfigMap file its Deployment mounts and names in --config-file."""
    deployment = the("Deployment", "trillm-epp")["spec"]["template"]["spec"]
    args = deployment["containers"][0]["args"]
    mount = deployment["containers"][0]["volumeMounts"][0]
    volume = next(v for v in deployment["volumes"] if v["name"] == mount["name"])
    config_file = Path(flag_value(args, "--config-file"))
    assert str(config_file.parent) == mount["mountPath"]
    data = the("ConfigMap", volume["configMap"]["name"])["data"]
    return dict(yaml.safe_load(data[config_file.name]))


def picker_plugin(type_: str) -> dict[str, Any]:
    """The picker configuration's plugin of type `type_`."""
    return next(p for p in epp_config()["plugins"] if p["type"] == type_)
