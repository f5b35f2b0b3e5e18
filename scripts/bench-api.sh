#!/usr/bin/env bash
# Admin API request rate: h2load (HTTP/1.1, keep-alive) against a running Waygate's admin API,
# on the data dir's Unix socket and on the TLS listener with a bearer token, for the rules list,
# the device list and /status, with 1,000 enrolled devices and 100 API-managed rules.
#
#   sudo scripts/bench-api.sh
#
# Env: BENCH_REQUESTS (per row, default 20000), BENCH_CLIENTS (h2load -c, default 4),
# BENCH_DEVICES (default 1000), BENCH_RULES (default 100).
#
# Printed per row: requests per second, mean latency, and the gateway's CPU-seconds per 1,000
# requests (its /proc ticks around the run). For scale: Cloudflare's API allows a user 1,200
# requests per 5 minutes (4 a second); Terraform and scripts need far less than either.
# Waygate runs in a network namespace of its own (its WireGuard port on loopback), so this needs
# root like the other benchmarks.
set -Eeuo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
REQUESTS="${BENCH_REQUESTS:-20000}"
CLIENTS="${BENCH_CLIENTS:-4}"
DEVICES="${BENCH_DEVICES:-1000}"
RULES="${BENCH_RULES:-100}"
NS="bapi$(($$ % 100000))"

die() { echo "bench-api: $*" >&2; exit 1; }
[ "$(id -u)" -eq 0 ] || die "needs root (a network namespace)"
if ! command -v h2load >/dev/null; then
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q nghttp2-client >/dev/null ||
    die "cannot install h2load (nghttp2-client)"
fi

cd "$ROOT"
cargo build --release --quiet --bin waygate
cargo build --release --quiet -p waygate-e2e --bin waygate-load
TARGET="$(cargo metadata --format-version 1 --no-deps | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')"
WAYGATE="$TARGET/release/waygate"
LOAD="$TARGET/release/waygate-load"
WORK="$(mktemp -d /tmp/waygate-bench-api.XXXXXX)"
GW_PID=""

cleanup() {
  if [ -n "$GW_PID" ]; then
    kill "$GW_PID" 2>/dev/null || true
    wait "$GW_PID" 2>/dev/null || true
  fi
  ip netns del "$NS" 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT

ip netns add "$NS"
ip netns exec "$NS" ip link set lo up
in_ns() { ip netns exec "$NS" "$@"; }
TCK="$(getconf CLK_TCK)"
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }

cat >"$WORK/waygate.toml" <<EOT
data_dir = "$WORK/data"
[wireguard]
listen = "127.0.0.1:51997"
interface_name = "bapi$$"
[admin]
listen = "127.0.0.1:9443"
EOT
W() { "$WAYGATE" --config "$WORK/waygate.toml" "$@"; }

echo "bench-api: enrolling $DEVICES devices" >&2
mkdir -m 700 "$WORK/data"
"$LOAD" enroll --data-dir "$WORK/data" --count "$DEVICES" --seed 3 >/dev/null
TOKEN="$(W admin token create --name bench)"

# Not through in_ns: a backgrounded function is a subshell, and $! must be the gateway itself
# (ip netns exec execs it) for its CPU ticks.
WAYGATE_LOG=warn ip netns exec "$NS" "$WAYGATE" --config "$WORK/waygate.toml" serve >"$WORK/waygate.log" 2>&1 &
GW_PID=$!
SOCKET="$WORK/data/admin.sock"
for _ in $(seq 1 100); do
  [ -S "$SOCKET" ] && curl -sf --max-time 2 --unix-socket "$SOCKET" http://waygate/status >/dev/null && break
  kill -0 "$GW_PID" 2>/dev/null || die "waygate exited: $(tail -5 "$WORK/waygate.log")"
  sleep 0.2
done
curl -sf --max-time 2 --unix-socket "$SOCKET" http://waygate/status >/dev/null || die "no admin API"

echo "bench-api: creating $RULES rules through the API" >&2
for i in $(seq 1 "$RULES"); do
  curl -sf --max-time 5 --unix-socket "$SOCKET" -X POST -H 'content-type: application/json' \
    --data-binary "{\"name\": \"r$i\", \"action\": \"block\", \"enabled\": true, \"filters\": [\"dns\"], \"precedence\": $i, \"traffic\": \"any(dns.domains[*] == \\\"r$i.example\\\")\"}" \
    http://waygate/gateway/rules >/dev/null || die "POST /gateway/rules failed"
done
listed="$(curl -sf --unix-socket "$SOCKET" http://waygate/gateway/rules | python3 -c 'import json,sys; print(len(json.load(sys.stdin)["result"]))')"
devices="$(curl -sf --unix-socket "$SOCKET" http://waygate/devices | python3 -c 'import json,sys; print(len(json.load(sys.stdin)["result"]))')"
echo "bench-api: $listed rules, $devices devices" >&2

# row TRANSPORT PATH: one h2load run; prints the row.
row() {
  local transport="$1" path="$2" out c0 c1 args
  args=(--h1 -n "$REQUESTS" -c "$CLIENTS" -m 1)
  if [ "$transport" = socket ]; then
    args+=(-B "unix:$SOCKET" "http://waygate$path")
  else
    args+=(-H "authorization: Bearer $TOKEN" "https://127.0.0.1:9443$path")
  fi
  c0="$(cpu_ticks "$GW_PID")"
  if [ "$transport" = socket ]; then
    out="$(h2load "${args[@]}" 2>&1)"
  else
    out="$(in_ns h2load "${args[@]}" 2>&1)"
  fi
  c1="$(cpu_ticks "$GW_PID")"
  printf '%s\n' "$out" >"$WORK/h2load.out"
  python3 - "$transport" "$path" "$c0" "$c1" "$TCK" "$WORK/h2load.out" <<'EOF'
import re, sys
transport, path = sys.argv[1], sys.argv[2]
c0, c1, tck = map(float, sys.argv[3:6])
out = open(sys.argv[6]).read()
rate = re.search(r"finished in [0-9.]+m?s, ([0-9.]+) req/s", out)
done = re.search(r"requests: (\d+) total, \d+ started, \d+ done, (\d+) succeeded, (\d+) failed", out)
status = re.search(r"status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx", out)
mean = re.search(r"time for request:\s+\S+\s+\S+\s+(\S+)", out)
if not (rate and done and status):
    sys.exit(f"bench-api: h2load gave no result for {transport} {path}:\n{out}")
ok = int(status.group(1))
if ok != int(done.group(1)):
    sys.exit(f"bench-api: {transport} {path}: {ok} of {done.group(1)} answered 2xx:\n{out}")
cpu = (c1 - c0) / tck
print(f"{transport:<7} {path:<16} {int(done.group(1)):>9} {float(rate.group(1)):>10.0f} "
      f"{mean.group(1) if mean else '?':>10} {1000 * cpu / ok:>12.3f}")
EOF
}

printf '\n%-7s %-16s %9s %10s %10s %12s\n' via path requests req_per_s mean cpu_s_per_1k
for transport in socket tls; do
  for path in /gateway/rules /devices /status; do
    row "$transport" "$path"
  done
done
echo "(for scale: Cloudflare's API allows 1,200 requests per 5 minutes per user)"
