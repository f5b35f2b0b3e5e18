#!/usr/bin/env bash
# Runs every test: formatting, lints, unit tests, and the end-to-end tests in network namespaces.
# As root it installs missing Debian packages first (scripts/install-deps.sh).
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" -eq 0 ]; then
  scripts/install-deps.sh
fi

# A one-shot run gains nothing from incremental caches, and they are gigabytes on a clean clone;
# CI once ran out of disk. Set CARGO_INCREMENTAL=1 to keep them when iterating.
export CARGO_INCREMENTAL="${CARGO_INCREMENTAL:-0}"
disk() { echo "   (disk: $(df -h --output=avail . | tail -1 | tr -d ' ') free, target/ $(du -sh target 2>/dev/null | cut -f1))"; }

echo "== crate layers"
scripts/check-layers.sh
echo "== cargo fmt"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --workspace --all-targets -- -D warnings
echo "== boringtun's mock clock stays out of the main workspace"
# The sim crate (gateway/sim) enables boringtun's mock-instant; were any member of this workspace
# to, cargo would unify it into the waygate binary that the end-to-end tests run.
if grep -q '^name = "mock_instant"$' Cargo.lock; then
  echo "mock_instant is in Cargo.lock: the waygate binary could get boringtun's mocked clock" >&2
  exit 1
fi
tree=$(cargo tree --workspace --all-features -e all -i mock_instant 2>&1 || true)
if ! grep -q "did not match any packages" <<<"$tree"; then
  echo "mock_instant reaches the main workspace:" >&2
  echo "$tree" >&2
  exit 1
fi
echo "== cargo build"
cargo build --workspace --bins
echo "== cargo test"
cargo test --workspace -- --test-threads="${WAYGATE_TEST_THREADS:-1}"
disk
echo "== cargo test (gateway/sim: lossy links, boringtun's clock mocked)"
# Its own workspace (see gateway/sim/Cargo.toml), run from its directory to share target/.
(
  cd gateway/sim
  cargo fmt -- --check
  cargo clippy --all-targets -- -D warnings
  cargo test -- --test-threads="${WAYGATE_TEST_THREADS:-1}"
)
disk
echo "== cargo test (gateway/smoltcp: the patched copy's own tests, with the features we use)"
# Its own workspace, like gateway/sim; its target directory is under ours.
(
  cd gateway/smoltcp
  cargo fmt -- --check
  CARGO_TARGET_DIR=../../target/smoltcp cargo test --lib \
    --features socket-tcp-bbr,socket-tcp-cubic,assembler-max-segment-count-32
)
disk
echo "== Docker: the image and the compose lab (scripts/docker-test.sh)"
if [ "$(id -u)" -ne 0 ]; then
  echo "skipped: needs root"
elif [ "${WAYGATE_SKIP_DOCKER:-0}" = 1 ]; then
  echo "skipped: WAYGATE_SKIP_DOCKER=1"
else
  scripts/docker-test.sh
fi
