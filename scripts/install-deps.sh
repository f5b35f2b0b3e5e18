#!/usr/bin/env bash
# Installs the Debian packages the tests and benchmarks use, when they are missing.
# Needs root for apt-get; without root it only reports what is missing.
set -euo pipefail

# command -> Debian package
declare -A wanted=(
  [wg]=wireguard-tools
  [wireguard-go]=wireguard-go
  [iperf3]=iperf3
  [curl]=curl
  [h2load]=nghttp2-client
  [dig]=dnsutils
  [kdig]=knot-dnsutils
  [nft]=nftables
  [resolvconf]=openresolv
  [ip]=iproute2
  [ping]=iputils-ping
  [ss]=iproute2
  [pgrep]=procps
  [sysctl]=procps
  [dockerd]=docker.io
  [docker-compose]=docker-compose
  [debootstrap]=debootstrap
  [nsenter]=util-linux
  [chromium]=chromium
  [certutil]=libnss3-tools
)

# schemathesis (PyPI) walks the admin API's OpenAPI document in tests/tests/admin.rs.
if ! command -v schemathesis >/dev/null 2>&1; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "install-deps: missing schemathesis (run as root to install it with pip)" >&2
  else
    echo "install-deps: installing schemathesis (pip)"
    python3 -m pip install -q --root-user-action=ignore 'schemathesis==4.*'
    # Under pyenv the new command appears only once its shims are rebuilt.
    if command -v pyenv >/dev/null 2>&1; then pyenv rehash; fi
  fi
fi

missing=()
for cmd in "${!wanted[@]}"; do
  command -v "$cmd" >/dev/null 2>&1 || missing+=("${wanted[$cmd]}")
done
[ ${#missing[@]} -eq 0 ] && exit 0

mapfile -t missing < <(printf '%s\n' "${missing[@]}" | sort -u)
if [ "$(id -u)" -ne 0 ]; then
  echo "install-deps: missing packages (run as root to install): ${missing[*]}" >&2
  exit 1
fi
echo "install-deps: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
