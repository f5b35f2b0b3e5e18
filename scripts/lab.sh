#!/usr/bin/env bash
# Waygate's lab: network namespaces for a gateway, two devices and an "Internet" with origins.
#
#   scripts/lab.sh up [PREFIX]             build the lab, start the origins, print PREFIX
#   scripts/lab.sh down [PREFIX]           kill what the lab started (by pid), delete its namespaces
#   scripts/lab.sh device-up PREFIX DEV CONF    wg-quick up CONF (wireguard-go) in namespace <P>DEV
#   scripts/lab.sh device-down PREFIX DEV CONF  wg-quick down CONF in namespace <P>DEV
#   scripts/lab.sh record-pid PREFIX PID NAME   have `down` kill PID too (a process you started)
#   scripts/lab.sh add-device PREFIX N     one more device namespace <P>dN (N 3-9) on the underlay:
#                                          ul0 198.51.100.(10+N)/24, like d1 and d2
#   scripts/lab.sh status PREFIX           list the namespaces and pids the lab recorded
#
# PREFIX (default: wl<pid>, at most 10 characters, [a-z0-9]) names everything the run creates:
#
#   <P>ul  underlay segment: bridge br0, devices' public addresses 198.51.100.0/24, 2001:db8:1::/64
#   <P>gw  gateway: ul0 198.51.100.1/24 2001:db8:1::1/64 (underlay), eg0 192.0.2.1/24
#          (+ .10 .11 .12) 2001:db8:2::1/64 (egress), default routes via the Internet (.254)
#   <P>d1  device 1: ul0 198.51.100.11/24 2001:db8:1::11/64, no default route
#   <P>d2  device 2: ul0 198.51.100.12/24 2001:db8:1::12/64, no default route
#          2001:db8:2:10::/64 is routed to the gateway and local there (dedicated IPv6 egress)
#   <P>s1  private site 1 (virtual networks): vs0 198.19.1.2/24 198.18.0.10/24, HTTP echo on
#          198.18.0.10:80; the gateway's side is vs1 198.19.1.1/24
#   <P>s2  private site 2: the same 198.18.0.10 behind the gateway's vs2 198.19.2.1/24 (vs0
#          198.19.2.2/24), so two virtual networks reach one private range at two sites
#   <P>in  Internet: eg0 192.0.2.254/24 2001:db8:2::254/64; on lo: 203.0.113.10 (HTTP
#          echo :80), .20 (iperf3 -s), .30 (UDP echo :7, UDP whoami :8), .53 (DNS: the zone in tests/src/dns_origin.rs) and
#          2001:db8:3::10/.20/.30. It has no route to 198.51.100.0/24: devices reach it only
#          through the gateway's egress address.
#
# State lives in /run/waygate-lab/<P>/ (pids, namespaces, wg interfaces), so `down` removes exactly
# what this prefix created, tolerates a partial `up`, and can run twice. WireGuard interfaces are
# named after their config file (wg-quick); their UAPI sockets /var/run/wireguard/NAME.sock are
# global, so the names must be unique per run: use <P> in them.
#
# Env: LAB_ORIGIN  path of the lab-origin binary (default: <target>/debug/lab-origin, built if
#                  missing).
set -Eeuo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
STATE_BASE=/run/waygate-lab

die() { echo "lab.sh: $*" >&2; exit 1; }
log() { echo "lab.sh: $*" >&2; }

check_prefix() {
  [[ "$1" =~ ^[a-z][a-z0-9]{0,9}$ ]] || die "bad prefix '$1' (want [a-z][a-z0-9]{0,9})"
}

state_dir() { echo "$STATE_BASE/$1"; }

# ns NAME CMD... : run CMD in namespace NAME.
ns() { local n="$1"; shift; ip netns exec "$n" "$@"; }

