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
#      address), all handshaking, then DNS queries and HTTP fetches (the lab origin's GET /)
#      through the tunnel; the gateway's RSS after, DNS and fetch p50/p99
#   3. enrolled idle devices: 10,000 and 100,000 devices enrolled (one registry transaction),
#      none connected; the gateway's RSS once started and settled
#   4. floods and faults, one wg-quick device (wireguard-go) downloading with iperf3: its
#      goodput alone, under a handshake-initiation flood (wg-flood, 10,000/s of unknown keys
#      answering cookies, from one address) and under garbage datagrams (lab-load, as fast as
#      it sends); a device opening TCP flows without end against its cap; the upstream DNS
#      gone (its packets dropped); the registry locked by another writer, then corrupt
#   5. more floods and faults, the same wg-quick device: its goodput under a flood of its own
#      initiation replayed (wg-flood --replay-key, 10,000/s from 64 source ports) and under
#      unknown keys from 64 ports; DNS queries waiting for a gone upstream against
#      limits.dns_queries_per_device; an egress location gone (two dedicated locations, the
#      chosen one's packets dropped while the device opens a UDP flow every 100 ms: time until
#      new flows leave from the other); UDP flows without end against limits.udp_flows_per_device
#
# Env: BENCH_SECONDS (load seconds, default 10), BENCH_FLOOD_SECONDS (iperf3 seconds, 6), BENCH_DNS_RATE (queries/s, default 2000),
#      BENCH_FETCH_RATE (fetches/s, default 200), BENCH_PREFIX, BENCH_SECTIONS (the sections to
#      run, in this order; default "1 2 4 5 3").
set -Eeuo pipefail
# shellcheck source=scripts/bench-lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/bench-lib.sh"
LOAD_SECONDS="${BENCH_SECONDS:-10}"
DNS_RATE="${BENCH_DNS_RATE:-2000}"
FETCH_RATE="${BENCH_FETCH_RATE:-200}"
bench_init bench-scale
# Without -p: the features the whole workspace unifies, as bench_init builds with, so the two
# builds do not undo each other (with -p waygate-e2e each run rebuilt waygate: 5 min here).
cargo build --release --quiet --bin waygate-load --bin wg-flood --bin lab-load
LOAD="$(dirname "$WAYGATE")/waygate-load"
FLOOD="$(dirname "$WAYGATE")/wg-flood"
LAB_LOAD="$(dirname "$WAYGATE")/lab-load"
FLOOD_SECONDS="${BENCH_FLOOD_SECONDS:-6}"
SECTIONS="${BENCH_SECTIONS:-1 2 4 5 3}"

rss_kb() { awk '/^VmRSS/ {print $2}' "/proc/$1/status"; }
hwm_kb() { awk '/^VmHWM/ {print $2}' "/proc/$1/status"; }

# The lab's DNS origin answers the gateway's resolver.
DNS_TOML='[dns]
upstreams = ["203.0.113.53:53"]'

