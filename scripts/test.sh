#!/usr/bin/env bash
# Set up the environment, then run the linter and the whole test suite (CPU).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck disable=SC1091
. "$root/scripts/env.sh"
cd "$root"
ruff check src tests benchmarks
python -m pytest -q "$@"
