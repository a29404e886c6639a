"""/metrics carries every metric the endpoint picker reads, as the gauges it expects (the model-server protocol).

The picker (llm-d-router's EPP, deploy/k8s/inference-pool/epp.yaml) reads, per replica, the queued requests, the
running requests and the KV-cache usage (a 0-1 fraction), each a gauge it takes the value of whatever the labels.
It reads them under the names our EPP configuration gives (trillm's own) or, for pods of an unconfigured engine,
under vLLM's names; trillm exports both. LoRA and cache-config info are optional in the protocol and trillm has
no LoRA: the configuration leaves both out, so the picker does not look for them.
"""

from __future__ import annotations

import math
import re
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from deploy_files import epp_facts, picker_plugin
from tests.http.http_fakes import FakeEngine
from tests.http.http_live import server_config
from trillm.http.app import create_app

REQUIRED_SPECS = ("queuedRequestsSpec", "runningRequestsSpec", "kvUsageSpec")


def picker_metric_names() -> dict[str, list[str]]:
    """{spec key: [metric names]} the picker may read: our engine config's and the built-in vLLM engine's."""
    extractor = picker_plugin("core-metrics-extractor")["parameters"]
    ours = next(e for e in extractor["engineConfigs"] if e["name"] == extractor["defaultEngine"])
    vllm = epp_facts()["vllm_engine_metrics"]
    return {key: [ours[key], vllm[key]] for key in REQUIRED_SPECS}


def spec_name_and_labels(spec: str) -> tuple[str, dict[str, str]]:
    match = re.fullmatch(r"([a-zA-Z_:][\w:]*)(?:\{(.*)\})?", spec)
    assert match is not None, spec
    labels = dict(pair.split("=", 1) for pair in match.group(2).split(",")) if match.group(2) else {}
    return match.group(1), labels


async def scrape(engine: FakeEngine) -> dict[str, Any]:
    app = create_app(server_config(), engine=engine)
    async with app.test_app() as test_app:
        client = test_app.test_client()
        turn = await client.post("/v1/chat/interactive", json={"prompt": "hi", "session_id": 5,
                                                                "interactive_mode": True, "request_output_len": 4})
        assert turn.status_code == 200
        response = await client.get("/metrics")
        assert response.status_code == 200
        text = (await response.get_data()).decode()
    return {family.name: family for family in text_string_to_metric_families(text)}


async def test_every_metric_the_picker_reads_is_a_gauge_with_the_engines_value() -> None:
    engine = FakeEngine()
    families = await scrape(engine)
    stats = engine.statistics()
    expected = {"queuedRequestsSpec": stats.num_waiting, "runningRequestsSpec": stats.num_running,
                "kvUsageSpec": stats.kv_usage}
    assert stats.kv_usage > 0  # the session parked its history: the value is not a default zero
    for key, specs in picker_metric_names().items():
        for spec in specs:
            name, labels = spec_name_and_labels(spec)
            family = families.get(name)
            assert family is not None, f"/metrics lacks {name} ({key})"
            assert family.type == "gauge", f"{name} is a {family.type}"
            samples = [s for s in family.samples if labels.items() <= s.labels.items()]
            assert len(samples) == 1 and samples[0].name == name, samples
            assert math.isclose(samples[0].value, expected[key]), (name, samples[0].value, expected[key])
    kv_name, _ = spec_name_and_labels(picker_metric_names()["kvUsageSpec"][0])
    assert 0.0 < families[kv_name].samples[0].value <= 1.0  # a fraction, as the protocol asks


def test_the_spec_parser_reads_label_selectors() -> None:
    assert spec_name_and_labels("nv_trt_llm_request_metrics{request_type=waiting}") == (
        "nv_trt_llm_request_metrics", {"request_type": "waiting"})
    assert spec_name_and_labels("trillm:num_requests_waiting") == ("trillm:num_requests_waiting", {})


async def test_a_metric_the_picker_needs_missing_from_metrics_would_fail(monkeypatch: Any) -> None:
    import trillm.http.metrics as metrics

    real = metrics.GaugeMetricFamily

    def without_vllm_waiting(name: str, *args: Any, **kwargs: Any) -> Any:
        return real(name.replace("vllm:num_requests_waiting", "vllm:renamed"), *args, **kwargs)

    monkeypatch.setattr(metrics, "GaugeMetricFamily", without_vllm_waiting)
    families = await scrape(FakeEngine())
    assert "vllm:renamed" in families and "vllm:num_requests_waiting" not in families
