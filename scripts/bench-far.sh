#!/usr/bin/env bash
# TCP goodput to and from far devices: Waygate and the reference gateway behind an emulated path,
# in one run.
#
#   scripts/bench-far.sh            (as root; builds the release binaries first)
#
# The device dials a relay (lab-delay, in the gateway's namespace) that stands for the path
# between a real device and its gateway. Rows:
#
#   RTT 10, 40, 100 ms          a clean path
#   40 ms, 0.5% loss            random loss in each direction
#   40 ms, 100 Mbit/s, 50 ms    a home or mobile access link: a bottleneck with a 50 ms queue
#
# For each row and each gateway, iperf3 runs device <-> origin (203.0.113.20): 1 and 4 streams,
# upload and download. Goodput is what iperf3's receiver counted; CPU is the gateway process's
# user + system time per Gbit moved (for the reference, wireguard-go's; kernel forwarding is not
# counted, which flatters the reference). In the bottleneck row the device pings the gateway's
# tunnel address during the 4-stream download: the median RTT under load shows the queue a
# gateway builds in the bottleneck (bufferbloat).
#
# Then, for Waygate only, MANY downloads at once from the one device at 40 ms (two iperf3 clients,
# -P up to 100 each): the gateway's peak resident memory while they run (issue 15: under 150 MB
# for 200), and their summed goodput.
#
# Env: BENCH_SECONDS (default 8) per iperf3 run; BENCH_ROWS (default all) a space-separated subset
# of the row names below; BENCH_MANY (default 200, 0: skip) concurrent downloads of the memory
# row; BENCH_ONLY=waygate skips the reference (no verdict; for quick looks); BENCH_PREFIX lab
# prefix; BENCH_RUNS (default all) a subset of "1up 1down 4up 4down"; BENCH_CAPTURE=DIR keeps,
# for each run of either gateway, the TCP headers seen on the device's tunnel interface
# (DIR/GATEWAY-ROW-RUN.pcap, the decrypted segments as the device's kernel saw them), iperf3's
# JSON (...-iperf3.json) and the device's /proc/net/{snmp,netstat} before and after
# (...-{before,after}.txt), and the gateway namespace's (...-gw-{before,after}.txt: the relay's
# and the gateway's UDP sockets: RcvbufErrors, and /proc/net/udp's drops per socket).
set -Eeuo pipefail
# shellcheck source=scripts/bench-lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/bench-lib.sh"
SECONDS_PER_RUN="${BENCH_SECONDS:-8}"
RELAY=198.51.100.1:51900
export BENCH_ENDPOINT=$RELAY

# name|lab-delay flags (one-way delay: half the RTT)
ALL_ROWS=(
  "rtt10|--delay-ms 5"
  "rtt40|--delay-ms 20"
  "rtt100|--delay-ms 50"
  "rtt40-loss0.5|--delay-ms 20 --loss-up 0.5 --loss-down 0.5"
  "rtt40-100mbit-q50|--delay-ms 20 --rate-mbit 100 --queue-ms 50"
)
ROWS=()
for row in "${ALL_ROWS[@]}"; do
  if [ -z "${BENCH_ROWS:-}" ] || [[ " $BENCH_ROWS " == *" ${row%%|*} "* ]]; then ROWS+=("$row"); fi
