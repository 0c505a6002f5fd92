#!/usr/bin/env bash
# `cdk synth` with the real Lambda build, through the very command users
# deploy with: `scripts/deploy.sh synth` (pinned cargo-lambda + zig from
# PyPI, npm ci if stale, then the CDK CLI), so cargo-lambda-cdk's
# RustFunction compiles crates/lambda exactly as `scripts/deploy.sh deploy`
# would. Then this checks the staged asset really holds an executable ELF
# `bootstrap` for the Lambda architecture and prints its size.
# Offline apart from the one-time PyPI/npm installs; no AWS credentials.
#
#   infra/synth-with-lambda.sh [OUT_DIR]   the synth goes to OUT_DIR/cdk.out
#                                          (kept; default: a temporary directory)
#   FEDSTEP_INFRA_ARCH=x86_64|arm64   Lambda architecture (default x86_64, the
#                                     deployment's default: the CI toolchain has
#                                     only the host target; arm64 needs
#                                     `rustup target add aarch64-unknown-linux-gnu`)
#
# Cargo builds into ${CARGO_TARGET_DIR:-<repo>/target}/lambda (set by
# scripts/deploy.sh): its own directory (cargo-zigbuild's compiler settings
# differ from the workspace build's, so sharing would rebuild both in turn),
# kept between runs so a repeated synth is incremental.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")"
root="$(cd .. && pwd)"
arch="${FEDSTEP_INFRA_ARCH:-x86_64}"
case "$arch" in
  x86_64) triple=x86_64-unknown-linux-gnu; elf='ELF 64-bit LSB .*x86-64' ;;
  arm64)  triple=aarch64-unknown-linux-gnu; elf='ELF 64-bit LSB .*ARM aarch64' ;;
  *) echo "FEDSTEP_INFRA_ARCH must be x86_64 or arm64, got '$arch'" >&2; exit 2 ;;
esac
if ! rustup target list --installed 2>/dev/null | grep -qx "$triple"; then
  echo "the Rust target $triple is not installed (rustup target add $triple), so arch=$arch cannot be built here" >&2
  exit 1
fi

export CARGO_TERM_COLOR=never
export CDK_DISABLE_CLI_TELEMETRY=true

if [[ $# -ge 1 ]]; then
  out="$1"
  rm -rf "$out/cdk.out"
  mkdir -p "$out"
else
  out="$(mktemp -d)"
  trap 'rm -rf "$out"' EXIT
fi
echo "scripts/deploy.sh synth (arch=$arch, cargo-lambda build into ${CARGO_TARGET_DIR:-$root/target}/lambda)"
start=$SECONDS
# No skipBuild: the stack is in aws:cdk:bundling-stacks, so RustFunction runs
# `cargo lambda build --release --bin fedstep-lambda` in crates/lambda. Its
# output (and deploy.sh's tool installs) goes to stderr; keep it out of the
# log unless the synth fails.
if ! "$root/scripts/deploy.sh" synth --quiet --no-notices --no-version-reporting \
  -c "arch=$arch" -c clients=site-a,site-b,site-c -o "$out/cdk.out" 2> "$out/synth.log"; then
  tail -n 60 "$out/synth.log" >&2
  echo "cdk synth with the Lambda build failed (full log above, last 60 lines)" >&2
  exit 1
fi
echo "   cdk synth + Lambda build: $((SECONDS - start)) s"

# The staged asset directory of the two functions (the aggregator and the
# stream function: one bootstrap, one code asset), from the template.
# shellcheck disable=SC2016  # JavaScript in single quotes: its ${...} is a JS template literal
asset="$(node -e '
  const t = require(process.argv[1]);
  const fns = Object.values(t.Resources).filter((r) => r.Type === "AWS::Lambda::Function" && r.Properties.Handler === "bootstrap");
  if (fns.length !== 2) { console.error(`expected two bootstrap functions (aggregator, stream), found ${fns.length}`); process.exit(1); }
  for (const f of fns) {
    const p = f.Properties;
    if (JSON.stringify(p.Architectures) !== JSON.stringify([process.argv[2]])) {
      console.error(`function architectures ${JSON.stringify(p.Architectures)}, expected ${process.argv[2]}`); process.exit(1);
    }
  }
  const codes = new Set(fns.map((f) => JSON.stringify(f.Properties.Code)));
  if (codes.size !== 1) { console.error(`the functions run different code: ${[...codes].join(", ")}`); process.exit(1); }
  console.log(String(fns[0].Properties.Code.S3Key).replace(/\.zip$/, ""));
' "$out/cdk.out/Fedstep.template.json" "$arch")"
bootstrap="$out/cdk.out/asset.$asset/bootstrap"

if [[ ! -f "$bootstrap" ]]; then
  echo "the Lambda asset asset.$asset has no bootstrap:" >&2
  ls -la "$out/cdk.out/asset.$asset" >&2 || true
  exit 1
fi
kind="$(file -b "$bootstrap")"
if [[ ! -x "$bootstrap" ]] || ! grep -Eq "^$elf" <<<"$kind" || ! grep -q 'executable' <<<"$kind"; then
  echo "bootstrap is not an executable $arch ELF file: $kind" >&2
  exit 1
fi
size=$(stat -c %s "$bootstrap")
strip -o "$out/bootstrap.stripped" "$bootstrap" 2>/dev/null || cp "$bootstrap" "$out/bootstrap.stripped"
stripped=$(stat -c %s "$out/bootstrap.stripped")
mib() { awk -v b="$1" 'BEGIN { printf "%.1f MiB", b / 1048576 }'; }
echo "   bootstrap: $kind"
echo "   bootstrap size: $size bytes ($(mib "$size")); stripped: $stripped bytes ($(mib "$stripped"))"
