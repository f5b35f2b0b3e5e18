#!/usr/bin/env bash
# Runs Waygate's end-to-end checks in Docker (as root): the image of scripts/docker-image.sh, the
# topology of tests/docker/compose.yml, a wg-quick device (wireguard-go) in a container.
#
#   scripts/docker-test.sh
#
# Starts dockerd when none answers (and stops that one, by its pid, when done), builds the images
# (the debootstrap bases are made once and reused), brings the topology up under a project name of
# its own, runs the checks, and tears everything down, also when a check fails.
# Checks: the image runs unprivileged and has a HEALTHCHECK; `waygate health`; a device's HTTP
# leaves from the egress address; a DNS block rule; an egress rule; a network rule; iperf3 through
# the tunnel; a virtual network to the private site; a revoke; a gateway restart (`docker restart`,
# devices kept in the data volume).
#
# Env: WAYGATE_DOCKER_PROFILE (debug: the binaries scripts/test.sh has built; release for the
#      image users run), DOCKER, DOCKER_COMPOSE.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

[ "$(id -u)" -eq 0 ] || { echo "docker-test.sh: needs root" >&2; exit 1; }
PROFILE=${WAYGATE_DOCKER_PROFILE:-debug}
if [ -z "${DOCKER:-}" ]; then
  if [ -x /usr/bin/docker ]; then DOCKER=/usr/bin/docker; else DOCKER=docker; fi
fi
export DOCKER
COMPOSE=${DOCKER_COMPOSE:-docker-compose}
PROJECT="wgt$$"
WORK=$(mktemp -d /tmp/waygate-docker-test.XXXXXX)
STARTED=$SECONDS
DOCKERD_PID=
FAILED=()

log() { echo "docker-test.sh: $*" >&2; }
compose() { "$COMPOSE" -p "$PROJECT" -f tests/docker/compose.yml "$@"; }
declare -A IDS=()
# container SERVICE: its container id (looked up once: docker-compose starts slowly).
container() {
  [ -n "${IDS[$1]:-}" ] || IDS[$1]=$(compose ps -q "$1")
  echo "${IDS[$1]}"
}
on() { local id; id=$(container "$1"); shift; "$DOCKER" exec "$id" "$@"; }

