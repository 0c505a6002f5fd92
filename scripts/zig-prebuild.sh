#!/usr/bin/env bash
# Compiles ahead of time what the two zig builds of scripts/test.sh will ask
# for, into ${CARGO_TARGET_DIR:-<repo>/target}/lambda:
#
#   1. the Lambda bootstrap that infra/test.sh's synth stages: the command
#      cargo-lambda-cdk runs for infra/lib/aggregator.ts (its cargoLambdaFlags
#      and environment, in crates/lambda, as scripts/deploy.sh sets the
#      target directory);
#   2. the downloadable binaries: scripts/dist.sh itself, into a scratch
#      DIST_DIR.
#
# Nothing here is kept or trusted: the later steps run their own commands,
# and cargo finds the units up to date. A flag or variable that drifted
# from aggregator.ts would only cost time (cargo rebuilds what differs in
# the synth), never correctness; the synth's printed build time shows it.
#
# scripts/test.sh runs this in the background at idle CPU priority, while
# the workspace build and the emulator tests run (see there why).
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
start=$SECONDS
tools="$("$root/infra/lambda-tools.sh")"
export PATH="$tools:$PATH"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$root/target}/lambda"
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"
scratch="$(mktemp -d)"
trap 'rm -rf "$scratch"' EXIT

# aggregator.ts: LAMBDA_BINARY, LAMBDA_GLIBC, cargoLambdaFlags, environment;
# cargo-lambda-cdk adds --lambda-dir, --release, --bin and --flatten.
(
  cd "$root/crates/lambda"
  CARGO_PROFILE_RELEASE_STRIP=debuginfo cargo lambda build --lambda-dir "$scratch/lambda" \
    --release --bin fedstep-lambda --flatten fedstep-lambda \
    --locked --disable-optimizations --target x86_64-unknown-linux-gnu.2.17
)
echo "zig-prebuild: the Lambda bootstrap after $((SECONDS - start)) s"

DIST_DIR="$scratch/dist" "$root/scripts/dist.sh"
echo "zig-prebuild: the downloadable binaries after $((SECONDS - start)) s"
