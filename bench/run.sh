#!/usr/bin/env bash
# Benchmark: builds release binaries and runs strait-bench (as root: it makes network
# namespaces). Arguments go to strait-bench, e.g. --duration 20s --rate 2000 --threads 1.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --bench
cargo build --release --workspace --bins --locked
exec target/release/strait-bench "$@"
