#!/usr/bin/env bash
# Set up the environment, then run the demo: simulated subjects, every sampling mode, a report.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck disable=SC1091
. "$root/scripts/env.sh"
yoda demo "$@"
