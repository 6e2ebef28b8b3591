#!/usr/bin/env bash
# Build the sdist and wheel, check their metadata, and install the wheel into a fresh virtualenv
# where Airflow must list the provider. Run through ./dev release-check (CI does).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
rm -rf dist
# uv (./dev put it in .venv) builds and installs in seconds; python -m build and pip where it is missing.
if "$PY" -m uv --version >/dev/null 2>&1; then
  UV=("$PY" -m uv)
else
  UV=()
fi
if [ ${#UV[@]} -gt 0 ]; then
  "${UV[@]}" build --quiet --out-dir dist . >/dev/null
else
  "$PY" -m build --quiet --outdir dist . >/dev/null
fi
"$PY" -m twine check --strict dist/*
wheel=$(ls dist/*.whl)
# The wheel's names are read with zipfile: `unzip -l | grep -q` under pipefail fails at random,
# when grep exits on its first match and unzip dies of SIGPIPE.
"$PY" - "$wheel" <<'PYEOF'
import sys
import zipfile

names = zipfile.ZipFile(sys.argv[1]).namelist()
for wanted in ("airflow_provider_stripe_meter/py.typed", ".dist-info/licenses/LICENSE"):
    if not any(name.endswith(wanted) for name in names):
        sys.exit(f"{wanted} missing from {sys.argv[1]}")
PYEOF
fresh=$(mktemp -d)
trap 'rm -rf "$fresh"' EXIT
"$PY" -m venv "$fresh/venv" 2>/dev/null || "$PY" -m virtualenv -q "$fresh/venv"
if [ ${#UV[@]} -gt 0 ]; then
  "${UV[@]}" pip install --quiet --python "$fresh/venv/bin/python" "$wheel"
else
  "$fresh/venv/bin/python" -m pip install --quiet "$wheel"
fi
export AIRFLOW_HOME="$fresh/home"
listed=$("$fresh/venv/bin/airflow" providers list -o plain 2>/dev/null)
echo "$listed" | grep -E "airflow-provider-stripe-meter" || { echo "airflow providers list does not show the provider:" >&2; echo "$listed" >&2; exit 1; }
# The sdist too: it builds and installs on its own (its dependencies are the wheel's, already there).
sdist=$(ls dist/*.tar.gz)
if [ ${#UV[@]} -gt 0 ]; then
  "${UV[@]}" pip install --quiet --python "$fresh/venv/bin/python" --reinstall --no-deps "$sdist"
else
  "$fresh/venv/bin/python" -m pip install --quiet --force-reinstall --no-deps "$sdist"
fi
listed=$("$fresh/venv/bin/airflow" providers list -o plain 2>/dev/null)
echo "$listed" | grep -qE "airflow-provider-stripe-meter" || { echo "the sdist's install is not listed by Airflow" >&2; exit 1; }
echo "release check: $(basename "$wheel") and $(basename "$sdist") build, pass twine check, install and are listed by Airflow"
