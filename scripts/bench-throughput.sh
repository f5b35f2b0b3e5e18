#!/usr/bin/env bash
# TCP goodput through Waygate and through the gateway a user would otherwise build, in one run.
#
#   scripts/bench-throughput.sh            (as root; builds the release binaries first)
#
# Both gateways run in the same lab (scripts/lab.sh) and serve the same device (namespace <P>d1,
# wg-quick + wireguard-go), one after the other:
#   waygate    `waygate serve`, egress.default_ipv4 = 192.0.2.1
#   reference  wireguard-go on the gateway + kernel forwarding + nftables masquerade out of eg0
# For each gateway, iperf3 runs device -> origin (203.0.113.20): 1 stream and 4 streams, upload and
# download. Goodput is what iperf3's receiver counted; CPU is the gateway process's user + system
# time (/proc/PID/stat) over the same interval, reported per Gbit moved.
#
# Env: BENCH_SECONDS (default 6) per iperf3 run; BENCH_PREFIX lab prefix (default bt<pid>).
set -Eeuo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
SECONDS_PER_RUN="${BENCH_SECONDS:-6}"
P="${BENCH_PREFIX:-bt$(($$ % 100000))}"
LAB="$ROOT/scripts/lab.sh"

die() { echo "bench-throughput: $*" >&2; exit 1; }
[ "$(id -u)" -eq 0 ] || die "needs root (network namespaces)"
for tool in iperf3 wg wg-quick wireguard-go nft python3; do
  command -v "$tool" >/dev/null || die "missing $tool (scripts/install-deps.sh installs it)"
done

cd "$ROOT"
cargo build --release --quiet --bin waygate --bin lab-origin
TARGET="$(cargo metadata --format-version 1 --no-deps | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')"
WAYGATE="$TARGET/release/waygate"
export LAB_ORIGIN="$TARGET/release/lab-origin"

WORK="$(mktemp -d /tmp/waygate-bench.XXXXXX)"
cleanup() {
  "$LAB" down "$P" >/dev/null 2>&1 || true
  rm -rf "$WORK"
}
trap cleanup EXIT
"$LAB" up "$P" >/dev/null

TCK="$(getconf CLK_TCK)"
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }

# measure NAME PID: four iperf3 runs from the device; appends rows to $WORK/results.
measure() {
  local name="$1" pid="$2" row args c0 c1 json
  for row in "1 up:" "1 down:-R" "4 up:-P 4" "4 down:-P 4 -R"; do
    args="${row#*:}"
    # One warm-up second, not counted, so both gateways are compared at steady state.
    c0="$(cpu_ticks "$pid")"
    # shellcheck disable=SC2086
    json="$(ip netns exec "${P}d1" timeout $((SECONDS_PER_RUN + 20)) \
      iperf3 -c 203.0.113.20 -t "$SECONDS_PER_RUN" -O 1 $args -J)" \
      || die "iperf3 through $name ($row) failed"
    c1="$(cpu_ticks "$pid")"
    python3 - "$name" "${row%%:*}" "$c0" "$c1" "$TCK" "$json" >>"$WORK/results" <<'EOF'
import json, sys
name, row, c0, c1, tck, raw = sys.argv[1:]
end = json.loads(raw)["end"]["sum_received"]
gbit = end["bytes"] * 8 / 1e9
cpu = (float(c1) - float(c0)) / float(tck)
print(f"{name}\t{row}\t{gbit / end['seconds']:.3f}\t{cpu / gbit if gbit else float('inf'):.3f}")
EOF
  done
}

# --- Waygate -------------------------------------------------------------------------------------
cat >"$WORK/gw.toml" <<EOF
data_dir = "$WORK/data"
[wireguard]
listen = "198.51.100.1:51820"
public_endpoint = "198.51.100.1:51820"
interface_name = "${P}gw"
[egress]
default_ipv4 = "192.0.2.1"
EOF
"$WAYGATE" --config "$WORK/gw.toml" device enroll --email bench@example.com --name bench \
  >"$WORK/${P}w.conf" 2>"$WORK/enroll.log" || die "enroll failed: $(cat "$WORK/enroll.log")"