# Record a namespace before creating it, so a failure half-way still deletes it.
add_ns() {
  local p="$1" name="$2" sd
  sd="$(state_dir "$p")"
  echo "$name" >>"$sd/netns"
  # resolv.conf first: `ip netns exec` bind-mounts it over /etc/resolv.conf, so nothing run in the
  # namespace (wg-quick's resolvconf) can rewrite the host's resolver.
  mkdir -p "/etc/netns/$name"
  echo "nameserver 203.0.113.53" >"/etc/netns/$name/resolv.conf"
  ip netns add "$name"
  ns "$name" ip link set lo up
  # No IPv6 DAD delays in the lab; no stray router advertisements.
  ns "$name" sysctl -qw net.ipv6.conf.all.accept_dad=0 net.ipv6.conf.default.accept_dad=0 \
    net.ipv6.conf.all.accept_ra=0 net.ipv6.conf.default.accept_ra=0
}

# veth A_NS A_IF B_NS B_IF: a veth pair created directly in the two namespaces.
veth() {
  ip link add "$2" netns "$1" type veth peer name "$4" netns "$3"
  ns "$1" ip link set "$2" up
  ns "$3" ip link set "$4" up
}

# start P NS NAME CMD...: start CMD in the background in NS, record its pid.
start() {
  local p="$1" n="$2" name="$3" sd
  shift 3
  sd="$(state_dir "$p")"
  ip netns exec "$n" "$@" >"$sd/$name.log" 2>&1 </dev/null &
  local pid=$!
  echo "$pid $(proc_start "$pid") $name" >>"$sd/pids"
}

origin_bin() {
  if [ -n "${LAB_ORIGIN:-}" ]; then
    [ -x "$LAB_ORIGIN" ] || die "LAB_ORIGIN=$LAB_ORIGIN is not executable"
    echo "$LAB_ORIGIN"
    return
  fi
  local target="${CARGO_TARGET_DIR:-$ROOT/target}"
  if [ ! -x "$target/debug/lab-origin" ]; then
    log "building lab-origin"
    (cd "$ROOT" && cargo build -q -p waygate-e2e --bin lab-origin) >&2
  fi
  echo "$target/debug/lab-origin"
}

wait_port() { # NS PROTO ADDR:PORT
  local i
  for i in $(seq 1 100); do
    if ns "$1" ss -Hln"${2:0:1}" | awk '{print $4}' | grep -qx -- "$3"; then return 0; fi
    sleep 0.05
  done
  die "nothing listening on $2 $3 in $1"
}

