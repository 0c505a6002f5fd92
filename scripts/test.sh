#!/usr/bin/env bash
# The one test command (README, .ci/run): everything, on a fresh machine.
#
#   scripts/test.sh
#
# Installs what it needs itself (emulators, numpy, cfn-lint and cargo-lambda from
# PyPI into venvs under .emu/, npm packages for infra/ with `npm ci`, Debian's
# chromium with apt-get), then runs, in order:
# formatting and lints, every Rust test (unit, golden, property, and the
# integration tests against LocalStack + moto, among them the Lambda bootstrap
# behind cargo-lambda's Runtime API), the state machine's contract
# tests on LocalStack (the activity variant, and the AWS one with mocked
# Lambda answers), the CDK app's offline tests, the downloadable binaries
# (scripts/dist.sh: checked, then in an emulator round), the simulator's
# accuracy targets, the report page in headless Chromium, a 50-client load
# test on the emulators, and a benchmark smoke run. Exits non-zero on the
# first failure.
#
# Everything Rust is built once, in the release profile: the README's
# `cargo run --release -p fedstep -- simulate` then reuses the same build.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"
export PIP_NO_INPUT=1 PIP_DISABLE_PIP_VERSION_CHECK=1

# Binaries built by the workspace test build below (honours CARGO_TARGET_DIR).
bin_dir="${CARGO_TARGET_DIR:-$ROOT/target}/release"
export FEDSTEP_BIN_DIR="$bin_dir"

started=$SECONDS
step() { printf '\n==> %s  (t+%ss)\n' "$*" "$((SECONDS - started))"; }
die() { printf 'test.sh: error: %s\n' "$*" >&2; exit 1; }

for tool in cargo python3 node npm; do
  command -v "$tool" >/dev/null || die "$tool is not installed (see README: prerequisites)"
done

mkdir -p .emu
# Emulators and numpy install from PyPI while Rust compiles (network and
# unpacking, not CPU: they overlap well with the build).
step "installing emulators and tools in the background (log: .emu/install.log)"
(
  scripts/emulators.sh install
  infra/cfn-lint.sh --install   # pinned cfn-lint for infra/test.sh; a no-op once installed
  # cargo-lambda: its Runtime API runs the Lambda bootstrap in
  # crates/lambda/tests/runtime_api (and infra/test.sh builds with it).
  infra/lambda-tools.sh >/dev/null
  if [[ ! -x .emu/tools/bin/python ]] || ! .emu/tools/bin/python -c 'import numpy' 2>/dev/null; then
    python3 -m venv .emu/tools
    .emu/tools/bin/pip install --quiet 'numpy>=1.26,<3'
  fi
  # Debian's Chromium: the report page is opened in a real headless browser.
  if ! command -v chromium >/dev/null; then
    sudo_=""; [[ "$(id -u)" == 0 ]] || sudo_="sudo"
    export DEBIAN_FRONTEND=noninteractive
    $sudo_ apt-get install -y -q chromium || { $sudo_ apt-get update -q && $sudo_ apt-get install -y -q chromium; }
  fi
) >.emu/install.log 2>&1 </dev/null &
install_pid=$!

step "cargo fmt --check"
cargo fmt --all -- --check

step "cargo clippy (all targets, -D warnings)"
cargo clippy --workspace --all-targets --release --locked -- -D warnings

# After clippy on purpose: with the same profile, rustdoc reuses the
# dependencies' metadata clippy just produced (seconds, not minutes).
step "cargo doc (warnings denied)"
RUSTDOCFLAGS="-D warnings" cargo doc --workspace --release --no-deps --locked

step "building tests (release)"
cargo test --workspace --release --locked --no-run

step "waiting for the emulator install"
if ! wait "$install_pid"; then
  tail -n 40 .emu/install.log >&2
  die "installing the emulators, cfn-lint, cargo-lambda, numpy or chromium failed (full log: .emu/install.log)"
fi
export FEDSTEP_PYTHON="$ROOT/.emu/tools/bin/python"
FEDSTEP_CARGO_LAMBDA="$(infra/lambda-tools.sh 2>/dev/null)/cargo-lambda"
export FEDSTEP_CARGO_LAMBDA

step "starting the emulators"
emu_started=0
if ! scripts/emulators.sh status >/dev/null 2>&1; then
  emu_started=1
