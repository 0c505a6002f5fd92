#!/usr/bin/env bash
# Contract tests of the state machine against the emulators.
#
#   scripts/test-emulators.sh [pytest args...]
#
# Brings the emulators up (installing them on first use), deploys an isolated
# copy of the stack under a unique prefix, runs tests/statemachine with the
# emulator venv's python, deletes the copy, and stops the emulators again if
# this script started them (FEDSTEP_EMU_KEEP=1 leaves them running).
# tests/statemachine runs both variants of the workflow: the emulators' one
# (activities, test_contract.py) and the AWS one (Lambda tasks answered by
# LocalStack's mocked service integrations, test_aws_variant.py; it needs the
# SFN_MOCK_CONFIG that `emulators.sh up` starts LocalStack with).
# Exit status: pytest's (non-zero on any failure). Under CI=true a missing
# emulator is a failure, never a skip.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
EMU="$ROOT/scripts/emulators.sh"
cd "$ROOT"

started_here=0
if ! "$EMU" status >/dev/null 2>&1; then
  started_here=1
fi
t0=$SECONDS
"$EMU" up
echo "test-emulators: emulators ready after $((SECONDS - t0))s" >&2

PY="$("$EMU" python)"
# pytest lives in the moto venv beside boto3; the marker makes this a no-op
# once the pinned set is in.
req="$ROOT/scripts/emulators/test-requirements.txt"
marker="$(dirname "$(dirname "$PY")")/.fedstep-test-requirements"
if [[ ! -f "$marker" ]] || ! cmp -s "$req" "$marker"; then
  PIP_NO_INPUT=1 PIP_DISABLE_PIP_VERSION_CHECK=1 "$PY" -m pip install --quiet -r "$req" </dev/null
  cp "$req" "$marker"
fi

if [[ -z "${AWS_ENDPOINT_URL:-}" ]]; then
  eval "$("$EMU" env)"
fi

prefix="t$(date +%s)-$$"
deploy_json="${FEDSTEP_EMU_DIR:-$ROOT/.emu}/deploy-$prefix.json"

# shellcheck disable=SC2317  # called by the EXIT trap
cleanup() {
  local rc=$?
  "$ROOT/scripts/local-deploy.sh" --prefix "$prefix" --delete >/dev/null 2>&1 || true
  if [[ "$started_here" == 1 && "${FEDSTEP_EMU_KEEP:-0}" != 1 ]]; then
    "$EMU" down || true
  fi
  exit "$rc"
}
trap cleanup EXIT

t0=$SECONDS
"$ROOT/scripts/local-deploy.sh" --prefix "$prefix" --out "$deploy_json" >/dev/null
echo "test-emulators: deployed prefix $prefix in $((SECONDS - t0))s" >&2

t0=$SECONDS
rc=0
FEDSTEP_DEPLOY_JSON="$deploy_json" "$PY" -m pytest -p no:cacheprovider "$ROOT/tests/statemachine" "$@" || rc=$?
echo "test-emulators: pytest finished in $((SECONDS - t0))s (exit $rc)" >&2
exit "$rc"
