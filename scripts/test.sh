#!/usr/bin/env bash
# Installs what the tests need when it is missing, then runs every test.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/ensure-deps.sh
# componentize-py builds the Python agent that the host tests admit and run.
if ! command -v componentize-py >/dev/null 2>&1; then
  echo "installing componentize-py (pip)..." >&2
  python3 -m pip install -q componentize-py >&2
fi
cargo test --locked "$@"