# gateway_up TAG [EXTRA]: Waygate serving data dir $WORK/data-TAG in the gateway namespace, with
# EXTRA TOML appended to its config; sets GW_PID.
gateway_up() {
  local tag="$1"
  gateway_toml "$WORK/gw-$tag.toml" "$WORK/data-$tag" "${2:-$DNS_TOML}"
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

# The gateway's metrics (sections 4 and 5 serve them here).
METRICS_TOML='[metrics]
listen = "127.0.0.1:9391"'
metric() {
  ip netns exec "${P}gw" curl -fsS --max-time 5 http://127.0.0.1:9391/metrics |
    awk -v k="$1" '$1 == k {v = $2} END {print v + 0}'
}
# goodput: Mbit/s the device receives downloading from the origin for FLOOD_SECONDS.
goodput() {
  ip netns exec "${P}d1" timeout $((FLOOD_SECONDS + 20)) \
    iperf3 -c 203.0.113.20 -t "$FLOOD_SECONDS" -O 1 -R -J |
    python3 -c 'import json,sys; e = json.load(sys.stdin)["end"]["sum_received"]; print(round(e["bytes"] * 8 / 1e6 / e["seconds"]))'
}
ratio() { python3 -c "import sys; print(f'{float(sys.argv[1]) / max(float(sys.argv[2]), 1e-9):.2f}')" "$1" "$2"; }
dig_at() { ip netns exec "${P}d1" dig +tries=1 +time="$1" @100.96.0.1 "$2" A; }
# The lab's DNS origin unreachable from the gateway (its packets dropped in the Internet).
dns_gone() {
  ip netns exec "${P}in" nft -f - <<'EOT'
table inet benchdns {
  chain in {
    type filter hook input priority 0;
    ip daddr 203.0.113.53 drop
  }
}
EOT
}
dns_back() { ip netns exec "${P}in" nft delete table inet benchdns; }

section_1() {

echo "bench-scale: 1. handshake work per core" >&2
json="$("$LOAD" responder --count 1000 --seconds 5)"
echo "$json" >&2
hs="$(python3 -c 'import json,sys; print(json.loads(sys.argv[1])["handshakes_per_sec_per_core"])' "$json")"
row "handshakes/s per core (responder)" "$hs" "target >= 4,000"
}

section_2() {

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
  --bind "$binds" --seconds "$LOAD_SECONDS" --dns-rate "$DNS_RATE" --dns-name a.example \
  --fetch-rate "$FETCH_RATE" --fetch-to 203.0.113.10:80)" \
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
row("HTTP fetches done / started", f"{j['fetched']}/{j['fetches']}", f"errors {j['fetch_errors']}")
row("fetch p50 (ms)", f"{j['fetch_p50_ms']:.3f}", "")
row("fetch p99 (ms)", f"{j['fetch_p99_ms']:.3f}", "")
PY
row "RSS with 1,000 active devices (MB)" "$((rss1 / 1024))" "target < 200 (before the load: $((rss0 / 1024)), peak $((hwm1 / 1024)))"
gateway_down
}

