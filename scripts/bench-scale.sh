#!/usr/bin/env bash
# Scale: handshake work per core, many devices at once, many enrolled devices at rest.
#
#   scripts/bench-scale.sh                 (as root; builds the release binaries first)
#
# Rows, each with its target (issue 20):
#   1. handshakes per second per core: waygate-load responder, the gateway's WireGuard endpoint
#      answering initiations of 1,000 devices on one thread (its flood thresholds not reached)
#   2. 1,000 active devices: waygate-load run in the lab's device namespace, 1,000 in-process
#      WireGuard devices over sockets on 100 addresses (the per-source handshake limit is per
#      address), all handshaking, then DNS queries through the tunnel; the gateway's RSS after
#      and the DNS p50/p99
#   3. enrolled idle devices: 10,000 and 100,000 devices enrolled (one registry transaction),
#      none connected; the gateway's RSS once started and settled
#
# Env: BENCH_SECONDS (DNS load seconds, default 10), BENCH_DNS_RATE (queries/s, default 2000),
#      BENCH_PREFIX.
set -Eeuo pipefail
# shellcheck source=scripts/bench-lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/bench-lib.sh"
LOAD_SECONDS="${BENCH_SECONDS:-10}"
DNS_RATE="${BENCH_DNS_RATE:-2000}"
bench_init bench-scale
cargo build --release --quiet -p waygate-e2e --bin waygate-load
LOAD="$(dirname "$WAYGATE")/waygate-load"

rss_kb() { awk '/^VmRSS/ {print $2}' "/proc/$1/status"; }
hwm_kb() { awk '/^VmHWM/ {print $2}' "/proc/$1/status"; }

# gateway_up TAG: Waygate serving data dir $WORK/data-TAG in the gateway namespace; sets GW_PID.
gateway_up() {
  local tag="$1"
  gateway_toml "$WORK/gw-$tag.toml" "$WORK/data-$tag"
  ip netns exec "${P}gw" env WAYGATE_LOG=warn "$WAYGATE" --config "$WORK/gw-$tag.toml" serve \
    >"$WORK/waygate-$tag.log" 2>&1 &
  GW_PID=$!
  "$LAB" record-pid "$P" "$GW_PID" waygate
  local i
  for i in $(seq 1 100); do
    ip netns exec "${P}gw" ss -Hlun 'sport = :51820' | grep -q . && return 0
    kill -0 "$GW_PID" 2>/dev/null || bench_die "waygate ($tag) exited: $(tail -5 "$WORK/waygate-$tag.log")"
    sleep 0.2
  done
  bench_die "waygate ($tag) did not come up"
}

gateway_down() {
  kill "$GW_PID" 2>/dev/null || true
  wait "$GW_PID" 2>/dev/null || true
}

# enroll TAG COUNT SEED: COUNT load devices in data dir TAG; prints the tool's JSON.
enroll() {
  mkdir -p "$WORK/data-$1"
  chmod 700 "$WORK/data-$1"
  "$LOAD" enroll --data-dir "$WORK/data-$1" --count "$2" --seed "$3"
}

row() { printf '%-44s %14s   %s\n' "$1" "$2" "$3" | tee -a "$WORK/results"; }

echo "bench-scale: 1. handshake work per core" >&2
json="$("$LOAD" responder --count 1000 --seconds 5)"
echo "$json" >&2
hs="$(python3 -c 'import json,sys; print(json.loads(sys.argv[1])["handshakes_per_sec_per_core"])' "$json")"
row "handshakes/s per core (responder)" "$hs" "target >= 4,000"

echo "bench-scale: 2. 1,000 active devices" >&2
enroll active 1000 1 >&2
gateway_up active
binds=""
for i in $(seq 100 199); do
  ip netns exec "${P}d1" ip addr add "198.51.100.$i/24" dev ul0
  binds="${binds:+$binds,}198.51.100.$i"
done
rss0="$(rss_kb "$GW_PID")"
json="$(ip netns exec "${P}d1" timeout $((LOAD_SECONDS + 90)) "$LOAD" run \
  --data-dir "$WORK/data-active" --to 198.51.100.1:51820 --count 1000 --seed 1 \
  --bind "$binds" --seconds "$LOAD_SECONDS" --dns-rate "$DNS_RATE" --dns-name a.example)" \
  || bench_die "waygate-load run failed"
echo "$json" >&2
rss1="$(rss_kb "$GW_PID")"
hwm1="$(hwm_kb "$GW_PID")"
python3 - "$json" <<'PY' | tee -a "$WORK/results"
import json, sys
j = json.loads(sys.argv[1])
def row(name, value, target):
    print(f"{name:<44} {value:>14}   {target}")
row("devices connected of 1,000", f"{j['connected']}", f"in {j['connect_seconds']:.2f} s ({j['handshakes_per_sec']}/s over UDP, one gateway thread)")
row("DNS queries answered / sent", f"{j['dns_answered']}/{j['dns_sent']}", f"errors {j['dns_errors']}, lost {j['dns_timeouts']}")
row("DNS p50 (ms)", f"{j['dns_p50_ms']:.3f}", "")
row("DNS p99 (ms)", f"{j['dns_p99_ms']:.3f}", "target < 5")
PY
row "RSS with 1,000 active devices (MB)" "$((rss1 / 1024))" "target < 200 (before the load: $((rss0 / 1024)), peak $((hwm1 / 1024)))"
gateway_down

echo "bench-scale: 3. enrolled idle devices" >&2
for n in 0 10000 100000; do
  if [ "$n" -gt 0 ]; then
    ejson="$(enroll "idle$n" "$n" 7)"
    echo "$ejson" >&2
  else
    mkdir -p "$WORK/data-idle$n"
    chmod 700 "$WORK/data-idle$n"
  fi
  gateway_up "idle$n"
  # Settled: the registry read and the peers synced; RSS sampled until it stops growing.
  prev=0
  for _ in $(seq 1 20); do
    sleep 1
    cur="$(rss_kb "$GW_PID")"
    [ "$cur" -le "$prev" ] && break
    prev="$cur"
  done
  rss="$(rss_kb "$GW_PID")"
  hwm="$(hwm_kb "$GW_PID")"
  target=""
  [ "$n" -eq 100000 ] && target="target < 100"
  row "RSS with $n enrolled idle devices (MB)" "$((rss / 1024))" "$target (peak $((hwm / 1024)))${ejson:+, enrolled in $(python3 -c 'import json,sys; print(json.loads(sys.argv[1])["seconds"])' "$ejson") s}"
  gateway_down
done

echo
echo "== bench-scale results"
cat "$WORK/results"
