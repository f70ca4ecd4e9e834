#!/usr/bin/env bash
# Installs what is missing, builds the example agents, then runs everything
# in one process: `agentplane serve` with its own redis-server in ./data.
# Extra arguments go to `serve` (e.g. --listen 0.0.0.0:8080 --slots 8).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/ensure-deps.sh
# The agents always land in guest-examples/target (where the README points),
# whatever CARGO_TARGET_DIR says for the host build.
(cd guest-examples && env -u CARGO_TARGET_DIR cargo build --release --target wasm32-wasip2 --target-dir target)
echo "example agents: guest-examples/target/wasm32-wasip2/release/*.wasm" >&2
exec cargo run --locked -- serve "$@"
