#!/usr/bin/env bash
# Installs what a fresh Debian machine lacks for Strait's demo, tests and benchmarks.
# Idempotent: installs only what is missing. Needs root (apt-get).
set -euo pipefail

need=()
command -v ip >/dev/null || need+=(iproute2)
command -v iptables >/dev/null || need+=(iptables)
command -v curl >/dev/null || need+=(curl)
command -v h2load >/dev/null || need+=(nghttp2-client)
command -v setpriv >/dev/null || need+=(util-linux)
command -v sha256sum >/dev/null || need+=(coreutils)
command -v tcpdump >/dev/null || need+=(tcpdump)
command -v openssl >/dev/null || need+=(openssl)
# A real Prometheus and promtool for the telemetry tests (Debian's build).
command -v promtool >/dev/null || need+=(prometheus)
if [ "${1:-}" = "--bench" ]; then
  command -v wrk >/dev/null || need+=(wrk)
  command -v nginx >/dev/null || need+=(nginx-light)
fi
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" != 0 ]; then
    echo "setup: missing ${need[*]}; run as root to install them" >&2
    exit 1
  fi
  echo "setup: installing ${need[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
  # Only the prometheus binaries are wanted: the tests start their own, inside a namespace.
  if [[ " ${need[*]} " == *" prometheus "* ]] && command -v systemctl >/dev/null; then
    systemctl disable --now prometheus prometheus-node-exporter >/dev/null 2>&1 || true
  fi
fi
if ! command -v kubernetes-validate >/dev/null; then
  # Offline Kubernetes schemas (1.29 to 1.37) to validate `strait install` and `strait inject`.
  python3 -m pip --version >/dev/null 2>&1 || { echo "setup: python3 -m pip is needed for kubernetes-validate" >&2; exit 1; }
  echo "setup: installing kubernetes-validate"
  python3 -m pip install --quiet kubernetes-validate 2>/dev/null \
    || python3 -m pip install --quiet --break-system-packages kubernetes-validate
fi
if ! cargo nextest --version >/dev/null 2>&1; then
  echo "setup: installing cargo-nextest"
  cargo install --locked cargo-nextest
fi
