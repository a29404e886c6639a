"""Layering: an ast scan of every trillm module's imports against the rules of the tree (DESIGN.md, STYLE.md).

Every `import` and `from ... import` counts, including those inside functions: a lazy import of torch in an actor
still loads torch into the serving process. Relative imports are resolved to absolute names first.

The diagram the tree must be: http → actors → protocol ← gpu; policy pure (→ protocol); models below gpu.

| rule                | modules            | may import                                                                |
| ------------------- | ------------------ | ------------------------------------------------------------------------- |
| config-is-a-leaf    | config.py          | stdlib, attrs                                                             |
| client-stands-alone | client.py          | stdlib, httpx (no server layer: `import trillm` loads it)                 |
| package-is-light    | __init__.py        | stdlib, client                                                            |
| ui-is-a-client      | ui/                | stdlib, client, ui/, gradio; only ui/ and cli.py import ui/ or gradio     |
| protocol-at-bottom  | protocol/          | stdlib, attrs, protocol/                                                  |
| policy-is-pure      | policy/            | stdlib, attrs, protocol/, policy/, config                                 |
| actors-are-trio     | actors/            | stdlib, attrs, trio, actors/, protocol/, policy/, config, errors,         |
|                     |                    | tokenizer; models.loader from engine.py only (model resolution)           |
| compute-below       | gpu/, models/      | anything but trio, quart, quart_trio, hypercorn, cattrs, http/, actors/,  |
|                     |                    | policy/                                                                   |
| http-above          | http/              | anything but torch, cupy, gpu/, models/, policy/, and actors/ other than  |
|                     |                    | engine (which only state.py opens); of structured/ only grammar.py        |
| grammar-is-light    | structured/        | grammar.py: stdlib, llguidance (the HTTP layer builds grammars with it);  |
|                     | grammar.py         | the rest of structured/ (rank-side matchers) as gpu/                      |

`test_no_package_cycles` checks the graph of trillm's subpackages has no cycle (the old actors ⇄ gpu one is gone).
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "trillm"
STDLIB = "<stdlib>"

ACTOR_IMPORTS = {
    STDLIB, "attrs", "trio", "trillm.actors", "trillm.protocol", "trillm.policy", "trillm.config", "trillm.errors",
    "trillm.tokenizer",
}
ALLOWED: dict[str, set[str]] = {
    "config.py": {STDLIB, "attrs"},
    "client.py": {STDLIB, "httpx"},
    "__init__.py": {STDLIB, "trillm.client"},
    "ui/": {STDLIB, "trillm.client", "trillm.ui", "gradio"},
    "protocol/": {STDLIB, "attrs", "trillm.protocol"},
    "policy/": {STDLIB, "attrs", "trillm.protocol", "trillm.policy", "trillm.config"},
    "actors/engine.py": ACTOR_IMPORTS | {"trillm.models.loader"},
    "actors/": ACTOR_IMPORTS,
    "structured/grammar.py": {STDLIB, "llguidance"},
    "structured/__init__.py": {STDLIB},
}
FORBIDDEN: dict[str, set[str]] = {
    "gpu/": {"trio", "quart", "quart_trio", "hypercorn", "cattrs", "trillm.http", "trillm.actors", "trillm.policy"},
    "models/": {"trio", "quart", "quart_trio", "hypercorn", "cattrs", "trillm.http", "trillm.actors", "trillm.policy"},
    "http/": {"torch", "cupy", "trillm.gpu", "trillm.models", "trillm.policy", "trillm.structured.matchers"},
    "structured/": {"trio", "quart", "quart_trio", "hypercorn", "cattrs", "trillm.http", "trillm.actors",
                    "trillm.policy", "trillm.gpu", "trillm.models"},
}
HTTP_ACTOR_MODULES = ("trillm.actors.engine",)


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


def rule_for(relative: str, table: dict[str, set[str]]) -> set[str] | None:
    """The table entry of a module: its own path first, else the longest folder prefix."""
    if relative in table:
        return table[relative]
    folders = [key for key in table if key.endswith("/") and relative.startswith(key)]
    return table[max(folders, key=len)] if folders else None


def violations(relative: str, names: set[str]) -> list[str]:
    """The names among `names` that module `relative` (a path inside trillm/) may not import."""
    if relative.endswith("__init__.py"):
        names = {n for n in names if n != module_name(PACKAGE / relative)}
    allowed = rule_for(relative, ALLOWED)
    if allowed is not None:
        # `from trillm.protocol import api` also names the package trillm.protocol: a package is fine when an
        # allowed module lives under it.
        return sorted(n for n in names if not any(matches(n, p) or p.startswith(n + ".") for p in allowed))
    forbidden = rule_for(relative, FORBIDDEN) or set()
    bad = {n for n in names if any(matches(n, p) for p in forbidden)}
    if relative.startswith("http/"):
        bad |= {n for n in names if matches(n, "trillm.actors") and n != "trillm.actors"
                and not any(matches(n, a) for a in HTTP_ACTOR_MODULES)}
    return sorted(bad)


def subpackage(name: str) -> str | None:
    """`trillm.gpu.runner` → `gpu`; top-level modules (`trillm.config`) are their own node; None outside trillm."""
    parts = name.split(".")
    if parts[0] != "trillm" or len(parts) < 2:
        return None
    return parts[1]


def package_graph() -> dict[str, set[str]]:
    """Edges between trillm's subpackages (and top-level modules) from every import of every module."""
    graph: dict[str, set[str]] = {}
    for path in MODULES:
        source = subpackage(module_name(path))
        if source is None:
            continue
        targets = {subpackage(n) for n in file_imports(path)}
        graph.setdefault(source, set()).update(t for t in targets if t is not None and t != source)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of `graph` as a path [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1 = on the stack, 2 = done

    def visit(node: str, stack: list[str]) -> list[str] | None:
        state[node] = 1
        for child in sorted(graph.get(node, ())):
            if state.get(child) == 1:
                return stack[stack.index(child):] + [child] if child in stack else [node, child, node]
            if child not in state and (cycle := visit(child, [*stack, child])):
                return cycle
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start, [start])):
            return cycle
    return None


