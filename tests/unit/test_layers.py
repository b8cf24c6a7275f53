"""Dependencies point down (DESIGN.md, Layout): every module's imports, read from its
syntax tree (function-level imports included), against the layer rules below.

The rules are prefixes: a module under `layer` imports nothing under any of `forbidden`.
"""

from __future__ import annotations

import ast
from pathlib import Path

from tests.conftest import REPO

RULES: tuple[tuple[str, tuple[str, ...]], ...] = (
    # The collector may use sensor's bottom modules, never the other way round.
    ("sensor", ("collector",)),
    # The kernel<->replay contract sits below both and below everything that uses it.
    ("sensor.flow", ("sensor.engine", "sensor.kernel", "sensor.replay", "sensor.export")),
    # The kernel reader follows sensor.flow's semantics; it never reaches into the engine.
    ("sensor.kernel", ("sensor.engine", "sensor.replay")),
    # The engine takes packets from any PacketSource; replay is one of them, above it.
    ("sensor.engine", ("sensor.replay",)),
)

# Known upward imports, each to be removed, not added to. (importer, imported module)
ALLOWED: frozenset[tuple[str, str]] = frozenset({
    # `loupe sensor status --collector` dials the collector with its client's TLS setup;
    # the dialing belongs in a bottom module both sides share.
    ("sensor.status_cli", "collector.client"),
})


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported(tree: ast.AST, module: str, is_package: bool) -> set[str]:
    """Every module name `tree` imports, relative imports resolved against `module`."""
    names: set[str] = set()
    package = module if is_package else module.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[:len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                # `from sensor import engine` imports the module sensor.engine;
                # `from sensor.flow.semantics import NS` imports sensor.flow.semantics.
                sub = f"{base}.{alias.name}"
                names.add(sub if is_module(sub) else base)
    return names


def is_module(name: str) -> bool:
    path = REPO.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def violations(module: str, names: set[str]) -> list[tuple[str, str]]:
    found = []
    for layer, forbidden in RULES:
        if not under(module, layer):
            continue
        for name in sorted(names):
            if any(under(name, f) for f in forbidden) and (module, name) not in ALLOWED:
                found.append((module, name))
    return found


def _modules():
    for path in sorted((REPO / "sensor").rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        yield module_name(path), path.name == "__init__.py", tree


def test_no_module_imports_upward():
    found = []
    for module, is_package, tree in _modules():
        found += violations(module, imported(tree, module, is_package))
    assert found == [], "upward imports (DESIGN.md, Layout): " + ", ".join(
        f"{m} -> {n}" for m, n in found)


def test_the_allow_list_only_names_imports_that_still_exist():
    # A removed upward import takes its entry with it, so the list only shrinks.
    imports = {module: imported(tree, module, is_package)
               for module, is_package, tree in _modules()}
    stale = sorted(pair for pair in ALLOWED if pair[1] not in imports.get(pair[0], ()))
    assert stale == [], f"remove from ALLOWED in tests/unit/test_layers.py: {stale}"


def test_every_layer_exists():
    # A renamed package would make its rule pass vacuously.
    modules = {module for module, _, _ in _modules()}
    for layer, _ in RULES:
        assert any(under(m, layer) for m in modules), layer


def test_the_walker_sees_function_level_relative_and_from_package_imports():
    src = ("def f():\n    from ..replay import reader\n"
           "from sensor import replay\nimport collector.schema\n")
    names = imported(ast.parse(src), "sensor.engine.meter", False)
    assert {"sensor.replay.reader", "sensor.replay", "collector.schema"} <= names
    assert violations("sensor.engine.meter", names) == [
        ("sensor.engine.meter", "collector.schema"),
        ("sensor.engine.meter", "sensor.replay"),
        ("sensor.engine.meter", "sensor.replay.reader"),
    ]
    assert violations("sensor.status_cli", {"collector.client"}) == []
