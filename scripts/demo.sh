#!/usr/bin/env bash
# The main job: build Strait and run `strait demo`, a local mesh with demo services and a live
# table of their golden signals. Extra arguments go to `strait demo` (e.g. --duration 30s).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
cargo build --release --workspace --bins --locked
exec target/release/strait demo "$@"
