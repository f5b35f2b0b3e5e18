# Shared by the lab benchmarks (source it): one lab, one device in <P>d1, and the two gateways
# compared: Waygate, and the setup a user would otherwise build (wireguard-go on the gateway,
# kernel forwarding, nftables masquerade out of eg0).
#
# bench_init NAME   checks root and tools, builds the release binaries, brings the lab up and
#                   arranges its teardown on exit; sets P, WORK, WAYGATE, LAB_ORIGIN, LAB
# waygate_up        Waygate serving the device; sets GW_PID
# waygate_down      the device's tunnel and Waygate gone
# reference_up      the reference gateway serving the device; sets GW_PID
# cpu_ticks PID     user + system clock ticks of PID so far (TCK ticks per second)
#
# BENCH_ENDPOINT (HOST:PORT), when set, is the Endpoint the device dials for either gateway (a
# relay in front of it, as scripts/bench-far.sh puts there).

bench_die() { echo "${BENCH_NAME:-bench}: $*" >&2; exit 1; }

bench_init() {
  BENCH_NAME="$1"
  ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
  P="${BENCH_PREFIX:-bn$(($$ % 100000))}"
  LAB="$ROOT/scripts/lab.sh"
  [ "$(id -u)" -eq 0 ] || bench_die "needs root (network namespaces)"
  local tool
  for tool in iperf3 wg wg-quick wireguard-go nft python3; do
    command -v "$tool" >/dev/null || bench_die "missing $tool (scripts/install-deps.sh installs it)"
  done
  cd "$ROOT"
  cargo build --release --quiet --bin waygate --bin lab-origin --bin lab-connrate --bin lab-delay
  local target
  target="$(cargo metadata --format-version 1 --no-deps | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')"
  WAYGATE="$target/release/waygate"
  LAB_CONNRATE="$target/release/lab-connrate"
  LAB_DELAY="$target/release/lab-delay"
  export LAB_ORIGIN="$target/release/lab-origin"
  WORK="$(mktemp -d "/tmp/waygate-$BENCH_NAME.XXXXXX")"
  trap bench_cleanup EXIT
  "$LAB" up "$P" >/dev/null
  TCK="$(getconf CLK_TCK)"
}

bench_cleanup() {
  "$LAB" down "$P" >/dev/null 2>&1 || true
  rm -rf "$WORK"
}

cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }

waygate_up() {
  cat >"$WORK/gw.toml" <<EOT
data_dir = "$WORK/data"
[wireguard]
listen = "198.51.100.1:51820"
public_endpoint = "198.51.100.1:51820"
interface_name = "${P}gw"
[egress]
default_ipv4 = "192.0.2.1"
EOT
  "$WAYGATE" --config "$WORK/gw.toml" device enroll --email bench@example.com --name bench \
    >"$WORK/${P}w.conf" 2>"$WORK/enroll.log" || bench_die "enroll failed: $(cat "$WORK/enroll.log")"
  sed -i '/^DNS/d' "$WORK/${P}w.conf"
  if [ -n "${BENCH_ENDPOINT:-}" ]; then
    sed -i "s/^Endpoint = .*/Endpoint = $BENCH_ENDPOINT/" "$WORK/${P}w.conf"
  fi
  ip netns exec "${P}gw" env WAYGATE_LOG=warn "$WAYGATE" --config "$WORK/gw.toml" serve \
    >"$WORK/waygate.log" 2>&1 &
  GW_PID=$!
  "$LAB" record-pid "$P" "$GW_PID" waygate
  "$LAB" device-up "$P" d1 "$WORK/${P}w.conf" >/dev/null
  ip netns exec "${P}d1" ping -c 1 -W 5 100.96.0.1 >/dev/null || bench_die "no tunnel to waygate"
}

waygate_down() {
  "$LAB" device-down "$P" d1 "$WORK/${P}w.conf" >/dev/null
  kill "$GW_PID"
  wait "$GW_PID" 2>/dev/null || true
}

reference_up() {
  local gw_key dev_key
  gw_key="$(wg genkey)"
  dev_key="$(wg genkey)"
  cat >"$WORK/${P}r.conf" <<EOT
[Interface]
PrivateKey = $gw_key
ListenPort = 51821
Address = 100.111.0.1/24

[Peer]
PublicKey = $(echo "$dev_key" | wg pubkey)
AllowedIPs = 100.111.0.2/32
EOT
  cat >"$WORK/${P}d.conf" <<EOT
[Interface]
PrivateKey = $dev_key
Address = 100.111.0.2/32
MTU = 1420

[Peer]
PublicKey = $(echo "$gw_key" | wg pubkey)
Endpoint = ${BENCH_ENDPOINT:-198.51.100.1:51821}
AllowedIPs = 0.0.0.0/0
PersistentKeepalive = 25
EOT
  ip netns exec "${P}gw" sysctl -qw net.ipv4.ip_forward=1
  ip netns exec "${P}gw" nft -f - <<EOT
table ip benchnat {
  chain post {
    type nat hook postrouting priority srcnat;
    ip saddr 100.111.0.0/24 oifname "eg0" masquerade
  }
}
EOT
  GW_PID="$("$LAB" device-up "$P" gw "$WORK/${P}r.conf")"
  "$LAB" device-up "$P" d1 "$WORK/${P}d.conf" >/dev/null
  ip netns exec "${P}d1" ping -c 1 -W 5 100.111.0.1 >/dev/null || bench_die "no tunnel to the reference"
}
