#!/usr/bin/env bash
# Runs every cargo-fuzz target in fuzz/ for a bounded time (outside CI;
# CI runs the fixed-iteration property tests of the same paths instead).
#
#   scripts/fuzz.sh [seconds-per-target] [target...]
#
# Needs `cargo install cargo-fuzz`. cargo-fuzz passes nightly-only flags
# (-Zsanitizer=address, -Cpasses=sancov-module); with only a stable
# toolchain installed, RUSTC_BOOTSTRAP=1 lets stable rustc accept them.
# Findings land in fuzz/artifacts/<target>/; replay one with
#   RUSTC_BOOTSTRAP=1 cargo fuzz run <target> fuzz/artifacts/<target>/<file>
set -euo pipefail

seconds="${1:-60}"
shift || true
cd "$(dirname "$0")/../fuzz"

if ! command -v cargo-fuzz >/dev/null 2>&1; then
    echo "fuzz.sh: cargo-fuzz is not installed (cargo install cargo-fuzz)" >&2
    exit 2
fi
if ! rustc --version | grep -q nightly; then
    export RUSTC_BOOTSTRAP=1
fi
# Its own target dir: sanitizer builds would otherwise evict the normal ones.
export CARGO_TARGET_DIR="${FUZZ_TARGET_DIR:-${CARGO_TARGET_DIR:-target}-fuzz}"

targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
    mapfile -t targets < <(cargo fuzz list)
fi

status=0
for t in "${targets[@]}"; do
    mkdir -p "corpus/$t"
    log="${TMPDIR:-/tmp}/fuzz-$t.log"
    echo "== $t: ${seconds}s (log: $log)"
    rc=0
    # corpus/<t> (untracked) collects what libFuzzer finds; seeds/<t>
    # (tracked) holds hand-written inputs it would take long to find.
    seeds=()
    if [ -d "seeds/$t" ]; then seeds=("seeds/$t"); fi
    cargo fuzz run "$t" "corpus/$t" "${seeds[@]}" -- \
        -max_total_time="$seconds" -rss_limit_mb=2048 -max_len=65536 >"$log" 2>&1 || rc=$?
    grep -E '^(Done [0-9]+ runs|SUMMARY|==[0-9]+==ERROR)' "$log" || tail -5 "$log"
    if [ "$rc" -ne 0 ]; then
        echo "fuzz.sh: $t FAILED (exit $rc): see fuzz/artifacts/$t/ and $log" >&2
        status=1
    fi
done
exit $status
