"""The map in docs/architecture.md stays true: every module of gateway/ and config/ sits in
a layer, imports only from its own layer or those below, takes part in no import cycle
(imports under TYPE_CHECKING and inside functions count), opens with a docstring saying
its job, and stays under 500 lines."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.support import ROOT

# Bottom up; a module belongs to the layer of its longest matching prefix.
LAYERS: list[tuple[str, ...]] = [
    ("config", "gateway.wire", "gateway.metrics", "gateway.logs"),
    ("gateway.core", "gateway.supervise"),
    ("gateway.backends", "gateway.auth", "gateway.cluster"),
    ("gateway.outbox", "gateway.generation", "gateway.store_writer", "gateway.hub", "gateway.streams", "gateway.rooms",
     "gateway.connection", "gateway.endpoints", "gateway.runtime", "gateway.http"),
    ("gateway.transport",),
    ("gateway.app", "gateway.serve", "gateway.cli", "gateway.__main__", "gateway.client", "gateway"),
]
# Packages that import nothing of the gateway outside themselves.
SELF_CONTAINED = ("config", "gateway.wire")
MAX_LINES = 500


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    paths = [*(ROOT / "gateway").rglob("*.py"), *(ROOT / "config").rglob("*.py")]
    return {module_name(path): path for path in sorted(paths)}


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            targets = [f"{base}.{alias.name}" for alias in node.names] + [base]
        for target in targets:
            # The module itself, or the nearest package of it that exists.
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def layer_of(name: str) -> int:
    best = (-1, -1)
    for index, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            matches = name == prefix or (prefix != "gateway" and name.startswith(prefix + "."))
            if matches and len(prefix) > best[1]:
                best = (index, len(prefix))
    assert best[0] >= 0, f"{name} is in no layer of tests/test_architecture.py and docs/architecture.md"
    return best[0]


GRAPH = {name: imports_of(name, path, set(modules())) for name, path in modules().items()}


def test_every_module_imports_only_from_its_layer_or_below() -> None:
    wrong = [
        f"{name} (layer {layer_of(name)}) imports {target} (layer {layer_of(target)})"
        for name, targets in GRAPH.items()
        for target in sorted(targets)
        if layer_of(target) > layer_of(name)
    ]
    assert not wrong, "\n".join(wrong)


@pytest.mark.parametrize("package", SELF_CONTAINED)
def test_the_protocol_and_the_settings_import_nothing_else_of_the_gateway(package: str) -> None:
    outside = [
        f"{name} imports {target}"
        for name, targets in GRAPH.items()
        if name == package or name.startswith(package + ".")
        for target in sorted(targets)
        if not (target == package or target.startswith(package + "."))
    ]
    assert not outside, "\n".join(outside)


def test_no_import_cycle() -> None:
    # Tarjan's strongly connected components: any component of more than one module is a cycle.
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in GRAPH[node]:
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for node in GRAPH:
        if node not in index:
            visit(node)
    assert not cycles, cycles


# Besides the protocol's own package, JSON is the storage format of the cluster parts and
# the upstream's protocol of the backends; nothing else may build or parse it.
JSON_ALLOWED = ("gateway.wire", "gateway.cluster", "gateway.backends")


def test_protocol_json_is_built_and_parsed_only_in_wire() -> None:
    offenders = []
    for name, path in modules().items():
        if name.startswith(JSON_ALLOWED):
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = ([alias.name for alias in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            offenders += [f"{name} imports {imported}" for imported in names if imported in ("json", "orjson")]
    assert not offenders, "\n".join(offenders)


def test_the_core_never_awaits() -> None:
    awaiting = [
        f"{name}:{node.lineno}"
        for name, path in modules().items()
        if name.startswith("gateway.core")
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
        if isinstance(node, ast.Await | ast.AsyncFor | ast.AsyncWith)
    ]
    assert not awaiting, awaiting


def test_every_module_says_its_job_and_stays_small() -> None:
    problems = []
    for name, path in modules().items():
        text = path.read_text(encoding="utf-8")
        if not ast.get_docstring(ast.parse(text)):
            problems.append(f"{name}: no opening docstring")
        lines = text.count("\n")
        if lines > MAX_LINES:
            problems.append(f"{name}: {lines} lines (at most {MAX_LINES})")
    assert not problems, "\n".join(problems)


def test_the_architecture_doc_names_every_layer_package() -> None:
    doc = (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")
    for prefixes in LAYERS:
        for prefix in prefixes:
            if prefix == "gateway":
                continue
            shown = prefix.replace(".", "/") + ("/" if (ROOT / prefix.replace(".", "/")).is_dir() else ".py")
            assert shown in doc, f"docs/architecture.md does not name {shown}"
