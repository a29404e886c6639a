"""Layering: an ast scan of every trillm module's imports against STYLE.md's table ("the package is the room").

Every `import` and `from ... import` counts, including those inside functions: a lazy import of torch in an actor
still loads torch into the serving process. Relative imports are resolved to absolute names first.

| modules                                   | may import                                                          |
| ----------------------------------------- | ------------------------------------------------------------------- |
| config.py, actors/messages.py             | stdlib, attrs                                                       |
| actors/kv_blocks.py, actors/scheduler.py  | stdlib, attrs, messages, config (scheduler: kv_blocks)              |
| other actors/                             | stdlib, attrs, trio, actors/, config, errors, tokenizer;            |
|                                           | gpu.rank from gpu_worker.py only; models.loader from engine.py only |
| gpu/, models/                             | anything but trio, quart, quart_trio, hypercorn, cattrs, http/,     |
|                                           | and actors/ other than messages                                     |
| http/                                     | anything but torch, cupy, gpu/, models/, and actors/ other than     |
|                                           | engine and messages                                                 |
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "trillm"
STDLIB = "<stdlib>"

BASE_ACTOR_IMPORTS = {STDLIB, "attrs", "trio", "trillm.actors", "trillm.config", "trillm.errors", "trillm.tokenizer"}
ALLOWED: dict[str, set[str]] = {
    "config.py": {STDLIB, "attrs"},
    "actors/messages.py": {STDLIB, "attrs"},
    "actors/kv_blocks.py": {STDLIB, "attrs", "trillm.actors.messages", "trillm.config"},
    "actors/scheduler.py": {STDLIB, "attrs", "trillm.actors.messages", "trillm.config", "trillm.actors.kv_blocks"},
    "actors/gpu_worker.py": BASE_ACTOR_IMPORTS | {"trillm.gpu.rank"},
    "actors/engine.py": BASE_ACTOR_IMPORTS | {"trillm.models.loader"},
}
COMPUTE_FORBIDDEN = {"trio", "quart", "quart_trio", "hypercorn", "cattrs", "trillm.http"}
HTTP_FORBIDDEN = {"torch", "cupy", "trillm.gpu", "trillm.models"}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_names(source: str, package: str) -> set[str]:
    """Absolute names of every module `source` (a module of `package`) imports, at any depth.

    For `from x import y` both x and x.y are listed, since y may be a module.
    """
    names = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            if base == "__future__":
                continue
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def file_imports(path: Path) -> set[str]:
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    return imported_names(path.read_text(encoding="utf-8"), package)


def matches(name: str, prefix: str) -> bool:
    if prefix == STDLIB:
        return name.split(".")[0] in sys.stdlib_module_names
    return name == prefix or name.startswith(prefix + ".")


def is_other_actor_module(name: str, allowed: tuple[str, ...]) -> bool:
    """An actors/ module other than `allowed` (the package itself, `trillm.actors`, is fine)."""
    return matches(name, "trillm.actors") and name != "trillm.actors" and not any(matches(name, a) for a in allowed)


def violations(relative: str, names: set[str]) -> list[str]:
    """The names among `names` that module `relative` (a path inside trillm/) may not import."""
    if relative in ALLOWED or (relative.startswith("actors/") and relative != "actors/__init__.py"):
        allowed = ALLOWED.get(relative, BASE_ACTOR_IMPORTS)
        # `from trillm.actors import messages` also names the package trillm.actors: a package is fine when an
        # allowed module lives under it.
        return sorted(n for n in names if not any(matches(n, p) or p.startswith(n + ".") for p in allowed))
    if relative.startswith(("gpu/", "models/")):
        return sorted(
            n for n in names
            if any(matches(n, p) for p in COMPUTE_FORBIDDEN) or is_other_actor_module(n, ("trillm.actors.messages",))
        )
    if relative.startswith("http/"):
        allowed_actors = ("trillm.actors.engine", "trillm.actors.messages")
        return sorted(
            n for n in names if any(matches(n, p) for p in HTTP_FORBIDDEN) or is_other_actor_module(n, allowed_actors)
        )
    return []


MODULES = sorted(PACKAGE.rglob("*.py"))


@pytest.mark.parametrize("path", MODULES, ids=[str(p.relative_to(PACKAGE)) for p in MODULES])
def test_module_imports_follow_the_layering_table(path: Path) -> None:
    assert violations(path.relative_to(PACKAGE).as_posix(), file_imports(path)) == []


def test_the_scan_resolves_relative_imports_and_sees_function_level_ones() -> None:
    source = "from . import scheduler\nfrom ..gpu import rank\n\ndef f():\n    import torch\n"
    names = imported_names(source, "trillm.actors")
    assert names == {"trillm.actors", "trillm.actors.scheduler", "trillm.gpu", "trillm.gpu.rank", "torch"}


def test_the_rules_flag_what_the_table_forbids() -> None:
    assert violations("actors/batcher.py", {"torch", "trillm.actors.scheduler"}) == ["torch"]
    assert violations("actors/scheduler.py", {"trio", "trillm.actors.kv_blocks"}) == ["trio"]
    assert violations("actors/batcher.py", {"trillm.gpu.rank", "trillm.models.loader"}) == [
        "trillm.gpu.rank",
        "trillm.models.loader",
    ]
    assert violations("actors/gpu_worker.py", {"trillm.gpu", "trillm.gpu.rank"}) == []
    assert violations("gpu/runner.py", {"trio", "trillm.actors.messages", "trillm.actors.scheduler"}) == [
        "trillm.actors.scheduler",
        "trio",
    ]
    assert violations("http/app.py", {"torch", "trillm.actors.engine", "trillm.actors.batcher"}) == [
        "torch",
        "trillm.actors.batcher",
    ]
    assert violations("config.py", {"trio", "os", "attrs"}) == ["trio"]
