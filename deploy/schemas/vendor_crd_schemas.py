"""Turn CustomResourceDefinition YAML files into the JSON schemas that tests/deploy/test_manifests.py validates against.

Run it when the Gateway API or the Gateway API Inference Extension moves to a new release:

    python deploy/schemas/vendor_crd_schemas.py SOURCE CRD.yaml [CRD.yaml ...]

For the storage version of each CRD it writes `deploy/schemas/<kind>-<group>-<version>.json` (lower case): the
version's `openAPIV3Schema`, with `apiVersion` and `kind` pinned by `enum` so that a manifest of another kind or
version cannot pass by accident, and with the CRD's bundle version and SOURCE recorded in `x-trillm-source`.
Kubernetes-specific keywords (`x-kubernetes-*`) are kept: JSON Schema validators ignore unknown keywords.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import yaml

HERE = Path(__file__).resolve().parent


def schemas_of(crd: dict[str, Any], source: str) -> dict[str, dict[str, Any]]:
    """`{file name: JSON schema}` for the storage version of one CRD (the one manifests should use)."""
    spec = crd["spec"]
    group, kind = spec["group"], spec["names"]["kind"]
    annotations = crd["metadata"].get("annotations", {})
    bundle = next((value for key, value in annotations.items() if key.endswith("bundle-version")), "unknown")
    out = {}
    for version in spec["versions"]:
        if not version.get("storage", False):
            continue
        schema = dict(version["schema"]["openAPIV3Schema"])
        properties = dict(schema.get("properties", {}))
        properties["apiVersion"] = {"type": "string", "enum": [f"{group}/{version['name']}"]}
        properties["kind"] = {"type": "string", "enum": [kind]}
        schema["properties"] = properties
        schema["required"] = sorted(set(schema.get("required", [])) | {"apiVersion", "kind"})
        schema["x-trillm-source"] = f"{source} (bundle {bundle})"
        out[f"{kind}-{group}-{version['name']}.json".lower()] = schema
    return out


def main(argv: list[str]) -> None:
    source, *paths = argv
    for path in paths:
        for name, schema in schemas_of(yaml.safe_load(Path(path).read_text()), source).items():
            (HERE / name).write_text(json.dumps(schema, indent=1, sort_keys=True) + "\n")
            print(f"wrote deploy/schemas/{name}")


if __name__ == "__main__":
    main(sys.argv[1:])
