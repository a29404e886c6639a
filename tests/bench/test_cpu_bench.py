"""bench/cpu.py's summary: the faster transformers dtype of each round is the yardstick, ratios are per round."""

from __future__ import annotations

from typing import Any

import pytest

from bench import cpu


def _row(round_index: int, streams: int, ours: float, hf: dict[str, float]) -> dict[str, Any]:
    return {
        "round": round_index,
        "streams": streams,
        "trillm": {"output_tok_per_s": ours, "max_ttft_ms": 100.0 * (round_index + 1), "load_before": 1.5},
        "transformers": {name: {"output_tok_per_s": value} for name, value in hf.items()},
    }


def test_the_faster_dtype_of_each_round_is_the_yardstick_and_ratios_stay_within_rounds() -> None:
    rounds = [
        _row(0, 1, 30.0, {"float32": 20.0, "bfloat16": 25.0}),  # ratio 1.2 against bfloat16
        _row(0, 8, 90.0, {"float32": 100.0, "bfloat16": 50.0}),
        _row(1, 1, 10.0, {"float32": 10.0, "bfloat16": 5.0}),  # a loaded round: 1.0 against float32
        _row(1, 8, 80.0, {"float32": 100.0, "bfloat16": 40.0}),
        _row(2, 1, 33.0, {"float32": 30.0, "bfloat16": 10.0}),  # 1.1
        _row(2, 8, 120.0, {"float32": 100.0, "bfloat16": 40.0}),
    ]
    one, eight = cpu.summarize_rounds(rounds, [1, 8])
    assert one["ratios"] == pytest.approx([1.2, 1.0, 1.1])
    assert one["ratio"] == pytest.approx(1.1)  # the median of per-round ratios, not a ratio of medians (30/20)
    assert one["trillm_tok_per_s"] == 30.0 and one["transformers_tok_per_s"] == 25.0
    assert one["transformers_dtypes"] == ["bfloat16", "float32"]
    assert one["trillm_max_ttft_ms"] == 300.0
    assert eight["ratio"] == pytest.approx(0.9) and eight["transformers_dtypes"] == ["float32"]
