# Shared by the lab benchmarks (source it): one lab, one device in <P>d1, and the two gateways
# compared: Waygate, and the setup a user would otherwise build (wireguard-go on the gateway,
# kernel forwarding, nftables masquerade out of eg0).
#
# bench_init NAME   checks root and tools, builds the release binaries, brings the lab up and
#                   arranges its teardown on exit; sets P, WORK, WAYGATE (BENCH_WAYGATE if set),
#                   LAB_ORIGIN, LAB
# waygate_up        Waygate serving the device (wg-quick + wireguard-go); sets GW_PID, DEV_PID
# client_up         the same device through waygate-client instead of wg-quick; sets DEV_PID
# client_down       waygate-client's tunnel gone
# waygate_down      the device's tunnel and Waygate gone
# reference_up      the reference gateway serving the device; sets GW_PID
# reference_down    the reference's tunnels, forwarding and masquerade gone
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
  cargo build --release --quiet --bin waygate --bin waygate-client --bin lab-origin \
    --bin lab-connrate --bin lab-delay
  local target
  target="$(cargo metadata --format-version 1 --no-deps | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')"
  # BENCH_WAYGATE: another gateway binary to measure (e.g. a copy of main's, for a before/after
  # pair in one lock hold); the rest still comes from this tree.
  WAYGATE="${BENCH_WAYGATE:-$target/release/waygate}"
  WAYGATE_CLIENT="$target/release/waygate-client"
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

# gateway_toml FILE DATA_DIR [EXTRA]: the lab gateway's config (WireGuard on 198.51.100.1, egress
# from 192.0.2.1) with its data dir, EXTRA TOML appended; BENCH_WG_EXTRA (e.g. "threads = 2")
# goes into its [wireguard] table.
gateway_toml() {
  cat >"$1" <<EOT
data_dir = "$2"
[wireguard]
listen = "198.51.100.1:51820"
public_endpoint = "198.51.100.1:51820"
interface_name = "${P}gw"
${BENCH_WG_EXTRA:-}
[egress]
default_ipv4 = "192.0.2.1"
${3:-}
EOT
}

# waygate_up [TAG EXTRA]: Waygate in the gateway namespace with a device enrolled and up with
# wg-quick; TAG names a data dir of its own, EXTRA is TOML appended to the config.
waygate_up() {
  local tag="${1:-}" extra="${2:-}"
  gateway_toml "$WORK/gw.toml" "$WORK/data$tag" "$extra"
  "$WAYGATE" --config "$WORK/gw.toml" device enroll --email bench@example.com --name bench \
    >"$WORK/${P}w.conf" 2>"$WORK/enroll.log" || bench_die "enroll failed: $(cat "$WORK/enroll.log")"
  sed -i '/^DNS/d' "$WORK/${P}w.conf"
  if [ -n "${BENCH_ENDPOINT:-}" ]; then
    sed -i "s/^Endpoint = .*/Endpoint = $BENCH_ENDPOINT/" "$WORK/${P}w.conf"
  fi
  ip netns exec "${P}gw" env WAYGATE_LOG="${BENCH_WAYGATE_LOG:-warn}" "$WAYGATE" --config "$WORK/gw.toml" serve \
    >"${BENCH_WAYGATE_LOG_FILE:-$WORK/waygate.log}" 2>&1 &
  GW_PID=$!
  "$LAB" record-pid "$P" "$GW_PID" waygate
  DEV_PID="$("$LAB" device-up "$P" d1 "$WORK/${P}w.conf")"
  ip netns exec "${P}d1" ping -c 1 -W 5 100.96.0.1 >/dev/null || bench_die "no tunnel to waygate"
  WG_QUICK_UP=1
}

# The wg-quick device's key and addresses, as waygate-client's files (client.toml as enrollment
# writes it, DNS left alone), so the client is the same device to the gateway.
client_up() {
  local conf="$WORK/${P}w.conf" dir="$WORK/client" key addrs
  "$LAB" device-down "$P" d1 "$conf" >/dev/null
  WG_QUICK_UP=0
  mkdir -p -m 700 "$dir"
  key="$(sed -n 's/^PrivateKey = //p' "$conf")"
  (umask 077 && echo "$key" >"$dir/private.key")
  addrs="$(sed -n 's/^Address = //p' "$conf" | sed 's/, */", "/g')"
  cat >"$dir/client.toml" <<EOT
server = "https://198.51.100.1:8444"
ca_sha256 = "$(printf '0%.0s' $(seq 64))"
device_id = "bench"
name = "bench"
addresses = ["$addrs"]
gateway_public_key = "$(sed -n 's/^PublicKey = //p' "$conf")"
endpoint = "$(sed -n 's/^Endpoint = //p' "$conf")"
dns = []
mtu = $(sed -n 's/^MTU = //p' "$conf" | grep . || echo 1420)
EOT
  ip netns exec "${P}d1" env WAYGATE_LOG=warn "$WAYGATE_CLIENT" --dir "$dir" up \
    --interface "${P}c" >/dev/null || bench_die "waygate-client up failed: $(cat "$dir/daemon.log")"
  DEV_PID="$(cat "$dir/daemon.pid")"
  "$LAB" record-pid "$P" "$DEV_PID" waygate-client
  ip netns exec "${P}d1" ping -c 1 -W 5 100.96.0.1 >/dev/null || bench_die "no tunnel from waygate-client"
}

client_down() {
  ip netns exec "${P}d1" "$WAYGATE_CLIENT" --dir "$WORK/client" down >/dev/null 2>&1 || true
}

waygate_down() {
  if [ "${WG_QUICK_UP:-0}" = 1 ]; then
    "$LAB" device-down "$P" d1 "$WORK/${P}w.conf" >/dev/null
  fi
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
  DEV_PID="$("$LAB" device-up "$P" d1 "$WORK/${P}d.conf")"
  ip netns exec "${P}d1" ping -c 1 -W 5 100.111.0.1 >/dev/null || bench_die "no tunnel to the reference"
}

# Later stages of a run bring up Waygate tunnels in the same namespaces: a second wg-quick
# interface with AllowedIPs 0.0.0.0/0 beside the reference's would fight over d1's routes.
reference_down() {
  "$LAB" device-down "$P" d1 "$WORK/${P}d.conf" >/dev/null
  "$LAB" device-down "$P" gw "$WORK/${P}r.conf" >/dev/null
  ip netns exec "${P}gw" nft delete table ip benchnat 2>/dev/null || true
  ip netns exec "${P}gw" sysctl -qw net.ipv4.ip_forward=0
}
