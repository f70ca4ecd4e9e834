#!/usr/bin/env bash
# Redis's cost per job, counted in instructions rather than seconds: runs
# the same drain as scripts/bench-peer.sh (N echo jobs through a real
# worker, and N no-op jobs through BullMQ) each against its own
# redis-server under valgrind's callgrind, and prints the instructions
# Redis executed per job (submit + drain, start-up included) and their
# ratio. Instruction counts do not move with the machine's load, so two
# builds compare here where a noisy 2-core box makes timings useless.
# Redis runs 50-100x slower under valgrind: keep N small (default 1000).
#
#   scripts/bench-redis-ir.sh [N=1000]
#
# Environment: PROFILE (cargo profile, default dev: the worker's speed does
# not change Redis's count much), STREAM_NODE_MAX_ENTRIES and
# HASH_MAX_LISTPACK_ENTRIES (default 16 each, as `serve` runs Redis), KEEP
# (a directory to keep the callgrind files in, for `callgrind_annotate
# --inclusive=yes`).
set -euo pipefail
cd "$(dirname "$0")/.."
N=${1:-1000}
PROFILE=${PROFILE:-dev}
source scripts/ensure-deps.sh
command -v valgrind >/dev/null || { echo "valgrind is needed (apt-get install valgrind)" >&2; exit 1; }
if [ ! -d benches/peer/node_modules ]; then
  (cd benches/peer && npm ci --no-audit --no-fund >&2)
fi
(cd guest-examples && env -u CARGO_TARGET_DIR cargo build --release --target wasm32-wasip2 --target-dir target -p echo >&2)
cargo build --locked --profile "$PROFILE" --bin agentplane >&2
dir=$PROFILE
[ "$PROFILE" = dev ] && dir=debug
BIN="${CARGO_TARGET_DIR:-target}/$dir/agentplane"

# Starts redis-server under callgrind in $1, runs "$2 <socket>", stops it
# and prints the instructions it executed.
count() {
  local d=$1 sock=$1/redis.sock
  valgrind --tool=callgrind --callgrind-out-file="$d/callgrind.out" \
    redis-server --port 0 --unixsocket "$sock" --unixsocketperm 700 --save "" \
    --appendonly yes --appendfsync everysec --dir "$d" --logfile "$d/redis.log" \
    --stream-node-max-entries "${STREAM_NODE_MAX_ENTRIES:-16}" \
  --hash-max-listpack-entries "${HASH_MAX_LISTPACK_ENTRIES:-16}" >"$d/valgrind.log" 2>&1 &
  local vp=$!
  for _ in $(seq 300); do redis-cli -s "$sock" ping >/dev/null 2>&1 && break; sleep 0.2; done
  $2 "$sock" >"$d/run.log" 2>&1 || { tail -5 "$d/run.log" >&2; kill $vp; return 1; }
  redis-cli -s "$sock" shutdown nosave >/dev/null 2>&1 || true
  wait $vp || true
  sed -n 's/^\(summary\|totals\): \([0-9]*\).*/\2/p' "$d/callgrind.out" | head -1
}
ap() { "$BIN" bench drain --redis "redis+unix://$1" --jobs "$N" --slots 8 --out "$W/ap/drain.json"; }
bull() { node benches/peer/drain.js --socket "$1" --jobs "$N" --slots 8 --out "$W/bull/drain.json"; }

W=${KEEP:-$(mktemp -d /tmp/ap-redis-ir-XXXXXX)}
mkdir -p "$W/ap" "$W/bull"
echo "agentplane: $N echo jobs, 8 slots, Redis under callgrind..." >&2
A=$(count "$W/ap" ap)
echo "BullMQ: $N no-op jobs, concurrency 8, Redis under callgrind..." >&2
B=$(count "$W/bull" bull)
python3 - "$N" "$A" "$B" <<'PY'
import sys
n, a, b = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
print(f"Redis instructions per job: agentplane {a / n:,.0f}, BullMQ {b / n:,.0f}, "
      f"ratio {a / b:.2f}x (target <= 0.5x)")
PY
[ -n "${KEEP:-}" ] || rm -rf "$W"
