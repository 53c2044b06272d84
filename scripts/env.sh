#!/usr/bin/env bash
# Create or refresh the project's virtual environment (.venv) and activate it.
# torch is installed first, pinned, so that pip takes the CPU build and no CUDA build is pulled.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$root/.venv"
python="${PYTHON:-python3}"
if [ ! -x "$venv/bin/python" ]; then
    "$python" -m venv "$venv"
fi
# shellcheck disable=SC1091
. "$venv/bin/activate"
stamp="$venv/.yoda-installed"
want="$(cat "$root/pyproject.toml" | sha256sum | cut -c1-16)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ] || ! python -c "import yoda, torch" 2>/dev/null; then
    python -m pip install --quiet --upgrade pip
    # YODA_TORCH_INDEX: an index to take torch from (e.g. PyTorch's CPU wheels)
    python -m pip install --quiet ${YODA_TORCH_INDEX:+--index-url "$YODA_TORCH_INDEX"} "torch==2.13.0"
    python -m pip install --quiet -e "$root[dev]"
    echo "$want" > "$stamp"
fi