sed -i '/^DNS/d' "$WORK/${P}w.conf"
ip netns exec "${P}gw" env WAYGATE_LOG=warn "$WAYGATE" --config "$WORK/gw.toml" serve \
  >"$WORK/waygate.log" 2>&1 &
WAYGATE_PID=$!
"$LAB" record-pid "$P" "$WAYGATE_PID" waygate
"$LAB" device-up "$P" d1 "$WORK/${P}w.conf" >/dev/null
ip netns exec "${P}d1" ping -c 1 -W 5 100.96.0.1 >/dev/null || die "no tunnel to waygate"
echo "bench-throughput: waygate (pid $WAYGATE_PID), ${SECONDS_PER_RUN}s per run" >&2
measure waygate "$WAYGATE_PID"
"$LAB" device-down "$P" d1 "$WORK/${P}w.conf" >/dev/null
kill "$WAYGATE_PID"
wait "$WAYGATE_PID" 2>/dev/null || true

# --- Reference: wireguard-go + forwarding + masquerade --------------------------------------------
GW_KEY="$(wg genkey)"
DEV_KEY="$(wg genkey)"
cat >"$WORK/${P}r.conf" <<EOF
[Interface]
PrivateKey = $GW_KEY
ListenPort = 51821
Address = 100.111.0.1/24

[Peer]
PublicKey = $(echo "$DEV_KEY" | wg pubkey)
AllowedIPs = 100.111.0.2/32
EOF
cat >"$WORK/${P}d.conf" <<EOF
[Interface]
PrivateKey = $DEV_KEY
Address = 100.111.0.2/32
MTU = 1420

[Peer]
PublicKey = $(echo "$GW_KEY" | wg pubkey)
Endpoint = 198.51.100.1:51821
AllowedIPs = 0.0.0.0/0
PersistentKeepalive = 25
EOF
ip netns exec "${P}gw" sysctl -qw net.ipv4.ip_forward=1
ip netns exec "${P}gw" nft -f - <<EOF
table ip benchnat {
  chain post {
    type nat hook postrouting priority srcnat;
    ip saddr 100.111.0.0/24 oifname "eg0" masquerade
  }
}
EOF
REF_PID="$("$LAB" device-up "$P" gw "$WORK/${P}r.conf")"
"$LAB" device-up "$P" d1 "$WORK/${P}d.conf" >/dev/null
ip netns exec "${P}d1" ping -c 1 -W 5 100.111.0.1 >/dev/null || die "no tunnel to the reference"
echo "bench-throughput: reference wireguard-go (pid $REF_PID)" >&2
measure reference "$REF_PID"

# --- Report ---------------------------------------------------------------------------------------
python3 - "$WORK/results" <<'EOF'
import sys
rows = {}
for line in open(sys.argv[1]):
    name, row, goodput, cpu = line.split("\t")
    rows.setdefault(row, {})[name] = (float(goodput), float(cpu))
print(f"{'streams/dir':<12} {'waygate Gbit/s':>14} {'ref Gbit/s':>11} {'ratio':>6}   "
      f"{'waygate CPU-s/Gbit':>18} {'ref CPU-s/Gbit':>14} {'ratio':>6}")
ok = True
for row, r in rows.items():
    (wg, wc), (rg, rc) = r["waygate"], r["reference"]
    gr, cr = wg / rg, wc / rc
    ok &= gr >= 1.0 and cr <= 0.67
    print(f"{row:<12} {wg:>14.3f} {rg:>11.3f} {gr:>6.2f}   {wc:>18.3f} {rc:>14.3f} {cr:>6.2f}")
print("targets: goodput ratio >= 1.00 and CPU ratio <= 0.67 in every row:", "met" if ok else "NOT met")
EOF
