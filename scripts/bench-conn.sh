#!/usr/bin/env bash
# Short TCP connections per second through Waygate and through the gateway a user would
# otherwise build, in one run.
#
#   scripts/bench-conn.sh                  (as root; builds the release binaries first)
#
# Both gateways serve the same wg-quick + wireguard-go device in the same lab, one after the
# other (scripts/bench-lib.sh). lab-connrate in the device opens connections to the HTTP origin
# (203.0.113.10:80), one request each, from several workers; the rate is completed connections
# per second, and the gateway's CPU time is reported per 1,000 connections.
#
# Env: BENCH_SECONDS (default 6), BENCH_WORKERS (default 8), BENCH_PREFIX.
set -Eeuo pipefail
# shellcheck source=scripts/bench-lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/bench-lib.sh"
SECONDS_PER_RUN="${BENCH_SECONDS:-6}"
WORKERS="${BENCH_WORKERS:-8}"
bench_init bench-conn

# measure NAME: one lab-connrate run from the device through the gateway GW_PID.
measure() {
  local name="$1" c0 c1 json
  # Warm up the path (ARP, handshakes) before counting.
  ip netns exec "${P}d1" "$LAB_CONNRATE" --to 203.0.113.10:80 --seconds 1 --workers 2 >/dev/null
  c0="$(cpu_ticks "$GW_PID")"
  json="$(ip netns exec "${P}d1" timeout $((SECONDS_PER_RUN + 30)) \
    "$LAB_CONNRATE" --to 203.0.113.10:80 --seconds "$SECONDS_PER_RUN" --workers "$WORKERS")" \
    || bench_die "lab-connrate through $name failed"
  c1="$(cpu_ticks "$GW_PID")"
  python3 - "$name" "$c0" "$c1" "$TCK" "$json" >>"$WORK/results" <<'PY'
import json, sys
name, c0, c1, tck, raw = sys.argv[1:]
r = json.loads(raw)
cpu = (float(c1) - float(c0)) / float(tck)
per_k = cpu / r["connections"] * 1000 if r["connections"] else float("inf")
print(f"{name}\t{r['per_second']:.1f}\t{r['failed']}\t{per_k:.3f}")
PY
}

waygate_up
echo "bench-conn: waygate (pid $GW_PID), ${SECONDS_PER_RUN}s, $WORKERS workers" >&2
measure waygate
waygate_down
reference_up
echo "bench-conn: reference wireguard-go (pid $GW_PID)" >&2
measure reference

python3 - "$WORK/results" <<'PY'
import sys
r = {}
for line in open(sys.argv[1]):
    name, rate, failed, per_k = line.split("\t")
    r[name] = (float(rate), int(failed), float(per_k))
(w, wf, wc), (f, ff, fc) = r["waygate"], r["reference"]
print(f"{'gateway':<10} {'conn/s':>9} {'failed':>7} {'CPU-s per 1k conn':>18}")
print(f"{'waygate':<10} {w:>9.1f} {wf:>7} {wc:>18.3f}")
print(f"{'reference':<10} {f:>9.1f} {ff:>7} {fc:>18.3f}")
print(f"ratio (waygate / reference): {w / f:.2f}; target >= 1.00:", "met" if w >= f else "NOT met")
PY