cmd_up() {
  local p="$1" sd origin
  check_prefix "$p"
  [ "$(id -u)" -eq 0 ] || die "needs root"
  sd="$(state_dir "$p")"
  [ ! -e "$sd" ] || die "prefix $p is in use ($sd exists); run: $0 down $p"
  for suffix in ul gw d1 d2 in s1 s2; do
    ! ip netns list | awk '{print $1}' | grep -qx "$p$suffix" || die "namespace $p$suffix exists"
  done
  origin="$(origin_bin)"
  mkdir -p "$sd"
  : >"$sd/netns"
  : >"$sd/pids"
  : >"$sd/wg"
  # A failed `up` (error or die) leaves nothing behind.
  up_ok=0
  trap 'if [ "$up_ok" != 1 ]; then log "up failed; tearing down"; cmd_down "$p"; fi' EXIT

  local ul="${p}ul" gw="${p}gw" d1="${p}d1" d2="${p}d2" in="${p}in" s1="${p}s1" s2="${p}s2"
  for n in "$ul" "$gw" "$d1" "$d2" "$in" "$s1" "$s2"; do add_ns "$p" "$n"; done

  # Underlay: a bridge in <P>ul, one port per host.
  ns "$ul" ip link add br0 type bridge
  ns "$ul" ip link set br0 up
  veth "$gw" ul0 "$ul" gw
  veth "$d1" ul0 "$ul" d1
  veth "$d2" ul0 "$ul" d2
  for port in gw d1 d2; do ns "$ul" ip link set "$port" master br0; done

  ns "$gw" ip addr add 198.51.100.1/24 dev ul0
  ns "$gw" ip addr add 2001:db8:1::1/64 dev ul0 nodad
  ns "$d1" ip addr add 198.51.100.11/24 dev ul0
  ns "$d1" ip addr add 2001:db8:1::11/64 dev ul0 nodad
  ns "$d2" ip addr add 198.51.100.12/24 dev ul0
  ns "$d2" ip addr add 2001:db8:1::12/64 dev ul0 nodad

  # Egress link gateway <-> Internet.
  veth "$gw" eg0 "$in" eg0
  ns "$gw" ip addr add 192.0.2.1/24 dev eg0
  for a in 10 11 12; do ns "$gw" ip addr add "192.0.2.$a/24" dev eg0; done
  ns "$gw" ip addr add 2001:db8:2::1/64 dev eg0 nodad
  ns "$gw" ip route add default via 192.0.2.254 dev eg0 src 192.0.2.1
  ns "$gw" ip -6 route add default via 2001:db8:2::254 dev eg0
  ns "$in" ip addr add 192.0.2.254/24 dev eg0
  ns "$in" ip addr add 2001:db8:2::254/64 dev eg0 nodad
  # Dedicated IPv6 egress: the Internet routes the prefix to the gateway, which owns all of it.
  ns "$gw" ip -6 route add local 2001:db8:2:10::/64 dev lo
  ns "$in" ip -6 route add 2001:db8:2:10::/64 via 2001:db8:2::1 dev eg0

  # Private sites: the same private address at both; the gateway reaches them through vs1 / vs2
  # (a virtual network's route names the interface), so its main table has no route to 198.18/15.
  local i s
  for i in 1 2; do
    s="${p}s$i"
    veth "$gw" "vs$i" "$s" vs0
    ns "$gw" ip addr add "198.19.$i.1/24" dev "vs$i"
    ns "$s" ip addr add "198.19.$i.2/24" dev vs0
    ns "$s" ip addr add 198.18.0.10/24 dev vs0
  done

  # Origins: addresses on lo of the Internet namespace (this kernel has no dummy interfaces).
  for a in 10 20 30 53; do ns "$in" ip addr add "203.0.113.$a/32" dev lo; done
  for a in 10 20 30 53; do ns "$in" ip addr add "2001:db8:3::$a/128" dev lo nodad; done

  # HTTP: one dual-stack socket ([::] also takes IPv4; peers are reported as plain IPv4). UDP: bound
  # to each origin address, so replies leave from the address the probe sent to.
  start "$p" "$in" origin "$origin" serve --http '[::]:80' \
    --udp-echo 203.0.113.30:7 --udp-echo '[2001:db8:3::30]:7' \
    --udp-whoami 203.0.113.30:8 --udp-whoami '[2001:db8:3::30]:8' \
    --dns 203.0.113.53:53 --dns '[2001:db8:3::53]:53'
  start "$p" "$in" iperf3 iperf3 -s -B 203.0.113.20 -p 5201
  for s in "$s1" "$s2"; do start "$p" "$s" "origin-$s" "$origin" serve --http 198.18.0.10:80; done
  wait_port "$in" tcp "*:80"
  wait_port "$in" udp "203.0.113.30:7"
  wait_port "$in" udp "203.0.113.30:8"
  wait_port "$in" udp "203.0.113.53:53"
  wait_port "$in" tcp "203.0.113.20:5201"
  for s in "$s1" "$s2"; do wait_port "$s" tcp "198.18.0.10:80"; done
  up_ok=1
  trap - EXIT
  log "up: prefix $p (namespaces ${p}ul ${p}gw ${p}d1 ${p}d2 ${p}in ${p}s1 ${p}s2; state $sd)"
  echo "$p"
}

# proc_start PID: the process's start time (clock ticks since boot), empty if it is gone or a zombie.
proc_start() {
  local stat rest
  stat="$(cat "/proc/$1/stat" 2>/dev/null)" || return 0
  rest="${stat##*) }"
  # shellcheck disable=SC2086
  set -- $rest
  [ "$1" != Z ] || return 0
  echo "${20}"
}

