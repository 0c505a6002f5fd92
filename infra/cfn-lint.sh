#!/usr/bin/env bash
# AWS's CloudFormation linter, cfn-lint (PyPI, pinned), on every template of
# one or more cdk.out directories: the main stack and all its
# <stack>-Clients-NN stacks. Exits non-zero on any finding that
# infra/.cfnlintrc does not ignore (errors, warnings and informational
# findings alike), so a new warning fails the check until it is fixed or
# justified there.
#
#   infra/cfn-lint.sh CDK_OUT_DIR...
#   infra/cfn-lint.sh --install        only install (scripts/test.sh does it in
#                                      the background while Rust compiles)
#   FEDSTEP_CFN_LINT_VENV=dir   venv location (default: <repo>/.emu/cfn-lint)
#
# The install is idempotent (a stamp records the pin): once installed, no network.
set -euo pipefail

CFN_LINT_VERSION=1.58.0

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/.." && pwd)"
venv="${FEDSTEP_CFN_LINT_VENV:-$root/.emu/cfn-lint}"
pin="cfn-lint==$CFN_LINT_VERSION"
stamp="$venv/.fedstep-pins"

if [[ $# -eq 0 ]]; then
  echo "usage: infra/cfn-lint.sh CDK_OUT_DIR... | --install" >&2
  exit 2
fi

if [[ -f "$stamp" && "$(cat "$stamp")" == "$pin" && -x "$venv/bin/cfn-lint" ]]; then
  echo "cfn-lint: $pin already in $venv" >&2
else
  echo "cfn-lint: installing $pin into $venv (PyPI)" >&2
  rm -rf "$venv"
  python3 -m venv "$venv"
  PIP_NO_INPUT=1 "$venv/bin/pip" install --quiet --disable-pip-version-check --only-binary=:all: "$pin" </dev/null >&2
  echo "$pin" > "$stamp"
fi
if [[ "$1" == --install ]]; then
  exit 0
fi

templates=()
for dir in "$@"; do
  found=("$dir"/*.template.json)
  if [[ ! -s "${found[0]}" ]]; then
    echo "cfn-lint: no *.template.json in $dir" >&2
    exit 1
  fi
  templates+=("${found[@]}")
done

echo "cfn-lint $("$venv/bin/cfn-lint" --version | awk '{print $2}') on ${#templates[@]} templates (config: infra/.cfnlintrc)"
# --config-file: the rules ignored on purpose, each with its reason. cfn-lint
# exits with a bit mask (2 error, 4 warning, 8 informational): any bit fails.
if ! "$venv/bin/cfn-lint" --config-file "$here/.cfnlintrc" --format parseable -- "${templates[@]}"; then
  echo "cfn-lint found problems in the synthesized templates (above); fix them, or justify an ignored rule in infra/.cfnlintrc" >&2
  exit 1
fi
echo "   cfn-lint: no findings"
