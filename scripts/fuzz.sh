#!/usr/bin/env bash
# Fuzzes Waygate's parsers of outside input with cargo-fuzz (libFuzzer) and prints a table.
#
#   scripts/fuzz.sh [SECONDS] [TARGET...]
#
# Runs each TARGET (default: all) for SECONDS (default 60) and prints target / seconds / runs /
# result; exits 1 when a target crashed (panic, failed assertion, timeout, out of memory), with the
# input under tests/fuzz/fuzz/artifacts/TARGET/. Reproduce one with
#   RUSTC_BOOTSTRAP=1 cargo fuzz run --fuzz-dir tests/fuzz/fuzz -a -s none TARGET ARTIFACT
# and, once fixed, commit the minimized input (cargo fuzz tmin ...) to tests/fuzz/seeds/TARGET/,
# where `cargo test -p waygate-fuzz` replays it on stable with every other seed.
#
# Targets (bodies in tests/fuzz/src/lib.rs, product paths in its `product` module):
#   inner_packet  a decrypted inner IP packet (flow::packet::parse) and the packets built from it
#   sniff         protocol detection / ClientHello SNI / HTTP Host on first bytes, cut anywhere
#   dns           the sans-IO resolver: a device's query, an upstream's answer, wire fast path
#   wireguard     datagrams into the endpoint with one peer; a real handshake then mangled data
#   policy_expr   a policy expression: parse, typecheck, print/reparse, compile vs interpreter
#   rules_json    a Cloudflare rules file, lists file and eval input (`waygate rules check|eval`)
#   config        the TOML config file
#   posture_json  a device posture rule and a device's facts (`waygate posture create`, /v1/posture)
#
# Layout: tests/fuzz is the library (a workspace member); tests/fuzz/fuzz is the cargo-fuzz
# package, its own workspace with its own lock file and target directory. Seeds are read from
# tests/fuzz/seeds/TARGET (committed, never written); what the fuzzer finds goes to
# tests/fuzz/fuzz/corpus/TARGET (ignored by git) and is reused by the next run.
#
# Environment:
#   FUZZ_TOOLCHAIN   toolchain for cargo fuzz (default: the default one; a stable toolchain
#                    runs with RUSTC_BOOTSTRAP=1, which the sanitizer flags need)
#   FUZZ_SANITIZER   none (default: the code is safe Rust; faster) or address, memory, thread
#   FUZZ_JOBS        build jobs (default 1: the build machine is shared)
#   FUZZ_ARGS        extra libFuzzer flags, e.g. "-max_len=20000"
#
# cargo-fuzz is installed when missing (`cargo install cargo-fuzz --locked`, from crates.io).
set -euo pipefail

cd "$(dirname "$0")/.."
FUZZ_DIR=tests/fuzz/fuzz
SEEDS=tests/fuzz/seeds
ALL_TARGETS=(inner_packet sniff dns wireguard wg_initiator policy_expr rules_json config posture_json client_hello file_types proxy_head h2_settings)

SECONDS_EACH=60
if [[ $# -gt 0 && $1 =~ ^[0-9]+$ ]]; then
    SECONDS_EACH=$1
    shift
fi
if [[ $# -gt 0 ]]; then
    TARGETS=("$@")
else
    TARGETS=("${ALL_TARGETS[@]}")
fi
for t in "${TARGETS[@]}"; do
    if [[ ! -f $FUZZ_DIR/fuzz_targets/$t.rs ]]; then
        echo "fuzz.sh: unknown target \"$t\" (targets: ${ALL_TARGETS[*]})" >&2
        exit 2
    fi
done

TOOLCHAIN=()
if [[ -n ${FUZZ_TOOLCHAIN:-} ]]; then
    TOOLCHAIN=("+$FUZZ_TOOLCHAIN")
fi
export RUSTC_BOOTSTRAP=1
export CARGO_BUILD_JOBS=${FUZZ_JOBS:-1}
SANITIZER=${FUZZ_SANITIZER:-none}
# Debug assertions on: integer overflow on hostile input is a finding too.
BUILD_FLAGS=(--fuzz-dir "$FUZZ_DIR" --debug-assertions --sanitizer "$SANITIZER")

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "fuzz.sh: installing cargo-fuzz" >&2
    cargo install cargo-fuzz --locked
fi

echo "fuzz.sh: building ${TARGETS[*]} (sanitizer $SANITIZER, $CARGO_BUILD_JOBS build jobs)" >&2
if [[ ${#TARGETS[@]} -eq ${#ALL_TARGETS[@]} ]]; then
    cargo "${TOOLCHAIN[@]}" fuzz build "${BUILD_FLAGS[@]}"
else
    for t in "${TARGETS[@]}"; do
        cargo "${TOOLCHAIN[@]}" fuzz build "${BUILD_FLAGS[@]}" "$t"
    done
fi

LOGS=$(mktemp -d)
trap 'rm -rf "$LOGS"' EXIT
declare -A RUNS RESULT
failed=0
for t in "${TARGETS[@]}"; do
    mkdir -p "$FUZZ_DIR/corpus/$t" "$FUZZ_DIR/artifacts/$t"
    echo "fuzz.sh: $t for ${SECONDS_EACH}s" >&2
    status=0
    # The first corpus directory receives new inputs; the seeds are only read.
    # shellcheck disable=SC2086
    cargo "${TOOLCHAIN[@]}" fuzz run "${BUILD_FLAGS[@]}" "$t" \
        "$FUZZ_DIR/corpus/$t" "$SEEDS/$t" -- \
        -max_total_time="$SECONDS_EACH" -timeout=10 -print_final_stats=1 \
        -artifact_prefix="$FUZZ_DIR/artifacts/$t/" ${FUZZ_ARGS:-} \
        >"$LOGS/$t.log" 2>&1 || status=$?
    RUNS[$t]=$(sed -n 's/^stat::number_of_executed_units: *//p' "$LOGS/$t.log" | tail -n 1)
    if [[ $status -eq 0 ]]; then
        RESULT[$t]=ok
    else
        failed=1
        artifact=$(sed -n 's/.*Test unit written to \(.*\)$/\1/p' "$LOGS/$t.log" | tail -n 1)
        RESULT[$t]="FAILED (exit $status)${artifact:+: $artifact}"
        cp "$LOGS/$t.log" "$FUZZ_DIR/artifacts/$t/last-run.log"
        echo "fuzz.sh: $t failed; log in $FUZZ_DIR/artifacts/$t/last-run.log" >&2
        grep -E "panicked at|ERROR: libFuzzer|SUMMARY" "$LOGS/$t.log" | head -n 5 >&2 || true
    fi
done

printf '\n%-14s %8s %12s  %s\n' target seconds runs result
for t in "${TARGETS[@]}"; do
    printf '%-14s %8s %12s  %s\n' "$t" "$SECONDS_EACH" "${RUNS[$t]:-?}" "${RESULT[$t]}"
done
exit "$failed"
