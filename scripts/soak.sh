#!/usr/bin/env bash
# Soak: 1,000 load devices with churn through one gateway for DURATION, its RSS, open file
# descriptors and flows printed every minute.
#
#   scripts/soak.sh DURATION        (as root; DURATION like 30m, 90s, 1h; builds release binaries)
#
# The devices (waygate-load run in the lab's device namespace, over sockets on 100 addresses)
# handshake, then send DNS queries and HTTP fetches through the tunnel; every SOAK_CHURN_EVERY
# seconds SOAK_CHURN of them change: half roam to another source address, half are revoked in
# the registry and enroll again 3 s later with a new key. At the end: RSS and fd growth since
# minute 5 (issue 20's target: RSS growth under 10%, no fd growth).
#
# Env: SOAK_DEVICES (1000), SOAK_DNS_RATE (queries/s, 200), SOAK_FETCH_RATE (fetches/s, 20),
#      SOAK_CHURN_EVERY (seconds, 10), SOAK_CHURN (devices per churn, 10), BENCH_PREFIX.
set -Eeuo pipefail
# shellcheck source=scripts/bench-lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/bench-lib.sh"
[ $# -eq 1 ] || bench_die "usage: scripts/soak.sh DURATION (e.g. 30m)"
case "$1" in
  *h) seconds=$((${1%h} * 3600)) ;;
  *m) seconds=$((${1%m} * 60)) ;;
  *s) seconds="${1%s}" ;;
  *) seconds="$1" ;;
esac
[[ "$seconds" =~ ^[0-9]+$ ]] && [ "$seconds" -gt 0 ] || bench_die "DURATION: $1 is not a duration"
DEVICES="${SOAK_DEVICES:-1000}"
bench_init soak
cargo build --release --quiet -p waygate-e2e --bin waygate-load
LOAD="$(dirname "$WAYGATE")/waygate-load"

mkdir -p -m 700 "$WORK/data"
"$LOAD" enroll --data-dir "$WORK/data" --count "$DEVICES" --seed 1 >&2
gateway_toml "$WORK/gw.toml" "$WORK/data" '[dns]
upstreams = ["203.0.113.53:53"]
[metrics]
listen = "127.0.0.1:9391"'
ip netns exec "${P}gw" env WAYGATE_LOG=warn "$WAYGATE" --config "$WORK/gw.toml" serve \
  >"$WORK/waygate.log" 2>&1 &
GW_PID=$!
"$LAB" record-pid "$P" "$GW_PID" waygate
for _ in $(seq 1 100); do
  ip netns exec "${P}gw" ss -Hlun 'sport = :51820' | grep -q . && break
  kill -0 "$GW_PID" 2>/dev/null || bench_die "waygate exited: $(tail -5 "$WORK/waygate.log")"
  sleep 0.2
done
binds=""
for i in $(seq 100 199); do
  ip netns exec "${P}d1" ip addr add "198.51.100.$i/24" dev ul0
  binds="${binds:+$binds,}198.51.100.$i"
done
ip netns exec "${P}d1" "$LOAD" run --data-dir "$WORK/data" --to 198.51.100.1:51820 \
  --count "$DEVICES" --seed 1 --bind "$binds" --seconds "$seconds" \
  --dns-rate "${SOAK_DNS_RATE:-200}" --dns-name a.example \
  --fetch-rate "${SOAK_FETCH_RATE:-20}" --fetch-to 203.0.113.10:80 \
  --churn-every "${SOAK_CHURN_EVERY:-10}" --churn "${SOAK_CHURN:-10}" >"$WORK/load.json" &
LOAD_PID=$!
"$LAB" record-pid "$P" "$LOAD_PID" waygate-load

metric() {
  ip netns exec "${P}gw" curl -fsS http://127.0.0.1:9391/metrics |
    awk -v k="$1" '$1 == k {v = $2} END {print v + 0}'
}
printf '%-7s %8s %6s %10s %10s %9s\n' minute rss_mb fds tcp_flows udp_flows sessions | tee "$WORK/soak"
minute=0
start="$(date +%s)"
while kill -0 "$LOAD_PID" 2>/dev/null; do
  sleep 1
  [ $(($(date +%s) - start)) -ge $(((minute + 1) * 60)) ] || continue
  minute=$((minute + 1))
  rss=$(($(awk '/^VmRSS/ {print $2}' "/proc/$GW_PID/status") / 1024))
  fds="$(ls "/proc/$GW_PID/fd" | wc -l)"
  printf '%-7s %8s %6s %10s %10s %9s\n' "$minute" "$rss" "$fds" \
    "$(metric 'waygate_flows_open{protocol="tcp"}')" "$(metric 'waygate_flows_open{protocol="udp"}')" \
    "$(metric waygate_peers_connected)" | tee -a "$WORK/soak"
done
wait "$LOAD_PID" || bench_die "waygate-load failed"
kill -0 "$GW_PID" 2>/dev/null || bench_die "waygate died: $(tail -5 "$WORK/waygate.log")"
echo "waygate-load: $(cat "$WORK/load.json")"
python3 - "$WORK/soak" <<'PY'
import sys
rows = [l.split() for l in open(sys.argv[1]).read().splitlines()[1:]]
if len(rows) < 6:
    print(f"{len(rows)} minutes: too short to compare with minute 5")
    sys.exit(0)
m5, end = rows[4], rows[-1]
growth = (float(end[1]) - float(m5[1])) / float(m5[1]) * 100
print(f"after minute 5: RSS {m5[1]} -> {end[1]} MB ({growth:+.1f}%, target < 10%), "
      f"fds {m5[2]} -> {end[2]} (target no growth)")
PY
kill "$GW_PID" 2>/dev/null || true
wait "$GW_PID" 2>/dev/null || true
