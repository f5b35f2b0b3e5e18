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
# Then several devices at once: four wg-quick devices (d1-d4), one iperf3 stream each, upload and
# download, through Waygate with wireguard.threads = 1 and with one shard per core, in the same
# run, the shards steered by the kernel (the default) and by one reader handing off
# (wireguard.steering = "reader"); each row says how many shards the gateway ran (its threads
# named waygate-shard, plus the main thread's).
#
# Env: BENCH_SECONDS (default 6) per iperf3 run; BENCH_PREFIX lab prefix (default bn<pid>);
# BENCH_ONLY=multi runs only the multi-device rows; BENCH_MULTI=0 leaves them out.
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

# multi THREADS: MULTI_DEVICES wg-quick devices through Waygate with wireguard.threads = THREADS,
# one iperf3 stream each to a server of its own, all at once; goodput summed over the devices.
MULTI_DEVICES=4
multi() {
  local threads="$1" steering="${2:-kernel}" i row args c0 c1 shards pids
  export BENCH_WG_EXTRA="threads = $threads
steering = \"$steering\""
  # The other devices are enrolled before the gateway starts (waygate_up enrolls d1 in the same
  # data dir), so each one's first handshake meets a gateway that already knows it.
  gateway_toml "$WORK/gw.toml" "$WORK/data-t$threads-$steering"
  for i in $(seq 2 "$MULTI_DEVICES"); do
    "$WAYGATE" --config "$WORK/gw.toml" device enroll --email "bench$i@example.com" \
      --name "bench$i" >"$WORK/${P}w$i.conf" 2>"$WORK/enroll.log" \
      || bench_die "enroll failed: $(cat "$WORK/enroll.log")"
    sed -i '/^DNS/d' "$WORK/${P}w$i.conf"
  done
  waygate_up "-t$threads-$steering"
  unset BENCH_WG_EXTRA
  for i in $(seq 2 "$MULTI_DEVICES"); do
    "$LAB" device-up "$P" "d$i" "$WORK/${P}w$i.conf" >/dev/null
    # wireguard-go retries an unanswered initiation after 5 s, so one ping may not be enough.
    ip netns exec "${P}d$i" ping -c 1 -w 12 100.96.0.1 >/dev/null || bench_die "no tunnel from d$i: $(tail -5 "$WORK/waygate.log")"
  done
  shards=$((1 + $(cat /proc/"$GW_PID"/task/*/comm | grep -c '^waygate-shard' || true)))
  echo "bench-throughput: waygate wireguard.threads = $threads, steering $steering ($shards shards, pid $GW_PID), $MULTI_DEVICES devices" >&2
  for row in "up:" "down:-R"; do
    args="${row#*:}"
    c0="$(cpu_ticks "$GW_PID")"
    pids=()
    for i in $(seq 1 "$MULTI_DEVICES"); do
      # shellcheck disable=SC2086
      ip netns exec "${P}d$i" timeout $((SECONDS_PER_RUN + 20)) iperf3 -c 203.0.113.20 \
        -p $((5200 + i)) -t "$SECONDS_PER_RUN" -O 1 $args -J >"$WORK/multi$i.json" &
      pids+=($!)
    done
    for i in $(seq 1 "$MULTI_DEVICES"); do
      wait "${pids[$((i - 1))]}" || bench_die "iperf3 ($MULTI_DEVICES devices, $row) failed on d$i: $(grep -o '"error":.*' "$WORK/multi$i.json" || echo "no JSON (timed out?)")"
    done
    c1="$(cpu_ticks "$GW_PID")"
    python3 - "$threads" "$shards" "${row%%:*}" "$c0" "$c1" "$TCK" "$steering" "$WORK"/multi[0-9]*.json \
      >>"$WORK/multi" <<'PY'
import json, sys
threads, shards, row, c0, c1, tck, steering, *files = sys.argv[1:]
ends = [json.load(open(f))["end"]["sum_received"] for f in files]
gbit = sum(e["bytes"] for e in ends) * 8 / 1e9
seconds = max(e["seconds"] for e in ends)
cpu = (float(c1) - float(c0)) / float(tck)
print(f"{threads}\t{shards}\t{steering}\t{row}\t{gbit / seconds:.3f}\t{cpu / gbit if gbit else float('inf'):.3f}")
PY
  done
  for i in $(seq 2 "$MULTI_DEVICES"); do
    "$LAB" device-down "$P" "d$i" "$WORK/${P}w$i.conf" >/dev/null
  done
  waygate_down
}

if [ "${BENCH_ONLY:-}" = multi ]; then
  : >"$WORK/results"
else
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
reference_down
fi

: >"$WORK/multi"
if [ "${BENCH_ONLY:-}" = multi ] || [ "${BENCH_MULTI:-1}" = 1 ]; then
  for i in $(seq 3 "$MULTI_DEVICES"); do "$LAB" add-device "$P" "$i"; done
  for i in $(seq 2 "$MULTI_DEVICES"); do
    ip netns exec "${P}in" iperf3 -s -B 203.0.113.20 -p $((5200 + i)) >/dev/null 2>&1 &
    "$LAB" record-pid "$P" $! iperf3-$i
  done
  sleep 0.5
  multi 1
  multi "$(nproc)"
  multi "$(nproc)" reader
fi

python3 - "$WORK/results" "$WORK/multi" "$MULTI_DEVICES" <<'PY'
import sys
multi = {}
for line in open(sys.argv[2]):
    threads, shards, steering, row, goodput, cpu = line.split("\t")
    multi.setdefault(row, []).append((int(threads), int(shards), steering, float(goodput), float(cpu)))
print(f"{sys.argv[3]} devices at once, one stream each: Waygate single-threaded vs sharded (kernel"
      " steering, and one reader handing off), same run")
print(f"{'dir':<5} {'threads':>7} {'shards':>6} {'steering':>8} {'Gbit/s':>7} {'CPU-s/Gbit':>10} {'vs 1 thread':>11}")
ok = True
for row, runs in multi.items():
    base = runs[0][3]
    for threads, shards, steering, goodput, cpu in runs:
        ratio = goodput / base if base else 0.0
        if steering == "kernel":
            ok &= ratio >= 0.95
        print(f"{row:<5} {threads:>7} {shards:>6} {steering:>8} {goodput:>7.3f} {cpu:>10.3f} {ratio:>11.2f}")
print("target: sharded goodput (kernel steering, the default) no worse than one thread (ratio >= 0.95, run-to-run noise):",
      "met" if ok else "NOT met")
print()
rows, dev = {}, {}
for line in open(sys.argv[1]):
    name, row, goodput, cpu, dcpu = line.split("\t")
    rows.setdefault(row, {})[name] = (float(goodput), float(cpu))
    dev.setdefault(row, {})[name] = (float(goodput), float(dcpu))
if not rows:
    sys.exit(0)
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
