#!/usr/bin/env bash
# The whole test suite: formatting, lints, unit tests and the end-to-end tests (which create
# network namespaces and iptables rules, so this runs as root).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings
# The e2e tests run the workspace binaries; build them first.
cargo build --workspace --bins --locked
cargo nextest run --workspace --locked --no-fail-fast
