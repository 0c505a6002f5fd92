#!/usr/bin/env bash
# Offline checks of the CDK app: no AWS credentials, no network beyond npm and
# (once) PyPI for the Lambda build tools and cfn-lint (and the emulators on
# 127.0.0.1, when scripts/test.sh hands them over).
#
#   infra/test.sh            npm ci (only when node_modules is stale), tsc, jest,
#                            scripts/deploy.sh refusing a deploy without credentials,
#                            cdk synth with the real cargo-lambda build through
#                            scripts/deploy.sh (synth-with-lambda.sh), that build's
#                            bootstrap behind a Lambda Runtime API on the emulators
#                            (if FEDSTEP_TEST_DEPLOY is set, as scripts/test.sh does),
#                            a synth of 100 clients, and cfn-lint on every stack of both synths
#   FEDSTEP_INFRA_LAMBDA=0   synthesize without building the Lambda (skipBuild) instead
#   FEDSTEP_INFRA_SYNTH=0    no `cdk synth` (and so no cfn-lint) at all
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
step "npm dependencies (npm-deps.sh)"
timed ./npm-deps.sh

step "tsc --noEmit"
timed npx --no-install tsc --noEmit

step "jest"
timed npx --no-install jest --ci

# --- the deploy command refuses without credentials, before building anything ----
# No AWS_* variables, an empty HOME (no ~/.aws), no instance metadata lookup:
# scripts/deploy.sh deploy must stop at once with exit status 3 and say why.
step "scripts/deploy.sh deploy without AWS credentials is refused"
refusal_start=$SECONDS
nocreds="$(mktemp -d)"
set +e
refusal="$(env -i PATH="$PATH" HOME="$nocreds" AWS_EC2_METADATA_DISABLED=true \
  ../scripts/deploy.sh deploy --all -c clients=site-a 2>&1)"
rc=$?
set -e
rm -rf "$nocreds"
if [[ $rc -ne 3 ]] || ! grep -q "needs AWS credentials" <<<"$refusal"; then
  printf '%s\n' "$refusal" >&2
  echo "infra/test.sh: expected scripts/deploy.sh deploy to refuse (exit 3) without credentials, got exit $rc" >&2
  exit 1
fi
echo "   refused (exit 3): $(head -n 1 <<<"$refusal")"
printf '   (%ss)\n' "$((SECONDS - refusal_start))"

# --- cdk synth: the real entry point (bin/fedstep.ts) through the CLI -------------
if [[ "${FEDSTEP_INFRA_SYNTH:-1}" != "0" ]]; then
  out="$(mktemp -d)"
  trap 'rm -rf "$out"' EXIT
  # Clients stacks Fedstep-Clients-NN (lib/client-batches.ts) of a synth.
  expect_clients_stacks() {
    local dir="$1" want="$2" stacks
    stacks=("$dir"/Fedstep-Clients-*.template.json)
    test -s "$dir/Fedstep.template.json"
    if [[ ${#stacks[@]} -ne $want || ! -s "${stacks[0]}" ]]; then
      echo "infra/test.sh: expected $want clients stacks in $dir, got: ${stacks[*]}" >&2
      exit 1
    fi
  }
  skip=(-c skipBuild=true)
  if [[ ! -f ../crates/lambda/Cargo.toml ]]; then
    # crates/lambda not there yet: stand in a prebuilt-code directory.
    mkdir -p "$out/lambda" && printf '#!/bin/sh\n' > "$out/lambda/bootstrap"
    skip+=(-c "lambdaAsset=$out/lambda")
  fi
  quiet=(--quiet --no-notices --no-version-reporting)

  if [[ "${FEDSTEP_INFRA_LAMBDA:-1}" != "0" ]]; then
    step "cdk synth with the real cargo-lambda build (scripts/deploy.sh synth)"
    timed ./synth-with-lambda.sh "$out/real"
    expect_clients_stacks "$out/real/cdk.out" 3
    staged=("$out/real/cdk.out"/asset.*/bootstrap)
    if [[ ${#staged[@]} -ne 1 || ! -x "${staged[0]}" ]]; then
      echo "infra/test.sh: expected one staged bootstrap, found: ${staged[*]}" >&2
      exit 1
    fi
    # Built as the tests build: panics unwind (cargo-lambda's release
    # defaults would make them abort, see lib/aggregator.ts), so a panicked
    # aggregation task fails its task instead of killing the process. A
    # panic=abort binary carries the panic_abort runtime's source path (a
    # panic location, so it survives stripping: found in the bootstrap built
    # with cargo-lambda's defaults); the unwind runtime leaves no such trace
    # in a stripped, zig-linked binary, so this checks the one direction.
    step "the staged bootstrap does not abort on panic (cargo-lambda's panic=abort)"
    if grep -aq 'library/panic_abort/' "${staged[0]}"; then
      echo "infra/test.sh: the staged bootstrap was built with panic=abort (build it with cargo lambda build --disable-optimizations)" >&2
      exit 1
    fi
    echo "   no panic_abort runtime in the bootstrap"
    # The staged bootstrap is the artifact that gets deployed: run it behind a
    # Lambda Runtime API on the emulators (crates/lambda/tests/runtime_api),
    # which scripts/test.sh has up (FEDSTEP_TEST_DEPLOY) when it calls this.
    if [[ -n "${FEDSTEP_TEST_DEPLOY:-}" ]]; then
      step "the staged bootstrap behind a Lambda Runtime API, on the emulators"
      (
        cd .. && export FEDSTEP_LAMBDA_BOOTSTRAP="${staged[0]}"
        # --workspace: the features scripts/test.sh built the tests with, so
        # nothing is rebuilt (-p fedstep-lambda alone resolves other features
        # under the AWS SDK and recompiled it: 6 min 50 s in one run).
        timed cargo test --workspace --release --locked --test runtime_api
      )
    elif [[ "${CI:-}" =~ ^(true|1|yes|TRUE|True)$ ]]; then
      echo "infra/test.sh: CI=true: the staged bootstrap must run on the emulators (run through scripts/test.sh)" >&2
      exit 1
    else
      echo "   (staged bootstrap not run: no emulators; scripts/test.sh runs it)"
    fi
  else
    step "cdk synth (Rust build skipped)"
    timed ../scripts/deploy.sh synth "${quiet[@]}" "${skip[@]}" -c clients=site-a,site-b,site-c -o "$out/real/cdk.out"
    expect_clients_stacks "$out/real/cdk.out" 3
  fi

  # 100 clients over all 16 clients stacks, with every kind of client setting
  # and the Roles Anywhere trust anchor (test/fixtures/lint.config.json), so
  # cfn-lint sees every resource type the app can emit. The Lambda build is
  # skipped: the templates do not depend on it, and one Rust build is enough.
  step "cdk synth of 100 clients (Rust build skipped)"
  many="$(seq -f 'c%03g' -s, 0 96)"   # c000,...,c096 + the fixture's 3 = 100
  timed ../scripts/deploy.sh synth "${quiet[@]}" "${skip[@]}" -c config=test/fixtures/lint.config.json \
    -c "clients=$many" -o "$out/many/cdk.out"
  expect_clients_stacks "$out/many/cdk.out" 16

  step "cfn-lint on every synthesized stack (rules ignored on purpose: .cfnlintrc)"
  timed ./cfn-lint.sh "$out/real/cdk.out" "$out/many/cdk.out"
fi

step "ok"
