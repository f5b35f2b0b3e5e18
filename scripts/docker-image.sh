#!/usr/bin/env bash
# Builds Waygate's container images on a machine without an image registry (as root).
#
#   scripts/docker-image.sh [--profile release|debug] [--lab]
#
# - waygate-base:bookworm, waygate-lab-base:bookworm  Debian bookworm made by
#   `debootstrap --variant=minbase` and `docker import`ed, once: a second run finds the images and
#   reuses them (the package lists are in the image labels; a changed list makes them anew).
# - waygate:local  the Dockerfile's `runtime` stage on waygate-base with the host's
#   target/PROFILE/waygate (built first when missing or older than the sources); docker's layer
#   cache makes it a no-op while the binary is unchanged.
# - waygate-lab:local (with --lab)  the test topology's devices, Internet and private site:
#   wg-quick with wireguard-go, curl, dig, iperf3 and the lab's origins (lab-origin).
#
# The default profile is release, what users run; the Docker tests use debug, which
# scripts/test.sh has already built, to stay inside the suite's time budget.
#
# Env: DOCKER (default /usr/bin/docker when present: Debian's client has BuildKit built in, which
#      skips the Dockerfile's build stage; other clients need buildx), DEBIAN_MIRROR.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

PROFILE=release
LAB=0
while [ $# -gt 0 ]; do
  case "$1" in
    --profile) PROFILE="${2:?--profile needs release or debug}"; shift 2 ;;
    --lab) LAB=1; shift ;;
    *) echo "docker-image.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done
case "$PROFILE" in release | debug) ;; *) echo "docker-image.sh: bad profile $PROFILE" >&2; exit 2 ;; esac

if [ -z "${DOCKER:-}" ]; then
  if [ -x /usr/bin/docker ]; then DOCKER=/usr/bin/docker; else DOCKER=docker; fi
fi
export DOCKER_BUILDKIT=1
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
log() { echo "docker-image.sh: $*" >&2; }
"$DOCKER" info >/dev/null 2>&1 || {
  log "no Docker engine answers ($DOCKER info failed): start dockerd (scripts/docker-test.sh starts one for its run)"
  exit 1
}

# The runtime needs the CA roots (DoT/DoH upstreams) and iproute2 (virtual networks' next-hop
# routes); passwd (useradd) is in minbase.
BASE_PACKAGES="ca-certificates iproute2"
LAB_PACKAGES="ca-certificates iproute2 wireguard-tools wireguard-go curl dnsutils iperf3 nftables iputils-ping procps"

# base_image NAME PACKAGES: debootstrap + import, unless NAME exists with the same package list.
base_image() {
  local name="$1" packages="$2" have dir
  have=$("$DOCKER" image inspect --format '{{index .Config.Labels "org.waygate.packages"}}' "$name" 2>/dev/null || true)
  if [ "$have" = "$packages" ]; then
    log "$name: cached"
    return
  fi
  command -v debootstrap >/dev/null || { log "debootstrap is missing (apt-get install debootstrap)"; exit 1; }
  dir=$(mktemp -d /tmp/waygate-debootstrap.XXXXXX)
  # shellcheck disable=SC2064
  trap "rm -rf '$dir'" RETURN
  log "$name: debootstrap bookworm ($packages)"
  local started=$SECONDS
  debootstrap --variant=minbase --include="${packages// /,}" bookworm "$dir" "$MIRROR" >"$dir.log" 2>&1 || {
    tail -20 "$dir.log" >&2
    rm -f "$dir.log"
    exit 1
  }
  rm -f "$dir.log"
  # Trim what a container never reads: apt lists, docs, man pages, locales.
  rm -rf "$dir"/var/lib/apt/lists/* "$dir"/var/cache/apt/*.bin "$dir"/var/cache/apt/archives/*.deb \
    "$dir"/usr/share/doc/* "$dir"/usr/share/man/* "$dir"/usr/share/info/* "$dir"/usr/share/locale/*
  tar -C "$dir" -c . | "$DOCKER" import \
    --change "LABEL org.waygate.packages=\"$packages\"" \
    --change 'CMD ["/bin/bash"]' - "$name" >/dev/null
  log "$name: made in $((SECONDS - started)) s"
}

# cargo_bins BIN...: builds the binaries for PROFILE unless they are newer than every source.
cargo_bins() {
  local dir="${CARGO_TARGET_DIR:-$ROOT/target}/$PROFILE" stale=0 bin
  for bin in "$@"; do
    if [ ! -x "$dir/$bin" ] || [ -n "$(find gateway shared keys client tests/src Cargo.lock -newer "$dir/$bin" \( -name '*.rs' -o -name Cargo.toml -o -name Cargo.lock \) -print -quit)" ]; then
      stale=1
    fi
  done
  if [ "$stale" = 1 ]; then
    local flags=()
    [ "$PROFILE" = release ] && flags=(--release)
    log "cargo build ${flags[*]} $*"
    local args=()
    for bin in "$@"; do args+=(--bin "$bin"); done
    cargo build -q "${flags[@]}" "${args[@]}"
  fi
}

base_image waygate-base:bookworm "$BASE_PACKAGES"
cargo_bins waygate
ctx=$(mktemp -d /tmp/waygate-image.XXXXXX)
trap 'rm -rf "$ctx"' EXIT
# Line tables off (release keeps them for profiling: most of the binary); symbols stay, so a
# panic's backtrace still names functions.
install -D -m 0755 "${CARGO_TARGET_DIR:-$ROOT/target}/$PROFILE/waygate" "$ctx/waygate"
strip --strip-debug "$ctx/waygate"
install -D -m 0755 scripts/docker-entrypoint.sh "$ctx/scripts/docker-entrypoint.sh"
log "waygate:local ($PROFILE binary)"
"$DOCKER" build -q --network none --build-arg BASE=waygate-base:bookworm --build-arg BIN=prebuilt \
  --target runtime -f Dockerfile -t waygate:local "$ctx" >/dev/null

if [ "$LAB" = 1 ]; then
  base_image waygate-lab-base:bookworm "$LAB_PACKAGES"
  cargo_bins lab-origin
  rm -rf "$ctx"/*
  install -m 0755 "${CARGO_TARGET_DIR:-$ROOT/target}/$PROFILE/lab-origin" "$ctx/lab-origin"
  strip --strip-debug "$ctx/lab-origin"
  log "waygate-lab:local"
  "$DOCKER" build -q --network none -f - -t waygate-lab:local "$ctx" >/dev/null <<'EOF'
FROM waygate-lab-base:bookworm
COPY lab-origin /usr/local/bin/lab-origin
# bookworm's wg-quick writes src_valid_mark even when it is 1, which a container's read-only
# /proc/sys refuses; newer wg-quick checks first, and so does this one.
RUN sed -i 's/^\t\[\[ \$proto == -4 \]\] && cmd sysctl -q net.ipv4.conf.all.src_valid_mark=1$/\t[[ $proto == -4 ]] \&\& [[ $(sysctl -n net.ipv4.conf.all.src_valid_mark) != 1 ]] \&\& cmd sysctl -q net.ipv4.conf.all.src_valid_mark=1/' /usr/bin/wg-quick \
    && grep -q 'sysctl -n net.ipv4.conf.all.src_valid_mark' /usr/bin/wg-quick
EOF
fi
# A rebuilt image leaves its predecessor untagged; drop those (only ours: they carry the label).
"$DOCKER" image prune -f --filter label=org.waygate.packages >/dev/null
"$DOCKER" image ls --format '{{.Repository}}:{{.Tag}} {{.Size}}' | grep -E '^waygate' >&2 || true
