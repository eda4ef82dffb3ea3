#!/usr/bin/env bash
# The test command the README gives; .ci/run calls it too.
set -euo pipefail
cd "$(dirname "$0")/.."
exec python -m pytest -q -n 2 tests "$@"
