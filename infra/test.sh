#!/usr/bin/env bash
# Offline checks of the CDK app: no AWS credentials, no network beyond npm and
# (once) PyPI for the Lambda build tools.
#
#   infra/test.sh            npm ci (only when node_modules is stale), tsc, jest,
#                            cdk synth with the real cargo-lambda build (synth-with-lambda.sh)
#   FEDSTEP_INFRA_LAMBDA=0   synthesize without building the Lambda (skipBuild) instead
#   FEDSTEP_INFRA_SYNTH=0    no `cdk synth` at all
# Neither shortcut is allowed under CI=true.
#
# Called by scripts/test.sh; exits non-zero on the first failure.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")"
export CDK_DISABLE_CLI_TELEMETRY=true   # no phoning home from the CDK CLI
export JSII_SILENCE_WARNING_UNTESTED_NODE_VERSION=1

step() { printf '\n== infra: %s\n' "$*"; }
timed() {
  local start=$SECONDS
  "$@"
  printf '   (%ss)\n' "$((SECONDS - start))"
}

case "${CI:-}" in
  true|1|yes|TRUE|True)
    if [[ "${FEDSTEP_INFRA_SYNTH:-1}" == "0" || "${FEDSTEP_INFRA_LAMBDA:-1}" == "0" ]]; then
      echo "infra/test.sh: CI=true: the cdk synth with the real Lambda build cannot be skipped" >&2
      exit 1
    fi ;;
esac

# --- dependencies: npm ci unless node_modules matches package-lock.json -----------
stamp=node_modules/.fedstep-lock.sha256
want="$(sha256sum package-lock.json | cut -d' ' -f1) node-$(node --version)"
if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
  step "node_modules up to date with package-lock.json (npm ci skipped)"
else
  step "npm ci"
  timed npm ci --no-audit --no-fund --loglevel=error
  echo "$want" > "$stamp"
fi

step "tsc --noEmit"
timed npx --no-install tsc --noEmit

step "jest"
timed npx --no-install jest --ci

# --- cdk synth: the real entry point (bin/fedstep.ts) through the CLI -------------
if [[ "${FEDSTEP_INFRA_SYNTH:-1}" != "0" && "${FEDSTEP_INFRA_LAMBDA:-1}" != "0" ]]; then
  step "cdk synth with the real cargo-lambda build"
  timed ./synth-with-lambda.sh
elif [[ "${FEDSTEP_INFRA_SYNTH:-1}" != "0" ]]; then
  step "cdk synth (Rust build skipped)"
  out="$(mktemp -d)"
  trap 'rm -rf "$out"' EXIT
  args=(-c skipBuild=true -c clients=site-a,site-b,site-c)
  if [[ ! -f ../crates/lambda/Cargo.toml ]]; then
    # crates/lambda not there yet: stand in a prebuilt-code directory.
    mkdir -p "$out/lambda" && printf '#!/bin/sh\n' > "$out/lambda/bootstrap"
    args+=(-c "lambdaAsset=$out/lambda")
  fi
  timed npx --no-install cdk synth --quiet --no-notices --no-version-reporting "${args[@]}" -o "$out/cdk.out"
  test -s "$out/cdk.out/Fedstep.template.json"
  # The three clients live in clients stacks Fedstep-Clients-NN (lib/client-batches.ts).
  clients_stacks=("$out"/cdk.out/Fedstep-Clients-*.template.json)
  if [[ ${#clients_stacks[@]} -ne 3 || ! -s "${clients_stacks[0]}" ]]; then
    echo "infra/test.sh: expected 3 clients stacks, got: ${clients_stacks[*]}" >&2
    exit 1
  fi
fi

step "ok"
