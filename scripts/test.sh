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
# Network namespaces of test processes that are gone (a test killed by the runner's timeout
# has its guardian remove them; this catches anything else) are removed whatever the outcome.
sweep() {
  for ns in $(ip netns list 2>/dev/null | cut -d' ' -f1 | grep '^stt[0-9]*x' || true); do
    pid=${ns#stt}; pid=${pid%%x*}
    if [ ! -d "/proc/$pid" ]; then
      for p in $(ip netns pids "$ns" 2>/dev/null); do kill -9 "$p" 2>/dev/null || true; done
      ip netns del "$ns" 2>/dev/null || true
    fi
  done
}
trap sweep EXIT
cargo nextest run --workspace --locked --no-fail-fast
# A bounded smoke run of every fuzz target (docs/fuzzing.md has the longer run).
bash scripts/fuzz.sh 10
