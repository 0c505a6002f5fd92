#!/usr/bin/env bash
# Installs the Lambda build tools from PyPI into a virtual environment,
# pinned and idempotent, and prints the directory to put on PATH:
#
#   cargo-lambda  (PyPI `cargo-lambda`: the cargo subcommand, with cargo-zigbuild inside)
#   zig           (PyPI `ziglang`: the C compiler/linker cargo-lambda cross-compiles with)
#
#   PATH="$(infra/lambda-tools.sh):$PATH"
#   FEDSTEP_LAMBDA_TOOLS=dir   venv location (default: <repo>/.emu/lambda-tools)
#
# Progress goes to stderr; stdout is only the bin directory.
set -euo pipefail

CARGO_LAMBDA_VERSION=1.9.2
ZIGLANG_VERSION=0.17.1

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${FEDSTEP_LAMBDA_TOOLS:-$root/.emu/lambda-tools}"
pins="cargo-lambda==$CARGO_LAMBDA_VERSION ziglang==$ZIGLANG_VERSION"
stamp="$venv/.fedstep-pins"

if [[ -f "$stamp" && "$(cat "$stamp")" == "$pins" && -x "$venv/bin/cargo-lambda" && -x "$venv/bin/zig" ]]; then
  echo "lambda tools: $pins already in $venv" >&2
else
  echo "lambda tools: installing $pins into $venv (PyPI)" >&2
  python3 -m venv "$venv"
  # Wheels only: both projects publish binary wheels; nothing is compiled here.
  # shellcheck disable=SC2086
  "$venv/bin/pip" install --quiet --disable-pip-version-check --only-binary=:all: $pins >&2
  # The ziglang wheel ships the zig binary inside the package; link it into
  # bin/ so `zig` is on PATH (cargo-zigbuild looks there first).
  zig="$("$venv/bin/python" -c 'import os, ziglang; print(os.path.join(os.path.dirname(ziglang.__file__), "zig"))')"
  ln -sf "$zig" "$venv/bin/zig"
  echo "$pins" > "$stamp"
fi

"$venv/bin/cargo-lambda" lambda --version >&2
echo "zig $("$venv/bin/zig" version)" >&2
echo "$venv/bin"