# kill_pid PID START: TERM, wait up to 2 s, then KILL; only if PID is still the process that started
# at START (so a reused pid is never touched). Zombies count as gone.
kill_pid() {
  local pid="$1" start="${2:-}" now i
  now="$(proc_start "$pid")"
  [ -n "$now" ] || return 0
  [ -z "$start" ] || [ "$now" = "$start" ] || return 0
  kill -TERM "$pid" 2>/dev/null || true
  for i in $(seq 1 40); do
    [ -n "$(proc_start "$pid")" ] || return 0
    sleep 0.05
  done
  kill -KILL "$pid" 2>/dev/null || true
}

# forget_resolvconf IFACE: drop openresolv's record of IFACE's DNS servers. wg-quick down does
# that itself, but not when the interface is already gone (its wireguard-go died), and the state in
# /run/resolvconf is global, not per namespace. Files only: regenerating resolv.conf here would
# rewrite the host's.
forget_resolvconf() {
  local d=/run/resolvconf
  [ -d "$d" ] || return 0
  rm -f "$d/interfaces/$1" "$d/exclusive/"*" $1" "$d/metrics/"*" $1"
}

cmd_down() {
  local p="$1" sd
  check_prefix "$p"
  sd="$(state_dir "$p")"
  set +e
  if [ -f "$sd/wg" ]; then
    # wg-quick interfaces still up: take them down cleanly (removes resolvconf entries), then
    # make sure their wireguard-go daemon is gone.
    while read -r n conf pid start; do
      [ -n "${n:-}" ] || continue
      if ip netns list | awk '{print $1}' | grep -qx "$n" && [ -f "$conf" ]; then
        ip netns exec "$n" wg-quick down "$conf" >/dev/null 2>&1
      fi
      [ -n "${pid:-}" ] && kill_pid "$pid" "${start:-}"
      rm -f "/var/run/wireguard/$(basename "$conf" .conf).sock"
      forget_resolvconf "$(basename "$conf" .conf)"
    done <"$sd/wg"
  fi
  if [ -f "$sd/pids" ]; then
    while read -r pid start _name; do
      [ -n "${pid:-}" ] && kill_pid "$pid" "$start"
    done <"$sd/pids"
  fi
  if [ -f "$sd/netns" ]; then
    while read -r n; do
      [ -n "${n:-}" ] || continue
      ip netns del "$n" 2>/dev/null
      rm -rf "/etc/netns/$n"
    done <"$sd/netns"
  fi
  rm -rf "$sd"
  set -e
  log "down: prefix $p"
}

