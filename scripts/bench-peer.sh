#!/usr/bin/env bash
# Drains the same N jobs with BullMQ (benches/peer) and with
# `agentplane bench drain` (a real worker, a Wasm instance per echo job),
# S at once, against one redis-server started here, in one run; prints both
# rates, Redis CPU per job and the ratios, and writes target/bench/peer.json.
#
#   scripts/bench-peer.sh [N=5000] [S=8]
#
# Environment: PROFILE (cargo profile of agentplane, default release, as
# issue 14 asks; `dev` reuses the test build), AOF (yes|no, default yes with
# appendfsync everysec, as `serve` runs Redis), STREAM_NODE_MAX_ENTRIES
# and HASH_MAX_LISTPACK_ENTRIES (default 16 each, as `serve` runs Redis;
# docs/OPERATIONS.md).
set -euo pipefail
cd "$(dirname "$0")/.."
N=${1:-5000}
S=${2:-8}
PROFILE=${PROFILE:-release}
AOF=${AOF:-yes}
source scripts/ensure-deps.sh
command -v node >/dev/null && command -v npm >/dev/null || {
  echo "node and npm are needed for the BullMQ peer (https://nodejs.org)" >&2
  exit 1
}
if [ ! -d benches/peer/node_modules ]; then
  echo "installing the pinned BullMQ (npm ci)..." >&2
  (cd benches/peer && npm ci --no-audit --no-fund >&2)
fi
(cd guest-examples && env -u CARGO_TARGET_DIR cargo build --release --target wasm32-wasip2 --target-dir target -p echo >&2)
echo "building agentplane (profile $PROFILE; release takes a while the first time)..." >&2
cargo build --locked --profile "$PROFILE" --bin agentplane >&2
dir=$PROFILE
[ "$PROFILE" = dev ] && dir=debug
BIN="${CARGO_TARGET_DIR:-target}/$dir/agentplane"

# Our own redis-server on a unix socket in a fresh dir: never another Redis.
RDIR=$(mktemp -d /tmp/ap-peer-XXXXXX)
SOCK="$RDIR/redis.sock"
redis-server --port 0 --unixsocket "$SOCK" --unixsocketperm 700 --save "" \
  --appendonly "$AOF" --appendfsync everysec --dir "$RDIR" \
  --maxmemory 8gb --maxmemory-policy noeviction \
  --stream-node-max-entries "${STREAM_NODE_MAX_ENTRIES:-16}" \
  --hash-max-listpack-entries "${HASH_MAX_LISTPACK_ENTRIES:-16}" \
  --logfile "$RDIR/redis.log" >/dev/null &
RPID=$!
cleanup() {
  kill "$RPID" 2>/dev/null || true
  wait "$RPID" 2>/dev/null || true
  rm -rf "$RDIR"
}
trap cleanup EXIT
for _ in $(seq 100); do
  redis-cli -s "$SOCK" ping >/dev/null 2>&1 && break
  sleep 0.1
done
redis-cli -s "$SOCK" ping >/dev/null || { cat "$RDIR/redis.log" >&2; exit 1; }

mkdir -p target/bench
echo "BullMQ: $N jobs, concurrency $S" >&2
node benches/peer/drain.js --socket "$SOCK" --jobs "$N" --slots "$S" \
  --out target/bench/bullmq-drain.json >/dev/null
echo "agentplane: $N echo jobs, $S slots" >&2
"$BIN" bench drain --redis "redis+unix://$SOCK" --jobs "$N" --slots "$S" \
  --out target/bench/drain.json >/dev/null

node - "$PROFILE" "$AOF" <<'EOF'
const fs = require('fs');
const [profile, aof] = process.argv.slice(2);
const b = JSON.parse(fs.readFileSync('target/bench/bullmq-drain.json'));
const a = JSON.parse(fs.readFileSync('target/bench/drain.json'));
const cpu = (r) => r.submit_and_drain.redis_cpu_us_per_job;
const r2 = (x) => Math.round(x * 100) / 100;
const out = {
  jobs: a.jobs, slots: a.slots, profile, aof,
  bullmq: { version: b.bullmq, jobs_per_s: b.jobs_per_s, redis_cpu_us_per_job: cpu(b) },
  agentplane: { jobs_per_s: a.jobs_per_s, redis_cpu_us_per_job: cpu(a) },
  drain_ratio: r2(a.jobs_per_s / b.jobs_per_s),
  redis_cpu_ratio: r2(cpu(a) / cpu(b)),
};
fs.writeFileSync('target/bench/peer.json', JSON.stringify(out, null, 2) + '\n');
console.log(`drain of ${a.jobs} jobs, ${a.slots} at once, one redis-server (AOF ${aof}), agentplane ${profile}:`);
console.log(`  BullMQ ${b.bullmq}  ${b.jobs_per_s} jobs/s   Redis CPU ${cpu(b)} µs/job (add + drain)`);
console.log(`  agentplane    ${a.jobs_per_s} jobs/s   Redis CPU ${cpu(a)} µs/job (submit + drain)`);
console.log(`  drain ratio agentplane/BullMQ ${out.drain_ratio}x (target >= 2)`);
console.log(`  Redis CPU ratio agentplane/BullMQ ${out.redis_cpu_ratio}x (target <= 0.5)`);
console.log('reports: target/bench/drain.json, target/bench/bullmq-drain.json, target/bench/peer.json');
EOF
