# Shared set-up for scripts/workshop and scripts/test: a project virtual environment with
# nbbatch installed in editable mode. Sourced, not run.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${NBBATCH_VENV:-$ROOT/.venv}"
PYTHON="${PYTHON:-python3}"
# The torch build to install when the environment has none. Override with e.g.
#   NBBATCH_TORCH="torch==2.14.1" scripts/test
TORCH_SPEC="${NBBATCH_TORCH:-torch==2.13.0}"

nbbatch_setup() {
    local extras="$1"
    if [ ! -x "$VENV/bin/python" ]; then
        echo "nbbatch: creating the virtual environment $VENV"
        "$PYTHON" -m venv "$VENV"
        "$VENV/bin/python" -m pip install --quiet --upgrade pip
    fi
    if ! "$VENV/bin/python" -c "import torch" >/dev/null 2>&1; then
        echo "nbbatch: installing $TORCH_SPEC"
        "$VENV/bin/python" -m pip install --quiet "$TORCH_SPEC"
    fi
    local stamp="$VENV/.nbbatch-$extras"
    if [ ! -f "$stamp" ] || [ "$ROOT/pyproject.toml" -nt "$stamp" ]; then
        echo "nbbatch: installing nbbatch[$extras]"
        "$VENV/bin/python" -m pip install --quiet -e "$ROOT[$extras]"
        touch "$stamp"
    fi
}
