#!/usr/bin/env bash
# Deploy (or synthesize, diff, destroy) the fedstep CDK app on a machine with
# just Rust, Node.js and Python: the CDK CLI pinned in infra/package-lock.json
# (npm ci when node_modules is stale), cargo-lambda and zig pinned from PyPI
# (infra/lambda-tools.sh, the same tools infra/test.sh builds with), then
# `cdk COMMAND ARGS...` in infra/. No Docker.
#
#   scripts/deploy.sh deploy --all -c clients=site-a,site-b,site-c --outputs-file cdk-outputs.json
#   scripts/deploy.sh synth -c clients=site-a,site-b     # the bundled templates in infra/cdk.out
#   scripts/deploy.sh diff --all -c clients=site-a,site-b
#   scripts/deploy.sh destroy --all -c clients=site-a,site-b
#
# Every argument after COMMAND goes to the CDK CLI unchanged; relative paths
# in them (--outputs-file, -o, -c config=..., -c lambdaAsset=...) are relative
# to infra/, as with `npx cdk` there. infra/test.sh synthesizes through this
# script (infra/synth-with-lambda.sh), so the tested build is the deployed one.
#
# Commands that talk to an account (deploy, destroy, diff, bootstrap, watch,
# import, rollback, drift) first check that AWS credentials are there and
# stop with exit status 3 if not, before anything is installed or built.
#
# Environment:
#   CARGO_TARGET_DIR            the Lambda builds into $CARGO_TARGET_DIR/lambda
#                               (default <repo>/target/lambda): apart from the
#                               workspace build, whose compiler settings differ
#   FEDSTEP_LAMBDA_TOOLS=dir    where lambda-tools.sh keeps its venv
#   FEDSTEP_SKIP_CREDENTIAL_CHECK=1   trust the CDK CLI to find credentials
#                               (e.g. an EC2 instance role, which this script
#                               cannot see without the aws CLI)
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
infra="$root/infra"

# die MESSAGE [EXIT_STATUS]
die() { printf 'deploy.sh: %s\n' "$1" >&2; exit "${2:-1}"; }

usage() { sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; }
case "${1:-}" in
  -h|--help) usage; exit 0 ;;
  "") usage >&2; exit 2 ;;
esac
command="$1"

# --- credentials first: refuse before minutes of npm and cargo --------------------
# A credential source the AWS SDK (and so the CDK CLI) would use: the
# standard environment variables, SSO/web identity, a container role, or a
# config/credentials file. With a working aws CLI, ask STS instead: that also
# catches expired or wrong credentials.
credential_source() {
  if aws --version >/dev/null 2>&1; then
    aws sts get-caller-identity --query Arn --output text 2>&1
    return
  fi
  local v
  for v in AWS_ACCESS_KEY_ID AWS_PROFILE AWS_WEB_IDENTITY_TOKEN_FILE \
           AWS_CONTAINER_CREDENTIALS_RELATIVE_URI AWS_CONTAINER_CREDENTIALS_FULL_URI; do
    if [[ -n "${!v:-}" ]]; then echo "\$$v is set"; return 0; fi
  done
  local f
  for f in "${AWS_SHARED_CREDENTIALS_FILE:-$HOME/.aws/credentials}" "${AWS_CONFIG_FILE:-$HOME/.aws/config}"; do
    if [[ -s "$f" ]]; then echo "$f exists"; return 0; fi
  done
  echo "no AWS_ACCESS_KEY_ID, AWS_PROFILE, web identity, container role or ~/.aws/{credentials,config}"
  return 1
}

case "$command" in
  deploy|destroy|diff|bootstrap|watch|import|rollback|drift)
    if [[ "${FEDSTEP_SKIP_CREDENTIAL_CHECK:-0}" != 1 ]]; then
      if ! who="$(credential_source)"; then
        die "'cdk $command' needs AWS credentials for the target account, and none were found:
  $who
Configure them first (e.g. 'aws configure sso' and export AWS_PROFILE=..., or
AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY/AWS_SESSION_TOKEN), and bootstrap the
environment once: scripts/deploy.sh bootstrap aws://ACCOUNT/REGION.
On an EC2 instance role without the aws CLI, set FEDSTEP_SKIP_CREDENTIAL_CHECK=1." 3
      fi
      echo "deploy.sh: AWS credentials: $who" >&2
    fi ;;
esac

build=1
for arg in "${@:2}"; do
  case "$arg" in
    skipBuild=true|skipBuild=1)
      # Such a synth's Lambda asset is the crate's source directory (bin/fedstep.ts).
      [[ "$command" == deploy ]] && die "refusing to deploy with skipBuild: its Lambda asset is the source directory, not a build"
      build=0 ;;
    lambdaAsset=*) build=0 ;;
    arch=arm64|arch=aarch64)
      # Fail here, not after npm ci, when the Rust standard library for arm64 is missing.
      if ! rustup target list --installed 2>/dev/null | grep -qx aarch64-unknown-linux-gnu; then
        die "arch=arm64 needs the Rust target aarch64-unknown-linux-gnu: rustup target add aarch64-unknown-linux-gnu"
      fi ;;
  esac
done

for tool in node npm python3; do
  command -v "$tool" >/dev/null || die "$tool is not installed (needed: Node.js >= 20 with npm, Python 3 with venv, Rust)"
done
if [[ "$build" == 1 ]]; then
  command -v cargo >/dev/null || die "cargo is not installed: the Lambda is built from crates/lambda with Rust (https://rustup.rs)"
  # cargo-lambda + zig, pinned; progress on stderr, the bin directory on stdout.
  tools="$("$infra/lambda-tools.sh")"
  export PATH="$tools:$PATH"
  export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$root/target}/lambda"
  echo "deploy.sh: Lambda build with $(cargo lambda --version) into $CARGO_TARGET_DIR" >&2
fi

"$infra/npm-deps.sh"

export CDK_DISABLE_CLI_TELEMETRY="${CDK_DISABLE_CLI_TELEMETRY:-true}"   # no phoning home unless asked
export JSII_SILENCE_WARNING_UNTESTED_NODE_VERSION=1
cd "$infra"
exec npx --no-install cdk "$@"