cleanup() {
  local rc=$?
  if [ "$rc" -ne 0 ] || [ ${#FAILED[@]} -ne 0 ]; then
    log "gateway log (tail):"
    compose logs --no-color --tail 60 gateway >&2 2>/dev/null || true
    # Containers on one network talk across a bridge; with br_netfilter loaded, the host's
    # FORWARD chain sees that traffic, and a DROP policy left by an earlier dockerd (with its
    # iptables rules, not running now) silently cuts it.
    if [ "$(cat /proc/sys/net/bridge/bridge-nf-call-iptables 2>/dev/null)" = 1 ] &&
      iptables -S FORWARD 2>/dev/null | grep -qx -- '-P FORWARD DROP'; then
      log "hint: the host's FORWARD policy is DROP and bridged traffic passes iptables (br_netfilter):"
      log "      containers may not reach each other; see \`iptables -S FORWARD\`"
    fi
  fi
  compose down -v --remove-orphans >/dev/null 2>&1 || true
  if [ -n "$DOCKERD_PID" ]; then
    log "stopping the dockerd this run started (pid $DOCKERD_PID)"
    kill "$DOCKERD_PID" 2>/dev/null || true
    for _ in $(seq 1 100); do kill -0 "$DOCKERD_PID" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$DOCKERD_PID" 2>/dev/null || true
  fi
  rm -rf "$WORK"
}
trap cleanup EXIT

# Docker: use the running engine, or start one for this run. No iptables rules of its own: the
# test networks are internal and nothing needs NAT, and the host's firewall stays as it was.
if ! "$DOCKER" info >/dev/null 2>&1; then
  command -v dockerd >/dev/null || { log "dockerd is missing (scripts/install-deps.sh installs docker.io)"; exit 1; }
  log "starting dockerd"
  dockerd --iptables=false --ip-masq=false --bridge=none \
    --pidfile "$WORK/dockerd.pid" >"$WORK/dockerd.log" 2>&1 &
  DOCKERD_PID=$!
  for _ in $(seq 1 150); do "$DOCKER" info >/dev/null 2>&1 && break; sleep 0.2; done
  "$DOCKER" info >/dev/null 2>&1 || { tail -20 "$WORK/dockerd.log" >&2; exit 1; }
fi

t0=$SECONDS
scripts/docker-image.sh --profile "$PROFILE" --lab
IMAGE_SECONDS=$((SECONDS - t0))

# check NAME CMD...: runs CMD, records a failure instead of stopping at the first.
check() {
  local name="$1"
  shift
  if "$@"; then
    log "ok   $name"
  else
    log "FAIL $name"
    FAILED+=("$name")
  fi
}

# until_ok SECONDS CMD...: retries CMD every 0.2 s.
until_ok() {
  local deadline=$((SECONDS + $1))
  shift
  while ! "$@" >/dev/null 2>&1; do
    [ "$SECONDS" -lt "$deadline" ] || return 1
    sleep 0.2
  done
}

# The gateway's default route goes via the Internet container and it owns the dedicated egress
# address too; Docker can do neither, so set them from the host in its network namespace.
gateway_net() {
  local pid dev
  pid=$("$DOCKER" inspect -f '{{.State.Pid}}' "$(container gateway)")
  dev=$(nsenter -t "$pid" -n ip -o -4 addr show to 192.0.2.0/24 | awk '{print $2; exit}')
  [ -n "$dev" ] || { log "the gateway has no address on the egress network"; return 1; }
  nsenter -t "$pid" -n ip addr replace 192.0.2.10/24 dev "$dev"
  nsenter -t "$pid" -n ip route replace default via 192.0.2.254 dev "$dev" src 192.0.2.1
}

healthy() { on gateway waygate health >/dev/null; }

# src_of URL: the address the origin saw (lab-origin answers {"src":"IP","port":N}).
src_of() { on d1 curl -sS -m 3 "$1" | sed -n 's/.*"src":"\([^"]*\)".*/\1/p'; }
src_is() { [ "$(src_of "$1")" = "$2" ]; }
unreachable() { ! on d1 curl -sS -m 2 -o /dev/null "$1" 2>/dev/null; }
dns_status() { on d1 dig +time=2 +tries=1 @100.96.0.1 "$1" A | sed -n 's/.*status: \([A-Z]*\).*/\1/p'; }
dns_is() { [ "$(dns_status "$1")" = "$2" ]; }

enroll_d1() { # NAME: enroll a device for the d1 container and bring its tunnel up
  on gateway waygate device enroll --email ada@example.com --name "$1" >"$WORK/$1.conf"
  # No DNS line: the container's resolv.conf is Docker's bind mount; queries name 100.96.0.1.
  sed -i '/^DNS *=/d' "$WORK/$1.conf"
  "$DOCKER" cp "$WORK/$1.conf" "$(container d1):/etc/wireguard/wg0.conf"
  on d1 sh -c 'wg-quick down wg0 >/dev/null 2>&1 || true; wg-quick up wg0' >/dev/null 2>&1
}

log "topology up (project $PROJECT)"
t0=$SECONDS
compose up -d
gateway_net
UP_SECONDS=$((SECONDS - t0))

check "image runs as an unprivileged user" test "$("$DOCKER" run --rm --network none --entrypoint id waygate:local -u)" = 10001
check "image has a HEALTHCHECK" test "$("$DOCKER" inspect -f '{{if .Config.Healthcheck}}{{index .Config.Healthcheck.Test 1}}{{end}}' waygate:local)" = waygate
check "waygate health answers" until_ok 15 healthy
check "device enrolls and its tunnel comes up" enroll_d1 d1
check "HTTP leaves from the egress address" until_ok 10 src_is http://203.0.113.10/ 192.0.2.1
check "DNS: an allowed name resolves" dns_is allowed.example NOERROR
check "DNS: a block rule refuses blocked.example" dns_is blocked.example REFUSED
check "egress rule: 203.0.113.11 leaves from 192.0.2.10" src_is http://203.0.113.11/ 192.0.2.10
check "network rule: 203.0.113.12 is blocked" unreachable http://203.0.113.12/
mbits=$(on d1 iperf3 -c 203.0.113.20 -t 2 -J 2>/dev/null |
  python3 -c 'import json,sys; print(round(json.load(sys.stdin)["end"]["sum_received"]["bits_per_second"]/1e6))' 2>/dev/null || echo 0)
check "iperf3 through the tunnel ($mbits Mbit/s)" test "$mbits" -gt 0

vnet_site() {
  on gateway waygate vnet create site1 --route 198.18.0.0/16=198.19.1.2 >/dev/null &&
    on gateway waygate device set-vnet d1 site1 >/dev/null &&
    until_ok 5 src_is http://198.18.0.10/ 198.19.1.1
}
check "virtual network: the private site answers" vnet_site

revoke() {
  on gateway waygate device revoke d1 >/dev/null && until_ok 5 unreachable http://203.0.113.10/
}
check "revoke: the device's traffic stops" revoke

restart() {
  enroll_d1 d1b && until_ok 10 src_is http://203.0.113.10/ 192.0.2.1 || return 1
  "$DOCKER" restart -t 5 "$(container gateway)" >/dev/null
  gateway_net && until_ok 15 healthy && until_ok 15 src_is http://203.0.113.10/ 192.0.2.1
}
check "gateway restart: the device is back, data kept" restart

size=$("$DOCKER" image inspect -f '{{.Size}}' waygate:local)
log "image waygate:local: $((size / 1000000)) MB ($PROFILE binary); images ${IMAGE_SECONDS}s, topology up ${UP_SECONDS}s, total $((SECONDS - STARTED))s"
if [ ${#FAILED[@]} -ne 0 ]; then
  log "${#FAILED[@]} failed: ${FAILED[*]}"
  exit 1
fi
log "all checks passed"
