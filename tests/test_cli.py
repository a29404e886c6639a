"""The `trillm` command line: flags → ServerConfig, help, --version, and a served model that drains on SIGTERM."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from served import ServedProcess, free_port
from trillm.cli import build_parser, config_from_args, main
from trillm.config import EngineConfig, ServerConfig

API_MD_FLAGS = (
    "--server-name", "--server-port", "--model-name", "--tp", "--session-len", "--cache-max-entry-count",
    "--cache-block-seq-len", "--max-batch-size", "--max-prefill-token-num", "--enable-prefix-caching",
    "--chat-template", "--dtype", "--device", "--api-keys", "--allow-origins", "--allow-credentials",
    "--allow-methods", "--allow-headers", "--log-level", "--max-log-len", "--disable-docs",
)
FULL_ARGS = [
    "serve", "api_server", "org/model", "--server-name", "127.0.0.1", "--server-port", "8000", "--model-name", "m",
    "--tp", "2", "--session-len", "1024", "--cache-max-entry-count", "0.5", "--cache-block-seq-len", "32",
    "--max-batch-size", "16", "--max-prefill-token-num", "2048", "--enable-prefix-caching", "--chat-template",
    "t.jinja", "--dtype", "bfloat16", "--device", "cpu", "--api-keys", "k1", "k2", "--allow-origins", "*",
    "--allow-credentials", "--allow-methods", "GET", "POST", "--allow-headers", "X-A", "--log-level", "debug",
    "--max-log-len", "100", "--disable-docs", "--cache-dir", "/tmp/c", "--max-body-bytes", "1000",
    "--graceful-timeout", "5", "--tokenizer", "org/tok", "--disable-overlap", "--disable-cuda-graph",
]


def config_of(argv: list[str]) -> ServerConfig:
    from trillm.cli import _normalize

    return config_from_args(build_parser().parse_args(_normalize(argv)))


def test_every_flag_reaches_the_config() -> None:
    assert config_of(FULL_ARGS) == ServerConfig(
        engine=EngineConfig(model="org/model", model_name="m", tp=2, session_len=1024, cache_max_entry_count=0.5,
                            cache_block_seq_len=32, max_batch_size=16, max_prefill_token_num=2048,
                            enable_prefix_caching=True, chat_template="t.jinja", dtype="bfloat16", device="cpu",
                            cache_dir="/tmp/c", tokenizer="org/tok", enable_overlap=False, enable_cuda_graph=False),
        server_name="127.0.0.1", server_port=8000, api_keys=("k1", "k2"), allow_origins=("*",),
        allow_credentials=True, allow_methods=("GET", "POST"), allow_headers=("X-A",), log_level="DEBUG",
        max_log_len=100, disable_docs=True, max_body_bytes=1000, graceful_timeout_s=5.0,
    )


def test_underscore_spellings_are_the_same_flags() -> None:
    underscored = ["--" + arg[2:].replace("-", "_") if arg.startswith("--") else arg for arg in FULL_ARGS]
    assert underscored != FULL_ARGS and config_of(underscored) == config_of(FULL_ARGS)
    assert config_of(["serve", "api_server", "--server_port=9", "--max_log_len=3"]).server_port == 9


def test_defaults_are_the_configs() -> None:
    assert config_of(["serve", "api_server"]) == ServerConfig()


def test_help_lists_every_api_md_flag(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["serve", "api_server", "--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    for flag in API_MD_FLAGS:
        assert flag in text, flag
    assert "MODEL" in text and "'-' or '_'" in text


def test_bad_value_exits_2_naming_the_flag(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["serve", "api_server", "--cache_max_entry_count", "2"])
    assert info.value.code == 2
    assert "--cache-max-entry-count must be in (0, 1], got 2.0" in capsys.readouterr().err


@pytest.mark.parametrize("target", ["api_client", "gradio"])
def test_client_targets_take_a_url_and_explain_themselves(target: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["serve", target, "--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    assert f"usage: trillm serve {target} [-h] [--api-key KEY]" in text and "URL" in text
    assert "rest" not in text and "trillm serve " + target + " http://localhost:23333" in text
    with pytest.raises(SystemExit) as info:
        main(["serve", target])
    assert info.value.code == 2 and "the following arguments are required: URL" in capsys.readouterr().err


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    assert re.fullmatch(r"trillm \d+\.\d+\.\d+\S*\n", capsys.readouterr().out)


def test_gradio_without_the_ui_extra_says_how_to_install_it(monkeypatch: pytest.MonkeyPatch,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gradio" else find_spec(name, *a))
    with pytest.raises(SystemExit) as info:
        main(["serve", "gradio", "http://localhost:23333"])
    assert info.value.code == 2
    assert "gradio is not installed; install the `ui` extra: .venv/bin/pip install -e '.[ui]'" in (
        capsys.readouterr().err)


def test_api_client_exits_1_naming_a_server_that_is_down(capsys: pytest.CaptureFixture[str]) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    assert main(["serve", "api_client", url]) == 1
    assert f"cannot reach the server at {url}" in capsys.readouterr().err


@pytest.mark.slow
def test_serve_prints_the_url_serves_and_drains_on_sigterm(smollm2_folder: str, tmp_path: Path) -> None:
    served = ServedProcess(smollm2_folder, "--session-len", "256", "--model-name", "smol", "--log-level", "warning",
                           cwd=tmp_path)
    process, output = served.process, served.output
    try:
        served.wait_ready()
        url = served.url
        assert f"trillm: serving smol at {url} -- open {url} in a browser for the API docs\n" in output
        with httpx.Client(base_url=url, timeout=120) as http:
            assert http.get("/health").status_code == 200
            body = {"model": "smol", "messages": "Hi", "max_tokens": 6, "ignore_eos": True, "stream": True}
            with http.stream("POST", "/v1/chat/completions", json=body) as response:
                lines = (line for line in response.iter_lines() if line)
                next(lines)
                process.send_signal(signal.SIGTERM)
                deadline = time.monotonic() + 10
                while (refused := http.post("/v1/completions", json={"prompt": "x"})).status_code != 503:
                    assert time.monotonic() < deadline
                    time.sleep(0.05)
                assert refused.json()["error"]["code"] == "server_draining"
                rest = list(lines)
            assert rest[-1] == "data: [DONE]"
            assert json.loads(rest[-2].removeprefix("data: "))["choices"][0]["finish_reason"] == "length"
        assert process.wait(timeout=60) == 0
    finally:
        served.stop()
    assert "Traceback" not in "".join(output), "".join(output)


@pytest.mark.slow
def test_python_dash_m_runs_the_same_main() -> None:
    result = subprocess.run([sys.executable, "-m", "trillm", "serve", "gradio"], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 2 and "the following arguments are required: URL" in result.stderr


@pytest.mark.slow
def test_a_model_that_cannot_load_fails_in_one_line(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "trillm", "serve", "api_server", str(tmp_path / "missing.gguf"),
                             "--server-port", str(free_port())], capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == f"trillm: GGUF file '{tmp_path / 'missing.gguf'}' does not exist"
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(("flags", "expected"), [([], True), (["--enable-prefix-caching"], True),
                                                 (["--disable-prefix-caching"], False)])
def test_prefix_caching_is_on_by_default_and_can_be_turned_off(flags: list[str], expected: bool) -> None:
    args = build_parser().parse_args(["serve", "api_server", *flags])
    assert config_from_args(args).engine.enable_prefix_caching is expected


def test_deterministic_comes_from_the_flag_or_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TRILLM_DETERMINISTIC", raising=False)
    assert not config_of(["serve", "api_server"]).engine.deterministic
    assert config_of(["serve", "api_server", "--deterministic"]).engine.deterministic
    monkeypatch.setenv("TRILLM_DETERMINISTIC", "1")
    assert config_of(["serve", "api_server"]).engine.deterministic
    monkeypatch.setenv("TRILLM_DETERMINISTIC", "0")
    assert not config_of(["serve", "api_server"]).engine.deterministic