cmd_device_up() {
  local p="$1" dev="$2" conf="$3" sd n name pid i
  check_prefix "$p"
  sd="$(state_dir "$p")"
  [ -d "$sd" ] || die "no lab with prefix $p"
  [ -f "$conf" ] || die "no config $conf"
  n="$p$dev"
  name="$(basename "$conf" .conf)"
  [ ${#name} -le 15 ] || die "interface name $name is longer than 15 characters"
  [ ! -S "/var/run/wireguard/$name.sock" ] || die "/var/run/wireguard/$name.sock exists: name in use"
  chmod 600 "$conf"
  # Record first, so `down` cleans up even if wg-quick fails half-way.
  echo "$n $conf" >>"$sd/wg"
  WG_QUICK_USERSPACE_IMPLEMENTATION=wireguard-go WG_SUDO=1 \
    ip netns exec "$n" wg-quick up "$conf" >"$sd/$name.wg-quick.log" 2>&1 \
    || { cat "$sd/$name.wg-quick.log" >&2; die "wg-quick up $conf failed in $n"; }
  # wireguard-go daemonizes; its command line is exactly `wireguard-go NAME` (unique per run).
  pid=""
  for i in $(seq 1 40); do
    pid="$(pgrep -x -f "wireguard-go $name" | head -n1 || true)"
    [ -n "$pid" ] && break
    sleep 0.05
  done
  [ -n "$pid" ] || die "no wireguard-go process for $name"
  sed -i "\|^$n $conf\$|d" "$sd/wg"
  echo "$n $conf $pid $(proc_start "$pid")" >>"$sd/wg"
  echo "$pid"
}

cmd_device_down() {
  local p="$1" dev="$2" conf="$3" sd n pid start
  check_prefix "$p"
  sd="$(state_dir "$p")"
  n="$p$dev"
  read -r pid start < <(awk -v n="$n" -v c="$conf" '$1 == n && $2 == c {print $3, $4}' "$sd/wg" 2>/dev/null | tail -n1) || true
  ip netns exec "$n" wg-quick down "$conf" >/dev/null 2>&1 || true
  [ -n "${pid:-}" ] && kill_pid "$pid" "${start:-}"
  rm -f "/var/run/wireguard/$(basename "$conf" .conf).sock"
  forget_resolvconf "$(basename "$conf" .conf)"
  [ -f "$sd/wg" ] && sed -i "\|^$n $conf\( \|\$\)|d" "$sd/wg"
  return 0
}

cmd_record_pid() { # PREFIX PID NAME: have `down` kill a process started outside this script.
  local sd
  check_prefix "$1"
  sd="$(state_dir "$1")"
  [ -d "$sd" ] || die "no lab with prefix $1"
  [[ "$2" =~ ^[0-9]+$ ]] || die "bad pid '$2'"
  echo "$2 $(proc_start "$2") $3" >>"$sd/pids"
}

cmd_add_device() { # PREFIX N: device namespace <P>dN, ul0 198.51.100.(10+N)/24 on the bridge.
  local p="$1" n="$2" sd
  check_prefix "$p"
  [[ "$n" =~ ^[3-9]$ ]] || die "bad device number '$n' (want 3-9)"
  sd="$(state_dir "$p")"
  [ -d "$sd" ] || die "no lab with prefix $p"
  ! grep -qx "${p}d$n" "$sd/netns" || die "device namespace ${p}d$n exists"
  add_ns "$p" "${p}d$n"
  veth "${p}d$n" ul0 "${p}ul" "d$n"
  ns "${p}ul" ip link set "d$n" master br0
  ns "${p}d$n" ip addr add "198.51.100.$((10 + n))/24" dev ul0
}

cmd_status() {
  local p="$1" sd
  sd="$(state_dir "$p")"
  [ -d "$sd" ] || die "no lab with prefix $p"
  echo "namespaces:"; sed 's/^/  /' "$sd/netns"
  echo "pids:"; sed 's/^/  /' "$sd/pids"
  echo "wg:"; sed 's/^/  /' "$sd/wg"
}

action="${1:-}"
default_prefix="wl$$"
case "$action" in
  up) cmd_up "${2:-$default_prefix}" ;;
  down) [ -n "${2:-}" ] || die "down needs a PREFIX"; cmd_down "$2" ;;
  device-up) [ $# -eq 4 ] || die "usage: $0 device-up PREFIX DEV CONF"; cmd_device_up "$2" "$3" "$4" ;;
  device-down) [ $# -eq 4 ] || die "usage: $0 device-down PREFIX DEV CONF"; cmd_device_down "$2" "$3" "$4" ;;
  record-pid) [ $# -eq 4 ] || die "usage: $0 record-pid PREFIX PID NAME"; cmd_record_pid "$2" "$3" "$4" ;;
  add-device) [ $# -eq 3 ] || die "usage: $0 add-device PREFIX N"; cmd_add_device "$2" "$3" ;;
  status) cmd_status "${2:-}" ;;
  *) die "usage: $0 up [PREFIX] | down PREFIX | device-up PREFIX DEV CONF | device-down PREFIX DEV CONF | add-device PREFIX N | status PREFIX" ;;
esac
