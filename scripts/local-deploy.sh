#!/usr/bin/env bash
# Deploy fedstep's resources onto the emulators (idempotent).
#
#   scripts/local-deploy.sh [--prefix NAME] [--clients a,b,c] [--out FILE]
#                           [--client-configs DIR] [--print-env] [--delete]
#
# Defaults: prefix $FEDSTEP_PREFIX or "fedstep", clients $FEDSTEP_CLIENTS or
# "site-a,site-b,site-c", output .emu/deploy-<prefix>.json. Prints the
# deployment as JSON on stdout. See scripts/local_deploy.py for what is created.
#
# Endpoints: the standard AWS_* variables if AWS_ENDPOINT_URL is set (e.g.
# LocalStack in Docker), else the ones `scripts/emulators.sh env` prints.
# Needs only the emulator venv (boto3 comes with moto[server]); run
# `scripts/emulators.sh up` first.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="$("$ROOT/scripts/emulators.sh" python)"
[[ -x "$PY" ]] || { echo "local-deploy: $PY missing; run scripts/emulators.sh up" >&2; exit 1; }

if [[ -z "${AWS_ENDPOINT_URL:-}" ]]; then
  eval "$("$ROOT/scripts/emulators.sh" env)"
fi

exec "$PY" "$ROOT/scripts/local_deploy.py" "$@"
