#!/usr/bin/env bash
# Checks that the crates keep their layering (run by scripts/test.sh; needs only cargo):
#   1. no crate below the I/O layer has tokio in its dependency tree (the engine, stages, DNS core,
#      wire, WireGuard and policy crates are sans-IO: they never import tokio);
#   2. the client's dependency tree holds neither rusqlite, smoltcp nor the gateway's HTTP stack;
#   3. every crate depends only on crates of lower layers, never on its own layer or one above.
# Layers, lowest first; one line per layer. A new crate must be added here, or this check fails.
set -euo pipefail
cd "$(dirname "$0")/.."

LAYERS=(
  "waygate-model waygate-wire waygate-keys waygate-policy waygate-posture"
  "waygate-wg waygate-config waygate-udp waygate-observe"
  "waygate-geoip waygate-registry"
  "waygate-control"
  "waygate-stages"
  "waygate-dns"
  "waygate-engine"
  "waygate-admin waygate-http"
  "waygate-runtime"
  "waygate waygate-client"
  "waygate-e2e waygate-fuzz"
)
# Crates allowed to use tokio: the I/O libraries, the binaries and the end-to-end tests.
TOKIO_OK="waygate-udp waygate-admin waygate-http waygate-runtime waygate waygate-client waygate-e2e waygate-fuzz"
CLIENT_FORBIDDEN="rusqlite smoltcp hyper"

failures=0
fail() { echo "check-layers: $*" >&2; failures=$((failures + 1)); }

declare -A rank
for i in "${!LAYERS[@]}"; do
  for c in ${LAYERS[$i]}; do rank[$c]=$i; done
done

members="$(cargo metadata --format-version 1 --no-deps |
  python3 -c 'import json,sys; print("\n".join(p["name"] for p in json.load(sys.stdin)["packages"]))')"

for crate in $members; do
  [ -n "${rank[$crate]:-}" ] || { fail "$crate is in no layer: add it to LAYERS in $0"; continue; }
  # The crate's own tree, as it is built for users (normal and build dependencies, its features).
  tree="$(cargo tree -q -p "$crate" -e normal,build --prefix none --format '{p}' | awk '{print $1}' | sort -u)"
  if ! [[ " $TOKIO_OK " == *" $crate "* ]] && grep -qx tokio <<<"$tree"; then
    fail "$crate depends on tokio (path: $(cargo tree -q -p "$crate" -e normal,build -i tokio --prefix none --format '{p}' | awk '{print $1}' | tr '\n' ' '))"
  fi
  if [ "$crate" = waygate-client ]; then
    for bad in $CLIENT_FORBIDDEN; do
      grep -qx "$bad" <<<"$tree" && fail "waygate-client's dependency tree contains $bad"
    done
  fi
  # Direct dependencies on workspace crates, dev-dependencies included (a test may not reach up).
  direct="$(cargo tree -q -p "$crate" -e normal,build,dev --depth 1 --prefix none --format '{p}' |
    awk 'NR > 1 {print $1}' | sort -u)"
  for dep in $direct; do
    [ -n "${rank[$dep]:-}" ] || continue
    [ "$dep" != "$crate" ] || continue # itself with a feature, for its benches
    if [ "${rank[$dep]}" -ge "${rank[$crate]}" ]; then
      fail "$crate (layer ${rank[$crate]}) depends on $dep (layer ${rank[$dep]}): dependencies must point down"
    fi
  done
done

if [ "$failures" -gt 0 ]; then
  echo "check-layers: $failures problem(s)" >&2
  exit 1
fi
echo "check-layers: $(wc -w <<<"$members") crates keep their layers"