MODULES = sorted(PACKAGE.rglob("*.py"))


@pytest.mark.parametrize("path", MODULES, ids=[str(p.relative_to(PACKAGE)) for p in MODULES])
def test_module_imports_follow_the_layering_table(path: Path) -> None:
    assert violations(path.relative_to(PACKAGE).as_posix(), file_imports(path)) == []


def test_the_scan_resolves_relative_imports_and_sees_function_level_ones() -> None:
    source = "from . import scheduler\nfrom ..gpu import rank\n\ndef f():\n    import torch\n"
    names = imported_names(source, "trillm.actors")
    assert names == {"trillm.actors", "trillm.actors.scheduler", "trillm.gpu", "trillm.gpu.rank", "torch"}


def ui_violations(relative: str, names: set[str]) -> list[str]:
    """The user interfaces (and gradio) a module outside ui/ and cli.py imports: serving never loads them."""
    if relative.startswith("ui/") or relative == "cli.py":
        return []
    return sorted(n for n in names if matches(n, "trillm.ui") or matches(n, "gradio"))


@pytest.mark.parametrize("path", MODULES, ids=[str(p.relative_to(PACKAGE)) for p in MODULES])
def test_only_the_cli_reaches_the_user_interfaces(path: Path) -> None:
    assert ui_violations(path.relative_to(PACKAGE).as_posix(), file_imports(path)) == []


def test_the_ui_rules_flag_a_server_import_of_the_ui() -> None:
    assert ui_violations("http/app.py", {"trillm.ui.web_chat", "quart"}) == ["trillm.ui.web_chat"]
    assert ui_violations("__init__.py", {"gradio", "trillm.client"}) == ["gradio"]
    assert ui_violations("cli.py", {"trillm.ui.terminal"}) == []
    assert violations("ui/web_chat.py", {"gradio", "trillm.client", "trillm.http.app", "torch"}) == [
        "torch", "trillm.http.app"]


def test_no_package_cycles() -> None:
    assert find_cycle(package_graph()) is None


def test_the_cycle_finder_finds_a_planted_cycle() -> None:
    assert find_cycle({"actors": {"protocol", "gpu"}, "gpu": {"protocol", "actors"}, "protocol": set()}) == [
        "actors", "gpu", "actors",
    ]
    assert find_cycle({"http": {"actors"}, "actors": {"protocol"}, "gpu": {"protocol"}}) is None


def test_the_rules_flag_what_the_table_forbids() -> None:
    # actors: Trio code over protocol and policy, never torch or gpu/
    assert violations("actors/batcher.py", {"torch", "trillm.policy.scheduler"}) == ["torch"]
    assert violations("actors/gpu_worker.py", {"trillm.gpu", "trillm.gpu.rank"}) == ["trillm.gpu", "trillm.gpu.rank"]
    assert violations("actors/batcher.py", {"trillm.models.loader"}) == ["trillm.models.loader"]
    assert violations("actors/engine.py", {"trillm.models.loader"}) == []
    # policy is pure; protocol is the bottom
    assert violations("policy/scheduler.py", {"trio", "trillm.policy.kv_blocks"}) == ["trio"]
    assert violations("policy/scheduler.py", {"trillm.actors.messages"}) == ["trillm.actors.messages"]
    assert violations("protocol/step.py", {"trillm.config", "trillm.protocol.api"}) == ["trillm.config"]
    # gpu never imports actors (the old package cycle) or policy
    assert violations("gpu/runner.py", {"trio", "trillm.protocol.step", "trillm.actors.messages"}) == [
        "trillm.actors.messages",
        "trio",
    ]
    assert violations("gpu/rank.py", {"trillm.policy.scheduler"}) == ["trillm.policy.scheduler"]
    # structured: the HTTP layer may build grammars, never load the rank's matchers (torch)
    assert violations("http/chat.py", {"trillm.structured.grammar", "trillm.structured.matchers"}) == [
        "trillm.structured.matchers"]
    assert violations("structured/grammar.py", {"llguidance", "torch"}) == ["torch"]
    # http never imports gpu or actors beyond the engine
    assert violations("http/app.py", {"torch", "trillm.actors.engine", "trillm.actors.batcher"}) == [
        "torch",
        "trillm.actors.batcher",
    ]
    assert violations("http/state.py", {"trillm.gpu.rank", "trillm.protocol.api"}) == ["trillm.gpu.rank"]
    assert violations("config.py", {"trio", "os", "attrs"}) == ["trio"]
    # the client and the package root stay light: no trio, torch or server layer
    assert violations("client.py", {"httpx", "json", "trio", "trillm.http.schemas"}) == ["trillm.http.schemas", "trio"]
    assert violations("__init__.py", {"trillm.client", "trillm.client.APIClient", "trillm.actors.engine"}) == [
        "trillm.actors.engine",
    ]
