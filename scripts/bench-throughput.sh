#!/usr/bin/env bash
# TCP goodput through Waygate and through the gateway a user would otherwise build, in one run.
#
#   scripts/bench-throughput.sh            (as root; builds the release binaries first)
#
# Both gateways serve the same wg-quick + wireguard-go device in the same lab, one after the
# other (scripts/bench-lib.sh). For each, iperf3 runs device -> origin (203.0.113.20): 1 stream
# and 4 streams, upload and download. Goodput is what iperf3's receiver counted; CPU is the
# gateway process's user + system time (/proc/PID/stat) over the same interval, per Gbit moved.
#
# Then the device side, in the same run and through the same Waygate gateway: the bundled
# waygate-client in place of wg-quick + wireguard-go (same key and addresses), with the device
# daemon's CPU per Gbit. Then Waygate again with activity logs and metrics on (logs.dir,
# metrics.listen): their cost per Gbit against the run without.
#
# Env: BENCH_SECONDS (default 6) per iperf3 run; BENCH_PREFIX lab prefix (default bn<pid>).
set -Eeuo pipefail
# shellcheck source=scripts/bench-lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/bench-lib.sh"
SECONDS_PER_RUN="${BENCH_SECONDS:-6}"
bench_init bench-throughput

# measure NAME: four iperf3 runs from the device DEV_PID through the gateway GW_PID.
measure() {
  local name="$1" row args c0 c1 d0 d1 json
  for row in "1 up:" "1 down:-R" "4 up:-P 4" "4 down:-P 4 -R"; do
    args="${row#*:}"
    c0="$(cpu_ticks "$GW_PID")"
    d0="$(cpu_ticks "$DEV_PID")"
    # -O 1: the first second is not counted, so both gateways are compared at steady state.
    # shellcheck disable=SC2086
    json="$(ip netns exec "${P}d1" timeout $((SECONDS_PER_RUN + 20)) \
      iperf3 -c 203.0.113.20 -t "$SECONDS_PER_RUN" -O 1 $args -J)" \
      || bench_die "iperf3 through $name ($row) failed"
    c1="$(cpu_ticks "$GW_PID")"
    d1="$(cpu_ticks "$DEV_PID")"
    python3 - "$name" "${row%%:*}" "$c0" "$c1" "$d0" "$d1" "$TCK" "$json" >>"$WORK/results" <<'PY'
import json, sys
name, row, c0, c1, d0, d1, tck, raw = sys.argv[1:]
end = json.loads(raw)["end"]["sum_received"]
gbit = end["bytes"] * 8 / 1e9
cpu = (float(c1) - float(c0)) / float(tck)
dev = (float(d1) - float(d0)) / float(tck)
per = lambda c: f"{c / gbit if gbit else float('inf'):.3f}"
print(f"{name}\t{row}\t{gbit / end['seconds']:.3f}\t{per(cpu)}\t{per(dev)}")
PY
  done
}

waygate_up
echo "bench-throughput: waygate (pid $GW_PID), ${SECONDS_PER_RUN}s per run" >&2
measure waygate
client_up
echo "bench-throughput: waygate-client as the device (pid $DEV_PID)" >&2
measure client
client_down
waygate_down
# The same gateway with activity logs and metrics on (a network line per flow at its close, an
# egress line per flow, /metrics scraped by nobody): their cost on the data plane.
waygate_up -logs "$(printf '[logs]\ndir = "%s"\n[metrics]\nlisten = "127.0.0.1:9391"\n' "$WORK/logs")"
echo "bench-throughput: waygate with logs.dir and metrics.listen (pid $GW_PID)" >&2
measure waygate+logs
waygate_down
reference_up
echo "bench-throughput: reference wireguard-go (pid $GW_PID)" >&2
measure reference

python3 - "$WORK/results" <<'PY'
import sys
rows, dev = {}, {}
for line in open(sys.argv[1]):
    name, row, goodput, cpu, dcpu = line.split("\t")
    rows.setdefault(row, {})[name] = (float(goodput), float(cpu))
    dev.setdefault(row, {})[name] = (float(goodput), float(dcpu))
print(f"{'streams/dir':<12} {'waygate Gbit/s':>14} {'ref Gbit/s':>11} {'ratio':>6}   "
      f"{'waygate CPU-s/Gbit':>18} {'ref CPU-s/Gbit':>14} {'ratio':>6}")
ok = True
for row, r in rows.items():
    (wg, wc), (rg, rc) = r["waygate"], r["reference"]
    gr, cr = wg / rg, wc / rc
    ok &= gr >= 1.0 and cr <= 0.67
    print(f"{row:<12} {wg:>14.3f} {rg:>11.3f} {gr:>6.2f}   {wc:>18.3f} {rc:>14.3f} {cr:>6.2f}")
print("targets: goodput ratio >= 1.00 and CPU ratio <= 0.67 in every row:", "met" if ok else "NOT met")
print()
print("device: waygate-client vs wg-quick + wireguard-go, both through Waygate")
print(f"{'streams/dir':<12} {'client Gbit/s':>13} {'wg-go Gbit/s':>12} {'ratio':>6}   "
      f"{'client CPU-s/Gbit':>17} {'wg-go CPU-s/Gbit':>16} {'ratio':>6}")
ok = True
for row, r in dev.items():
    (cg, cc), (gg, gc) = r["client"], r["waygate"]
    gr, cr = cg / gg, cc / gc
    ok &= gr >= 1.0 and cr <= 0.67
    print(f"{row:<12} {cg:>13.3f} {gg:>12.3f} {gr:>6.2f}   {cc:>17.3f} {gc:>16.3f} {cr:>6.2f}")
print("targets: goodput ratio >= 1.00 and CPU ratio <= 0.67 in every row:", "met" if ok else "NOT met")
print()
print("activity logs and metrics on vs off, both Waygate with wg-quick + wireguard-go")
print(f"{'streams/dir':<12} {'logs Gbit/s':>11} {'off Gbit/s':>10} {'ratio':>6}   "
      f"{'logs CPU-s/Gbit':>15} {'off CPU-s/Gbit':>14} {'cost':>7}")
for row, r in rows.items():
    (lg, lc), (wg, wc) = r["waygate+logs"], r["waygate"]
    print(f"{row:<12} {lg:>11.3f} {wg:>10.3f} {lg / wg:>6.2f}   {lc:>15.3f} {wc:>14.3f} "
          f"{100 * (lc - wc) / wc:>6.1f}%")
PY
