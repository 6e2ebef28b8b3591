"""Copy every ``# [START name]`` ... ``# [END name]`` block of the example DAGs into README.md.

The README quotes tested code; ``tests/test_example_dags.py`` fails when a quote drifts, and
``python scripts/sync_readme.py`` brings the quotes back in line.
"""

from __future__ import annotations

import re
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    """Rewrite README.md's quoted blocks from the example DAGs."""
    readme_path = ROOT / "README.md"
    readme = readme_path.read_text()
    for path in sorted((ROOT / "example_dags").glob("*.py")):
        lines = path.read_text().splitlines()
        for i, line in enumerate(lines):
            if "# [START " not in line:
                continue
            name = line.split("# [START ")[1].rstrip("]")
            end = next(j for j in range(i, len(lines)) if f"# [END {name}]" in lines[j])
            # Dedented: the README shows the code as a reader would paste it.
            block = textwrap.dedent("\n".join(lines[i : end + 1]))
            pattern = re.compile(rf"[ \t]*# \[START {re.escape(name)}\].*?# \[END {re.escape(name)}\]", re.S)
            readme, count = pattern.subn(lambda _, block=block: block, readme)
            print(f"{name}: {'updated' if count else 'not quoted in README'}")
    readme_path.write_text(readme)


if __name__ == "__main__":
    main()
