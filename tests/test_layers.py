"""The package's layers: plain-Python modules import neither Airflow nor stripe; no import cycles."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "airflow_provider_stripe_meter"
PURE = sorted(
    f"airflow_provider_stripe_meter.{folder}.{path.stem}"
    for folder in ("utils", "billing", "ledger")
    for path in (PACKAGE / folder).glob("*.py")
    if path.stem != "__init__"
)


@pytest.mark.parametrize("module", PURE)
def test_plain_python_modules_import_neither_airflow_nor_stripe(module):
    code = (
        "import sys, importlib\n"
        f"importlib.import_module({module!r})\n"
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'airflow', 'stripe'}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", f"{module} pulls in {out.stdout.strip()}"


def _imports(path: Path, modules: set[str]) -> set[str]:
    """Package modules ``path`` imports, anywhere, ``if TYPE_CHECKING:`` blocks included (a name
    used only in annotations is still a dependency: a circle through one is a circle).

    ``from package import submodule`` imports the submodule (its package is already imported,
    as the importing module's parent), so only the submodule counts.
    """
    tree = ast.parse(path.read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith(PACKAGE.name):
            submodules = {f"{node.module}.{alias.name}" for alias in node.names} & modules
            found |= submodules or {node.module}
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith(PACKAGE.name)}
    return found


def _module_graph() -> dict[str, set[str]]:
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        modules[name] = path
    names = set(modules)
    return {
        name: {m for m in _imports(path, names) if m in names and m != name} for name, path in modules.items()
    }


def test_no_module_of_the_package_imports_itself_in_a_circle():
    graph = _module_graph()
    cycles = []

    def visit(node: str, trail: list[str]) -> None:
        for nxt in graph[node]:
            if nxt in trail:
                cycles.append([*trail[trail.index(nxt) :], nxt])
            elif nxt not in done:
                visit(nxt, [*trail, nxt])
        done.add(node)

    done: set[str] = set()
    for start in sorted(graph):
        if start not in done:
            visit(start, [start])
    assert not cycles, cycles


def test_the_cycle_finder_finds_a_cycle(tmp_path, monkeypatch):
    # The check above must be able to fail: two modules importing each other are reported.
    pkg = tmp_path / PACKAGE.name
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text(f"from {PACKAGE.name}.b import x\n")
    (pkg / "b.py").write_text(f"def f():\n    from {PACKAGE.name} import a\n")
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", pkg)
    with pytest.raises(AssertionError, match="a"):
        test_no_module_of_the_package_imports_itself_in_a_circle()


#: The plain layers, lowest first, and the Airflow-facing adapters above them (``state``): a
#: module imports from its own layer or one below, never from the operators, sensors or triggers.
LAYERS = ("utils", "ledger", "billing", "state")
TASKS = ("operators", "sensors", "triggers")


def test_imports_run_only_downward():
    rank = {layer: i for i, layer in enumerate(LAYERS)}

    def layer(module: str) -> str:
        parts = module.split(".")
        return parts[1] if len(parts) > 1 else ""

    upward = [
        (module, imported)
        for module, imports in _module_graph().items()
        if layer(module) in rank
        for imported in sorted(imports)
        if layer(imported) in TASKS or rank.get(layer(imported), -1) > rank[layer(module)]
    ]
    assert not upward, upward