section_4() {
echo "bench-scale: 4. floods and faults" >&2
# A cap far below the default 1,024, so the device reaches it in seconds.
FLOW_CAP=200
waygate_up -flood "$DNS_TOML
$METRICS_TOML
[limits]
tcp_flows_per_device = $FLOW_CAP"
gw_key="$(sed -n 's/^PublicKey = //p' "$WORK/${P}w.conf")"
base="$(goodput)" || bench_die "iperf3 through waygate failed"
row "goodput, nothing else (Mbit/s)" "$base" "1 device, download"
c0="$(cpu_ticks "$GW_PID")"
ip netns exec "${P}d2" "$FLOOD" --gateway-key "$gw_key" --to 198.51.100.1:51820 \
  --rate 10000 --seconds $((FLOOD_SECONDS + 2)) --bind 198.51.100.12:0 >"$WORK/flood.json" &
flood_pid=$!
sleep 1
flooded="$(goodput)" || flooded=0
wait "$flood_pid" || true
c1="$(cpu_ticks "$GW_PID")"
echo "wg-flood: $(cat "$WORK/flood.json")" >&2
row "goodput under a handshake flood (Mbit/s)" "$flooded" "$(ratio "$flooded" "$base") of alone, target >= 0.90 ($(python3 -c 'import json,sys; j = json.load(open(sys.argv[1])); print(j["sent"], "initiations,", j["cookie_replies"], "cookie replies")' "$WORK/flood.json"), gateway CPU $(((c1 - c0) * 100 / TCK / (FLOOD_SECONDS + 2)))%)"
m0="$(metric 'waygate_wireguard_dropped_total{reason="Malformed"}')"
ip netns exec "${P}d2" "$LAB_LOAD" dns-flood 198.51.100.1:51820 --rate 200000 \
  --seconds $((FLOOD_SECONDS + 2)) --garbage --report "$WORK/garbage.txt" &
flood_pid=$!
sleep 1
garbage="$(goodput)" || garbage=0
wait "$flood_pid" || true
m1="$(metric 'waygate_wireguard_dropped_total{reason="Malformed"}')"
row "goodput under garbage datagrams (Mbit/s)" "$garbage" "$(ratio "$garbage" "$base") of alone ($(cut -d' ' -f2 "$WORK/garbage.txt") sent, $((m1 - m0)) counted as malformed)"

d0="$(metric 'waygate_flow_dropped_total{reason="FlowLimit"}')"
ip netns exec "${P}d1" "$LAB_LOAD" hold 203.0.113.10:80 --count $((FLOW_CAP + 5)) --seconds 1 \
  --report "$WORK/hold.txt" >/dev/null 2>&1 || true
d1="$(metric 'waygate_flow_dropped_total{reason="FlowLimit"}')"
row "TCP flows one device opened / tried" "$(awk '{print $2}' "$WORK/hold.txt")/$((FLOW_CAP + 5))" "cap $FLOW_CAP; $((d1 - d0)) SYNs dropped and counted (FlowLimit)"

dig_at 3 a.example >/dev/null
dns_gone
t0="$(date +%s.%N)"
status="$(dig_at 10 "gone$RANDOM.example" | sed -n 's/.*status: \([A-Z]*\).*/\1/p')"
t1="$(date +%s.%N)"
row "upstream DNS gone: answer to a new name" "$status" "in $(python3 -c "import sys; print(f'{float(sys.argv[2]) - float(sys.argv[1]):.2f}')" "$t0" "$t1") s, target SERVFAIL within 2 s"
cached="$(dig_at 2 a.example | sed -n 's/.*status: \([A-Z]*\).*/\1/p;s/;; Query time: \([0-9]*\) msec/\1 ms/p' | tr '\n' ' ')"
row "upstream DNS gone: a cached name" "${cached:-no answer}" "target NOERROR from the cache"
dns_back

db="$WORK/data-flood/registry.db"
# Held past the registry's 10 s busy timeout, so the CLI has to give up.
(echo "BEGIN EXCLUSIVE;"; sleep 13; echo "COMMIT;") | sqlite3 "$db" &
lock_pid=$!
sleep 0.5
t0="$(date +%s.%N)"
"$WAYGATE" --config "$WORK/gw.toml" device enroll --email locked@example.com --name locked \
  >/dev/null 2>"$WORK/locked.err" && enrolled=enrolled || enrolled="refused"
t1="$(date +%s.%N)"
served="$(dig_at 2 a.example | sed -n 's/.*status: \([A-Z]*\).*/\1/p')"
wait "$lock_pid" || true
row "registry locked: enroll" "$enrolled" "in $(python3 -c "import sys; print(f'{float(sys.argv[2]) - float(sys.argv[1]):.1f}')" "$t0" "$t1") s: $(head -c 120 "$WORK/locked.err" | tr '\n' ' '); DNS meanwhile: ${served:-no answer}"
dd if=/dev/urandom of="$db" bs=4096 seek=1 count=8 conv=notrunc status=none
"$WAYGATE" --config "$WORK/gw.toml" device list >/dev/null 2>"$WORK/corrupt.err" && listed=listed || listed=refused
sleep 1
served="$(dig_at 2 a.example | sed -n 's/.*status: \([A-Z]*\).*/\1/p')"
alive=no
ip netns exec "${P}d1" ping -c 1 -W 2 100.96.0.1 >/dev/null && alive=yes
row "registry corrupt: device list" "$listed" "$(head -c 120 "$WORK/corrupt.err" | tr '\n' ' '); gateway still serving: DNS ${served:-no answer}, ping $alive"
waygate_down
}

section_3() {
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
}

