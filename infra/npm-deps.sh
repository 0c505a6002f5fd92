#!/usr/bin/env bash
# `npm ci` in infra/ unless node_modules already matches package-lock.json and
# this Node.js version (a stamp file records both), so repeated runs of
# test.sh and scripts/deploy.sh cost nothing and need no network.
#
#   infra/npm-deps.sh     prints what it did on stderr; exits non-zero if npm ci fails
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")"
stamp=node_modules/.fedstep-lock.sha256
want="$(sha256sum package-lock.json | cut -d' ' -f1) node-$(node --version)"
if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
  echo "infra: node_modules up to date with package-lock.json (npm ci skipped)" >&2
  exit 0
fi
echo "infra: npm ci" >&2
start=$SECONDS
npm ci --no-audit --no-fund --loglevel=error >&2
echo "$want" > "$stamp"
echo "   (npm ci: $((SECONDS - start))s)" >&2
