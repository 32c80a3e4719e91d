#!/usr/bin/env bash
# Fuzzes Strait's parsers with cargo-fuzz (libFuzzer + AddressSanitizer): protocol detection,
# HTTP header handling, the CA's CSR validation, AdmissionReview handling, local-mode YAML,
# and discovery answers applied to the balancer and router (fuzz/fuzz_targets/).
#
#   bash scripts/fuzz.sh            # 20 s per target: the smoke run the test suite does
#   bash scripts/fuzz.sh 3600       # an hour per target: the longer run (docs/fuzzing.md)
#   bash scripts/fuzz.sh 60 csr     # one target
#
# Uses the nightly toolchain when rustup has it, else stable with RUSTC_BOOTSTRAP=1 (stable
# ships the ASan runtime). Installs cargo-fuzz when missing. A crash stops the run with the
# input saved under fuzz/artifacts/<target>/; add it to fuzz/seeds/<target>/ once fixed, so every
# later run replays it.
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
seconds="${1:-20}"
shift || true
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(detect http_headers csr admission_review local_yaml discovery_update)

if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "fuzz: installing cargo-fuzz"
  cargo install --locked cargo-fuzz
fi
if rustup toolchain list 2>/dev/null | grep -q '^nightly'; then
  fuzz=(cargo +nightly fuzz)
else
  export RUSTC_BOOTSTRAP=1
  fuzz=(cargo fuzz)
fi
"${fuzz[@]}" build -O
for t in "${targets[@]}"; do
  mkdir -p "corpus/$t" "seeds/$t"
  echo "fuzz: $t for ${seconds}s"
  log="$(mktemp)"
  rc=0
  "${fuzz[@]}" run -O "$t" "corpus/$t" "seeds/$t" -- -max_total_time="$seconds" >"$log" 2>&1 || rc=$?
  grep -E '^(Done|==[0-9]+==ERROR|SUMMARY|thread .* panicked|Test unit written)' "$log" || true
  if [ "$rc" != 0 ]; then
    tail -n 40 "$log" >&2
    rm -f "$log"
    echo "fuzz: $t found a crash (exit $rc); the input is in fuzz/artifacts/$t/" >&2
    exit 1
  fi
  rm -f "$log"
done
echo "fuzz: ${#targets[@]} targets, ${seconds}s each, no crash"