section_5() {
  echo "bench-scale: 5. more floods and faults" >&2
  # Caps far below the defaults (1,024 UDP flows), so the device reaches them in seconds; the
  # DNS cap is the default 256.
  local udp_cap=200 dns_cap=256
  # Two dedicated locations on the lab's egress segment, probed every second (the default).
  waygate_up -faults "default = \"dedicated\"
[[egress.locations]]
name = \"loc-a\"
ipv4 = [\"192.0.2.10\"]
health_check = { target = \"203.0.113.10:80\", interval = \"1s\" }
[[egress.locations]]
name = \"loc-b\"
ipv4 = [\"192.0.2.11\"]
health_check = { target = \"203.0.113.10:80\", interval = \"1s\" }
$DNS_TOML
$METRICS_TOML
[limits]
udp_flows_per_device = $udp_cap
dns_queries_per_device = $dns_cap"
  local gw_key dev_key base c0 c1 flooded r0 r1 b0 b1 u0 u1 j
  gw_key="$(sed -n 's/^PublicKey = //p' "$WORK/${P}w.conf")"
  dev_key="$(sed -n 's/^PrivateKey = //p' "$WORK/${P}w.conf")"
  base="$(goodput)" || bench_die "iperf3 through waygate failed"
  row "goodput, nothing else (Mbit/s)" "$base" "1 device, download"

  # The device's own initiation replayed, from 64 source ports.
  r0="$(metric 'waygate_wireguard_dropped_total{reason="ReplayedInitiation"}')"
  b0="$(metric 'waygate_wireguard_dropped_total{reason="BadHandshake"}')"
  c0="$(cpu_ticks "$GW_PID")"
  ip netns exec "${P}d2" "$FLOOD" --gateway-key "$gw_key" --to 198.51.100.1:51820 \
    --replay-key "$dev_key" --sockets 64 --rate 10000 --seconds $((FLOOD_SECONDS + 2)) \
    --bind 198.51.100.12:0 >"$WORK/replay.json" &
  local flood_pid=$!
  sleep 1
  flooded="$(goodput)" || flooded=0
  wait "$flood_pid" || true
  c1="$(cpu_ticks "$GW_PID")"
  r1="$(metric 'waygate_wireguard_dropped_total{reason="ReplayedInitiation"}')"
  b1="$(metric 'waygate_wireguard_dropped_total{reason="BadHandshake"}')"
  echo "wg-flood (replay): $(cat "$WORK/replay.json")" >&2
  j="$(python3 -c 'import json,sys; j = json.load(open(sys.argv[1])); print(j["sent"], "sent at", j["per_second"], end="/s")' "$WORK/replay.json")"
  row "goodput under its initiation replayed (Mbit/s)" "$flooded" "$(ratio "$flooded" "$base") of alone, target >= 0.90 ($j from 64 ports; $((r1 - r0)) dropped as replays before X25519, $((b1 - b0)) refused by timestamp; gateway CPU $(((c1 - c0) * 100 / TCK / (FLOOD_SECONDS + 2)))%)"

  # Unknown keys answering cookies, from 64 source ports of one address.
  u0="$(metric 'waygate_wireguard_dropped_total{reason="UnknownPeer"}')"
  c0="$(cpu_ticks "$GW_PID")"
  ip netns exec "${P}d2" "$FLOOD" --gateway-key "$gw_key" --to 198.51.100.1:51820 \
    --sockets 64 --rate 10000 --seconds $((FLOOD_SECONDS + 2)) --bind 198.51.100.12:0 \
    >"$WORK/ports.json" &
  flood_pid=$!
  sleep 1
  flooded="$(goodput)" || flooded=0
  wait "$flood_pid" || true
  c1="$(cpu_ticks "$GW_PID")"
  u1="$(metric 'waygate_wireguard_dropped_total{reason="UnknownPeer"}')"
  echo "wg-flood (64 ports): $(cat "$WORK/ports.json")" >&2
  j="$(python3 -c 'import json,sys; j = json.load(open(sys.argv[1])); print(j["sent"], "sent at", j["per_second"], end="/s")' "$WORK/ports.json")"
  row "goodput under unknown keys, 64 ports (Mbit/s)" "$flooded" "$(ratio "$flooded" "$base") of alone, target >= 0.90 ($j; $((u1 - u0)) reached X25519; gateway CPU $(((c1 - c0) * 100 / TCK / (FLOOD_SECONDS + 2)))%)"

  # DNS queries for new names while the upstream is gone: each waits up to 1.8 s for it.
  local l0 l1 sent servfail
  dns_gone
  l0="$(metric 'waygate_dns_client_limited_total')"
  ip netns exec "${P}d1" "$LAB_LOAD" dns-flood 100.96.0.1:53 --rate 1000 --seconds 3 \
    --report "$WORK/dnswait.txt" || true
  sleep 2
  l1="$(metric 'waygate_dns_client_limited_total')"
  dns_back
  sent="$(awk '{print $2}' "$WORK/dnswait.txt")"
  servfail="$(awk '{print $6}' "$WORK/dnswait.txt")"
  row "DNS queries for a gone upstream: capped" "$((l1 - l0))/$sent" "cap $dns_cap waiting per device; the rest SERVFAIL at once, counted (waygate_dns_client_limited_total); $servfail SERVFAIL seen in 3 s"

  # An egress location gone: the chosen one's packets dropped in the Internet.
  local chosen other t0 moved
  chosen="$(ip netns exec "${P}d1" "$LAB_ORIGIN" udp-probe 203.0.113.30:8 |
    python3 -c 'import json,sys; print(json.load(sys.stdin)["src"])')" || bench_die "no whoami answer"
  case "$chosen" in
    192.0.2.10) other=192.0.2.11 ;;
    192.0.2.11) other=192.0.2.10 ;;
    *) bench_die "flows leave from $chosen, not a dedicated location" ;;
  esac
  ip netns exec "${P}d1" "$LAB_LOAD" egress-watch 203.0.113.30:8 --seconds 9 --every-ms 100 \
    --report "$WORK/egress.txt" &
  local watch_pid=$!
  sleep 3
  t0="$(date +%s.%N)"
  ip netns exec "${P}in" nft -f - <<EOT
table inet benchegress {
  chain in {
    type filter hook input priority 0;
    ip saddr $chosen drop
  }
}
EOT
  wait "$watch_pid" || true
  ip netns exec "${P}in" nft delete table inet benchegress
  moved="$(python3 - "$WORK/egress.txt" "$t0" "$chosen" "$other" <<'PY'
import sys
rows = [l.split() for l in open(sys.argv[1]) if l.strip()]
t0, chosen, other = float(sys.argv[2]), sys.argv[3], sys.argv[4]
before = sum(1 for t, s in rows if float(t) < t0 and s == chosen)
after = [(float(t), s) for t, s in rows if float(t) >= t0]
first = next((t for t, s in after if s == other), None)
if first is None:
    print(f"never   {before} flows from {chosen} before; none from {other} after")
else:
    lost = sum(1 for t, s in after if t < first)
    stayed = sum(1 for t, s in after if t > first and s != other)
    print(f"{first - t0:.2f}   from {chosen} to {other}; {lost} new flows lost meanwhile, {stayed} later ones not from {other}")
PY
)"
  row "egress location gone: new flows moved (s)" "${moved%%   *}" "${moved#*   }; target < 3 s (probe every 1 s, down after 2 failures of 0.7 s)"

  # UDP flows without end: one datagram to the lab's echo from each of ever new source ports.
  local f0 f1 held0 held1 tried
  tried=$((udp_cap + 5))
  held0="$(metric 'waygate_flows_open{protocol="udp"}')"
  f0="$(metric 'waygate_flow_dropped_total{reason="FlowLimit"}')"
  ip netns exec "${P}d1" "$LAB_LOAD" udp-spray 203.0.113.30:7 --count "$tried" \
    --report "$WORK/spray.txt" || true
  f1="$(metric 'waygate_flow_dropped_total{reason="FlowLimit"}')"
  held1="$(metric 'waygate_flows_open{protocol="udp"}')"
  row "UDP flows one device held / cap" "$held1/$udp_cap" "$held0 open before; $tried new tried, $(awk '{print $4}' "$WORK/spray.txt") answered, $((f1 - f0)) dropped and counted (FlowLimit)"
  waygate_down
}

for section in $SECTIONS; do
  case "$section" in
    1 | 2 | 3 | 4 | 5) "section_$section" ;;
    *) bench_die "BENCH_SECTIONS: no section $section" ;;
  esac
done

echo
echo "== bench-scale results"
cat "$WORK/results"
