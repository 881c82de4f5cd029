"""The import graph of the project's packages: no cycle, and no layer importing one above it.

Every import counts, at the top of a module, inside a function or under ``TYPE_CHECKING``: an import
hidden in a function is still a dependency, and a cycle hidden that way still binds the modules.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("cache_engine", "tiny_pipelines", "server", "shapes", "benchmarks")

# From the bottom up: a module may import its own room and the rooms below it, never one above.
LAYERS: tuple[tuple[str, ...], ...] = (
    ("cache_engine", "tiny_pipelines"),
    # The shapes model is trained on the tiny pipelines' components, never on the server.
    ("shapes",),
    ("server.errors", "server.logs", "server.settings"),
    ("server.ops",),
    ("server.models",),
    ("server.protocol",),
    ("server.policy",),
    ("server.runtime",),
    ("server.api",),
    ("server.cli", "server.ray_backend", "server.__main__", "server"),
    ("benchmarks",),
)
# The wire types the runtime and model layers may name: results leave through runtime.views, which
# maps them; a generation's body comes in as parsed, and a job's view is what the jobs service answers.
WIRE = "server.protocol"
WIRE_ALLOWED: dict[str, frozenset[str] | None] = {
    "server.runtime.views": None,  # any
    "server.runtime.service": frozenset({"GenerationRequest"}),
    "server.runtime.jobs": frozenset({"GenerationRequest", "JobView"}),
}
# The web framework stays in the HTTP layer.
WEB_FRAMEWORKS = ("fastapi", "starlette")
WEB_ROOMS = ("server.api", "server.ray_backend")


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def sources() -> dict[str, Path]:
    return {module_name(path): path for package in PACKAGES for path in (ROOT / package).rglob("*.py")}


def imported(module: str, path: Path, known: set[str]) -> Iterator[str]:
    """Every module ``module`` imports, ours or not, wherever in the file the import stands."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:
                submodule = f"{base}.{alias.name}"
                yield submodule if submodule in known else base


def graph() -> dict[str, set[str]]:
    modules = sources()
    known = set(modules)
    return {
        module: {name for name in imported(module, path, known) if name in known and name != module}
        for module, path in modules.items()
    }


def room(module: str) -> tuple[int, str] | None:
    """The layer and room of ``module``: the longest room name that is ``module`` or a package of it."""
    best: tuple[int, str] | None = None
    for rank, rooms in enumerate(LAYERS):
        for name in rooms:
            if (module == name or module.startswith(name + ".")) and (
                best is None or len(name) > len(best[1])
            ):
                best = (rank, name)
    return best


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's strongly connected components with more than one module."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(edges[node]):
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
                found.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return found


def test_shapes_imports_nothing_from_the_server() -> None:
    assert [
        f"{module} -> {target}"
        for module, targets in graph().items()
        if module.startswith("shapes")
        for target in targets
        if target.startswith("server")
    ] == []


def test_every_module_has_a_room() -> None:
    assert [module for module in sources() if room(module) is None] == []


def test_no_import_cycle() -> None:
    assert cycles(graph()) == []


def test_no_layer_imports_one_above_it() -> None:
    upward = []
    for module, targets in graph().items():
        own = room(module)
        assert own is not None
        for target in sorted(targets):
            theirs = room(target)
            assert theirs is not None
            if theirs[0] > own[0]:
                upward.append(f"{module} -> {target}")
    assert upward == []


def test_the_web_framework_stays_in_the_http_layer() -> None:
    modules = sources()
    known = set(modules)
    leaks = [
        f"{module} -> {name}"
        for module, path in modules.items()
        if module.startswith("server") and not module.startswith(WEB_ROOMS)
        for name in imported(module, path, known)
        if name.split(".")[0] in WEB_FRAMEWORKS
    ]
    assert leaks == []


def test_the_runtime_and_models_name_wire_types_only_where_they_map_to_the_wire() -> None:
    named: dict[str, set[str]] = {}
    for module, path in sources().items():
        if not module.startswith(("server.runtime", "server.models", "server.ops")):
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and node.module == WIRE:
                named.setdefault(module, set()).update(alias.name for alias in node.names)
            elif isinstance(node, ast.Import) and any(alias.name == WIRE for alias in node.names):
                named.setdefault(module, set()).add("*")
    beyond = {}
    for module, names in named.items():
        allowed = WIRE_ALLOWED.get(module, frozenset())
        if allowed is not None and names - allowed:
            beyond[module] = sorted(names - allowed)
    assert beyond == {}


@pytest.mark.parametrize(
    ("edges", "expected"),
    [
        ({"a": {"b"}, "b": {"a"}, "c": set()}, [["a", "b"]]),
        ({"a": {"b"}, "b": {"c"}, "c": set()}, []),
        ({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}, [["a", "b", "c"]]),
    ],
)
def test_cycles_are_found(edges: dict[str, set[str]], expected: list[list[str]]) -> None:
    assert cycles(edges) == expected


def test_an_import_inside_a_function_counts(tmp_path: Path) -> None:
    source = tmp_path / "late.py"
    source.write_text("def f():\n    from server.models import registry\n")
    assert set(imported("late", source, {"server.models", "server.models.registry"})) == {
        "server.models.registry"
    }
