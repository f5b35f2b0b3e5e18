#!/usr/bin/env bash
# Runs every test: formatting, lints, unit tests, and the end-to-end tests in network namespaces.
# As root it installs missing Debian packages first (scripts/install-deps.sh).
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" -eq 0 ]; then
  scripts/install-deps.sh
fi

echo "== crate layers"
scripts/check-layers.sh
echo "== cargo fmt"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --workspace --all-targets -- -D warnings
echo "== cargo build"
cargo build --workspace --bins
echo "== cargo test"
cargo test --workspace -- --test-threads="${WAYGATE_TEST_THREADS:-1}"
