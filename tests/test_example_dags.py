"""Every example DAG imports cleanly and has the shape the README promises."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "example_dags"


@pytest.mark.parametrize("path", sorted(EXAMPLES.glob("*.py")), ids=lambda p: p.stem)
def test_example_dag_imports_without_errors(path):
    from tests.conftest import dag_bag

    bag = dag_bag(str(path))
    assert bag.import_errors == {}
    assert bag.dags, f"{path.name} defines no DAG"
    for dag in bag.dags.values():
        assert "example" in dag.tags


def _snippets(text: str) -> dict[str, str]:
    """Marker name to the lines between ``# [START name]`` and ``# [END name]``."""
    found: dict[str, str] = {}
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if "# [START " in line:
            name = line.split("# [START ")[1].rstrip("]")
            end = next(j for j in range(i, len(lines)) if f"# [END {name}]" in lines[j])
            found[name] = textwrap.dedent("\n".join(lines[i : end + 1]))
    return found


def test_readme_quotes_the_example_code_verbatim_and_the_docs_include_the_rest():
    """README's code is the example DAGs' (scripts/sync_readme.py restores it); docs include theirs."""
    readme = _snippets((EXAMPLES.parent / "README.md").read_text())
    docs = "\n".join(p.read_text() for p in (EXAMPLES.parent / "docs").glob("*.md"))
    quoted = included = 0
    for path in EXAMPLES.glob("*.py"):
        for name, code in _snippets(path.read_text()).items():
            if name in readme:
                assert readme[name] == code, f"README's {name} differs from {path.name}"
                quoted += 1
            else:
                # Sphinx's literalinclude takes the block from the example itself.
                assert f"../example_dags/{path.name}" in docs, name
                assert f'"[START {name}]"' in docs, name
                included += 1
    assert quoted >= 1
    assert included >= 5