done
[ ${#ROWS[@]} -gt 0 ] || { echo "bench-far: no row matches BENCH_ROWS=$BENCH_ROWS" >&2; exit 2; }

bench_init bench-far
RELAY_PID=
# Each iperf3 run gets a one-off server of its own (-1, a fresh port): a run that stalls and is
# killed leaves a shared server busy, and every run after it would fail too.
IPERF_PORT=5300

# iperf_server: starts a one-off iperf3 server on the origin; sets IPERF_PORT and IPERF_PID.
iperf_server() {
  IPERF_PORT=$((IPERF_PORT + 1))
  ip netns exec "${P}in" iperf3 -s -1 -B 203.0.113.20 -p "$IPERF_PORT" >/dev/null 2>&1 &
  IPERF_PID=$!
  "$LAB" record-pid "$P" "$IPERF_PID" "iperf3-$IPERF_PORT"
  local i
  for i in $(seq 1 50); do
    ip netns exec "${P}in" ss -Hltn "sport = :$IPERF_PORT" | grep -q . && return 0
    sleep 0.05
  done
  bench_die "iperf3 server on port $IPERF_PORT did not start"
}

# relay_start PORT FLAGS...: lab-delay in front of the gateway listening on PORT.
relay_start() {
  local port="$1"
  shift
  ip netns exec "${P}gw" "$LAB_DELAY" --listen "$RELAY" --to "198.51.100.1:$port" "$@" \
    2>>"$WORK/relay.log" &
  RELAY_PID=$!
  "$LAB" record-pid "$P" "$RELAY_PID" lab-delay
  sleep 0.2
}

relay_stop() {
  [ -n "$RELAY_PID" ] || return 0
  kill "$RELAY_PID" 2>/dev/null || true
  wait "$RELAY_PID" 2>/dev/null || true
  RELAY_PID=
}

# measure NAME PORT TUNNEL_ADDR: every row through the gateway listening on PORT.
measure() {
  local name="$1" port="$2" tunnel="$3" row label flags run args c0 c1 json ping_pid tag cap cap_pid dev_if
  for row in "${ROWS[@]}"; do
    label="${row%%|*}"
    flags="${row#*|}"
    relay_stop
    printf '%s %s: ' "$name" "$label" >>"$WORK/relay.log"
    # shellcheck disable=SC2086
    relay_start "$port" $flags
    # Let the tunnel find the new relay (the device's next packet teaches it the way back).
    ip netns exec "${P}d1" ping -c 3 -i 0.3 -W 2 "$tunnel" >/dev/null 2>&1 || true
    for run in "1 up:" "1 down:-R" "4 up:-P 4" "4 down:-P 4 -R"; do
      args="${run#*:}"
      tag="${run%%:*}"
      tag="${tag// /}"
      if [ -n "${BENCH_RUNS:-}" ] && [[ " $BENCH_RUNS " != *" $tag "* ]]; then continue; fi
      ping_pid=
      if [[ $label == *mbit* && $run == "4 down:"* ]]; then
        ip netns exec "${P}d1" ping -i 0.2 -w $((SECONDS_PER_RUN + 1)) "$tunnel" \
          >"$WORK/ping-$name-$label" 2>&1 &
        ping_pid=$!
      fi
      iperf_server
      cap_pid=
      if [ -n "${BENCH_CAPTURE:-}" ]; then
        mkdir -p "$BENCH_CAPTURE"
        cap="$BENCH_CAPTURE/$name-$label-$tag"
        ip netns exec "${P}d1" cat /proc/net/snmp /proc/net/netstat >"$cap-before.txt"
        ip netns exec "${P}gw" cat /proc/net/snmp /proc/net/netstat /proc/net/udp >"$cap-gw-before.txt"
        # The device's tunnel is named after its wg-quick file (bench-lib.sh).
        dev_if="${P}w"
        [ "$name" = waygate ] || dev_if="${P}d"
        ip netns exec "${P}d1" tcpdump -i "$dev_if" -s 120 -w "$cap.pcap" tcp 2>/dev/null &
        cap_pid=$!
        "$LAB" record-pid "$P" "$cap_pid" tcpdump
        sleep 0.5
      fi
      c0="$(cpu_ticks "$GW_PID")"
      # -O 1: the first second is not counted (slow start is the same for both gateways).
      # shellcheck disable=SC2086
      json="$(ip netns exec "${P}d1" timeout $((SECONDS_PER_RUN + 30)) \
        iperf3 -c 203.0.113.20 -p "$IPERF_PORT" -t "$SECONDS_PER_RUN" -O 1 $args -J 2>/dev/null)" \
        || true  # a failed run's JSON says why (below)
      c1="$(cpu_ticks "$GW_PID")"
      if [ -n "$cap_pid" ]; then
        printf '%s\n' "$json" >"$cap-iperf3.json"
        ip netns exec "${P}d1" cat /proc/net/snmp /proc/net/netstat >"$cap-after.txt"
        ip netns exec "${P}gw" cat /proc/net/snmp /proc/net/netstat /proc/net/udp >"$cap-gw-after.txt"
        kill "$cap_pid" 2>/dev/null || true
        wait "$cap_pid" 2>/dev/null || true
      fi
      kill "$IPERF_PID" 2>/dev/null || true
      wait "$IPERF_PID" 2>/dev/null || true
      [ -z "$ping_pid" ] || wait "$ping_pid" 2>/dev/null || true
      python3 - "$name" "$label" "${run%%:*}" "$c0" "$c1" "$TCK" "$json" \
        "$WORK/ping-$name-$label" >>"$WORK/results" <<'PY'
import json, os, re, statistics, sys
name, label, run, c0, c1, tck, raw, ping_file = sys.argv[1:]
try:
    end = json.loads(raw)["end"]["sum_received"]
    gbit, secs = end["bytes"] * 8 / 1e9, end["seconds"]
except (ValueError, KeyError):
    gbit, secs = 0.0, 1.0  # iperf3 failed or stalled past its timeout: no goodput
    try:
        why = json.loads(raw).get("error", "no result")
    except ValueError:
        why = "no JSON (timed out?)"
    print(f"bench-far: {name} {label} {run}: iperf3 failed: {why}", file=sys.stderr)
cpu = (float(c1) - float(c0)) / float(tck)
rtt = ""
if run == "4 down" and os.path.exists(ping_file):
    times = [float(t) for t in re.findall(r"time=([0-9.]+)", open(ping_file).read())]
    rtt = f"{statistics.median(times):.1f}" if times else "lost"
cpu_per_gbit = cpu / gbit if gbit else float("inf")
# Full precision: at a 100 Mbit/s bottleneck both gateways deliver 0.093-0.094 Gbit/s, and
# ratios of numbers rounded to three places moved in steps of 1%.
print(f"{name}\t{label}\t{run}\t{gbit / secs:.6f}\t{cpu_per_gbit:.6f}\t{rtt}")
PY
    done
  done
  relay_stop
}

# many_downloads PORT: BENCH_MANY concurrent downloads at 40 ms through the gateway on PORT; prints
# the gateway's peak RSS (VmRSS sampled every 0.2 s) and the summed goodput.
many_downloads() {
  local port="$1" many="${BENCH_MANY:-200}" left clients=() pids=() n i peak=0 rss json total=0
  [ "$many" -gt 0 ] || return 0
  relay_stop
  printf 'waygate %s downloads: ' "$many" >>"$WORK/relay.log"
  relay_start "$port" --delay-ms 20
  ip netns exec "${P}d1" ping -c 3 -i 0.3 -W 2 100.96.0.1 >/dev/null 2>&1 || true
  left="$many"
  while [ "$left" -gt 0 ]; do
    n=$((left < 100 ? left : 100))
    left=$((left - n))
    iperf_server
    ip netns exec "${P}d1" timeout $((SECONDS_PER_RUN + 30)) iperf3 -c 203.0.113.20 \
      -p "$IPERF_PORT" -t "$SECONDS_PER_RUN" -P "$n" -R -J >"$WORK/many-$IPERF_PORT.json" 2>/dev/null &
    clients+=("$WORK/many-$IPERF_PORT.json")
    pids+=($! "$IPERF_PID")
  done
  for i in $(seq 1 $(((SECONDS_PER_RUN + 2) * 5))); do
    rss="$(awk '/^VmRSS/ {print $2}' "/proc/$GW_PID/status")"
    [ "$rss" -gt "$peak" ] && peak="$rss"
    sleep 0.2
  done
  for i in "${pids[@]}"; do wait "$i" 2>/dev/null || true; done
  total="$(python3 - "${clients[@]}" <<'PY'
import json, sys
gbit = 0.0
for path in sys.argv[1:]:
    try:
        end = json.load(open(path))["end"]["sum_received"]
        gbit += end["bytes"] * 8 / 1e9 / end["seconds"]
    except (ValueError, KeyError, OSError):
        pass
print(f"{gbit:.3f}")
PY
)"
  echo "bench-far: waygate, $many downloads at rtt40: peak RSS $((peak / 1024)) MB, goodput $total Gbit/s" >&2
  relay_stop
}

# The tunnel comes up through a plain relay; measure() puts each row's relay in its place.
printf 'waygate setup: ' >>"$WORK/relay.log"
relay_start 51820 --delay-ms 5
waygate_up
echo "bench-far: waygate (pid $GW_PID), ${SECONDS_PER_RUN}s per run, rows: ${ROWS[*]%%|*}" >&2
measure waygate 51820 100.96.0.1
many_downloads 51820
waygate_down
if [ "${BENCH_ONLY:-}" != waygate ]; then
  printf 'reference setup: ' >>"$WORK/relay.log"
  relay_start 51821 --delay-ms 5
  reference_up
  echo "bench-far: reference wireguard-go (pid $GW_PID)" >&2
  measure reference 51821 100.111.0.1
fi
# What the relay dropped on purpose, per gateway and row (a lossy row's loss is the relay's).
grep -h "lab-delay:" "$WORK/relay.log" | sed 's/^/bench-far: relay /' >&2 || true

python3 - "$WORK/results" <<'PY'
import sys
rows = {}
for line in open(sys.argv[1]):
    name, label, run, goodput, cpu, rtt = line.rstrip("\n").split("\t")
    rows.setdefault((label, run), {})[name] = (float(goodput), float(cpu), rtt)
print(f"{'path':<18} {'streams/dir':<11} {'waygate Gbit/s':>14} {'ref Gbit/s':>10} {'ratio':>6}   "
      f"{'waygate CPU-s/Gbit':>18} {'ref CPU-s/Gbit':>14} {'ratio':>6}   {'ping under load ms (wg/ref)':>27}")
ok = True
for (label, run), r in rows.items():
    if "reference" not in r:  # BENCH_ONLY=waygate: no comparison, no verdict
        wg, wc, _ = r["waygate"]
        ok = None
        print(f"{label:<18} {run:<11} {wg:>14.4f} {'-':>10} {'-':>6}   {wc:>18.3f}")
        continue
    (wg, wc, wr), (rg, rc, rr) = r["waygate"], r["reference"]
    gr = wg / rg if rg else float("inf")
    cr = wc / rc if rc not in (0.0, float("inf")) else float("inf")
    ok &= gr >= 1.0 and cr <= 0.67
    ping = f"{wr} / {rr}" if wr or rr else ""
    if wr and rr:
        try:
            ok &= float(wr) <= float(rr)
        except ValueError:
            ok = False
    print(f"{label:<18} {run:<11} {wg:>14.4f} {rg:>10.4f} {gr:>6.3f}   "
          f"{wc:>18.3f} {rc:>14.3f} {cr:>6.3f}   {ping:>27}")
if ok is None:
    print("targets: not judged (BENCH_ONLY=waygate ran no reference)")
else:
    print("targets: goodput ratio >= 1.00, CPU ratio <= 0.67 in every row, and ping under load "
          "no worse than the reference:", "met" if ok else "NOT met")
PY
