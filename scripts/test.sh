#!/usr/bin/env bash
# Installs what the tests need when it is missing, then runs every test.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/ensure-deps.sh
# componentize-py builds the Python agent that the host tests admit and run.
if ! command -v componentize-py >/dev/null 2>&1; then
  echo "installing componentize-py (pip)..." >&2
  # Not fatal: without it (no pip, the registry unreachable) the Python
  # agent test prints "SKIPPED: componentize-py unavailable: <why>".
  python3 -m pip install -q --retries 1 --timeout 10 componentize-py >&2 \
    || echo "componentize-py could not be installed; tests/host_python.rs will skip" >&2
fi
cargo test --locked "$@"