fi
scripts/emulators.sh up
eval "$(scripts/emulators.sh env)"
prefix="rt$(date +%s)-$$"
export FEDSTEP_TEST_DEPLOY="$ROOT/.emu/deploy-$prefix.json"
cleanup() {
  local rc=$?
  scripts/local-deploy.sh --prefix "$prefix" --delete >/dev/null 2>&1 || true
  if [[ "$emu_started" == 1 && "${FEDSTEP_EMU_KEEP:-0}" != 1 ]]; then
    scripts/emulators.sh down >/dev/null 2>&1 || true
  fi
  exit "$rc"
}
trap cleanup EXIT
scripts/local-deploy.sh --prefix "$prefix" --out "$FEDSTEP_TEST_DEPLOY" >/dev/null

step "cargo test (workspace, release; emulator tests use prefix $prefix)"
cargo test --workspace --release --locked

step "state machine contract tests on LocalStack"
FEDSTEP_EMU_KEEP=1 scripts/test-emulators.sh -q

step "infra: CDK app offline tests"
infra/test.sh

# Right after infra/test.sh on purpose: dist.sh builds with the Lambda build's
# tools, target, profile and target directory, so it reuses its compiled
# dependencies. It checks its output itself (glibc <= 2.17, stripped,
# SHA256SUMS); the workspace binaries must fail that check, or the check
# would pass anything.
step "dist: downloadable binaries for glibc 2.17+ (scripts/dist.sh)"
dist_dir="$ROOT/dist"
DIST_DIR="$dist_dir" scripts/dist.sh
dist_tmp="$(mktemp -d)"
mkdir "$dist_tmp/host" "$dist_tmp/bins"
ln -s "$bin_dir/fedstep" "$bin_dir/fedstep-client" "$dist_tmp/host/"
(cd "$dist_tmp/host" && sha256sum fedstep fedstep-client > SHA256SUMS)
if refusal="$(scripts/dist.sh --check "$dist_tmp/host" 2>&1)" || ! grep -q 'needs GLIBC_' <<<"$refusal"; then
  die "scripts/dist.sh --check should reject the workspace binaries (built against this host's glibc) for their glibc version; it said: $refusal"
fi

step "dist: the downloadable binaries run a federation on the emulators"
"$dist_dir/fedstep" --version
"$dist_dir/fedstep-client" --version
"$dist_dir/fedstep" simulate --rounds 3 --out "$dist_tmp/simulate" >/dev/null
# tests/e2e's full_job scenario (three `fedstep-client run`, `fedstep job
# start`, three rounds, the weighted mean checked) with the dist binaries;
# the emulator worker (fedstep-lambda) is no download, so it is the
# workspace's. --workspace as above so that nothing is rebuilt; CI=true so
# that it cannot skip.
ln -s "$dist_dir/fedstep" "$dist_dir/fedstep-client" "$bin_dir/fedstep-lambda" "$dist_tmp/bins/"
CI=true FEDSTEP_BIN_DIR="$dist_tmp/bins" cargo test --workspace --release --locked --test scenarios full_job
rm -rf "$dist_tmp"

if [[ -x scripts/simulate-targets.sh ]]; then
  step "simulator accuracy targets"
  FEDSTEP_BIN="$bin_dir/fedstep" scripts/simulate-targets.sh
fi

step "the report page in headless Chromium (fedstep simulate's report.html)"
report_dir="$(mktemp -d)"
"$bin_dir/fedstep" simulate --out "$report_dir" >/dev/null
# 10 charts: aggregated metrics, baselines, participation, weights, the five
# metrics the simulated clients report, aggregation time.
python3 scripts/check_report_page.py "$report_dir/report.html" 10
rm -rf "$report_dir"

step "load test: 50 clients, 3 rounds on the emulators (fails on a lost or doubled update)"
"$bin_dir/fedstep" bench clients --clients 50 --rounds 3

step "benchmark smoke run (figures are not asserted here: see scripts/bench.sh)"
"$bin_dir/fedstep" bench aggregate --clients 4 --params 2M --runs 1
# Through a deployed stack of its own, two workers, three shards: exits
# non-zero unless the committed model is bit for bit what `fedstep
# aggregate` computes and neither worker touched its scratch directories.
"$bin_dir/fedstep" bench round --mode deployed --clients 3 --params 6M --shards 3

step "all tests passed in $((SECONDS - started))s"
