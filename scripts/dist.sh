#!/usr/bin/env bash
# Builds the binaries users download, for x86_64 Linux with glibc 2.17 or
# newer (e.g. RHEL/CentOS 7 and 8, Ubuntu 20.04; CPU: see below), stripped,
# into dist/:
#
#   dist/fedstep-client   the client on-prem hosts run
#   dist/fedstep          the operator CLI
#   dist/SHA256SUMS       `sha256sum -c SHA256SUMS` verifies them
#
#   scripts/dist.sh               build, then check (below); prints sizes
#   scripts/dist.sh --check DIR   only check the binaries listed in DIR/SHA256SUMS
#
# A plain `cargo build` links against the build host's glibc and so needs
# that version or newer at run time (2.36 from the Debian 12 CI image).
# Here zig links against glibc 2.17's symbol versions instead, through
# cargo-lambda's built-in cargo-zigbuild: the pinned cargo-lambda + zig of
# infra/lambda-tools.sh, already installed for the Lambda build, so nothing
# else is downloaded.
#
# The build matches the Lambda build of scripts/deploy.sh (infra/lib/
# aggregator.ts: same tools, target x86_64-unknown-linux-gnu.2.17, release
# profile, CARGO_PROFILE_RELEASE_STRIP, target directory
# ${CARGO_TARGET_DIR:-<repo>/target}/lambda). Cargo then reuses that build's
# compiled dependencies (the AWS SDK, tokio, ring, ...) and compiles only
# what the client and CLI add (candle, the workspace crates): scripts/test.sh
# runs this right after infra/test.sh's Lambda build. cargo-lambda's output
# has no symbol table already; `strip` afterwards makes sure rather than
# the profile's strip setting, which would make a different build to cargo
# that shares nothing.
#
# Both builds pass --disable-optimizations: the workspace's release profile
# (unwinding panics, no LTO, 16 codegen units, generic x86-64) rather than
# cargo-lambda's release defaults (panic=abort, thin LTO, one codegen unit,
# target-cpu=haswell). So the binaries run on any x86-64 CPU, behave as the
# tested builds do, and build in a fraction of the time.
#
# The check, done after every build: each binary needs no glibc symbol
# version newer than 2.17, links only glibc's own libraries (and libgcc_s),
# has no symbol table or debug sections, and SHA256SUMS verifies.
#
# Environment:
#   DIST_DIR=dir               output directory (default <repo>/dist); its
#                              fedstep, fedstep-client and SHA256SUMS are replaced
#   CARGO_TARGET_DIR           builds into $CARGO_TARGET_DIR/lambda (as the Lambda)
#   FEDSTEP_LAMBDA_TOOLS=dir   where lambda-tools.sh keeps its venv
set -euo pipefail

# The oldest glibc the binaries run on. Equal to LAMBDA_GLIBC in
# infra/lib/aggregator.ts: the zig target is part of the C compiler settings
# (ring, through the cc crate), so a different one would rebuild the AWS SDK stack.
GLIBC_DIST=2.17
TRIPLE=x86_64-unknown-linux-gnu
BINS=(fedstep-client fedstep)
# Shared libraries every glibc system has; anything else (libssl, ...) would
# make the binary depend on the host's packages.
ALLOWED_LIBS=" libc.so.6 libm.so.6 libpthread.so.0 libdl.so.2 librt.so.1 libutil.so.1 libgcc_s.so.1 ld-linux-x86-64.so.2 "

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

die() { printf 'dist.sh: %s\n' "$1" >&2; exit 1; }
usage() { sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; }

# version_le A B: true if glibc version A <= B (numerically: 2.9 < 2.17).
version_le() { [[ "$(printf '%s\n%s\n' "$1" "$2" | sort -V | awk 'NR == 1')" == "$1" ]]; }

# check_binary FILE: the checks above except SHA256SUMS; prints one summary line.
# (Tool output goes to variables first: with pipefail, `tool | grep -q`
# can fail when grep stops reading early.)
check_binary() {
  local f="$1" name header needs newest libs lib syms sections
  name="$(basename "$f")"
  [[ -f "$f" ]] || die "$f not found"
  header="$(readelf -h "$f" 2>&1)" || die "$name is not an ELF file: $header"
  grep -Eq 'Machine:[[:space:]]+Advanced Micro Devices X86-64' <<<"$header" || die "$name is not an x86-64 ELF file"
  # The version references of the dynamic section: GLIBC_x.y[.z] the binary
  # requires from libc.so.6 and friends (also GLIBC_PRIVATE, which must not occur).
  needs="$(objdump -p "$f" | awk '/^Version References:/ { on = 1; next } on && /^$/ { on = 0 } on && $NF ~ /^GLIBC_/ { print $NF }' | sort -u)"
  [[ -n "$needs" ]] || die "$name: no GLIBC version references found (objdump -p); not a dynamically linked glibc binary?"
  if grep -qv '^GLIBC_[0-9][0-9.]*$' <<<"$needs"; then
    die "$name needs $(grep -v '^GLIBC_[0-9][0-9.]*$' <<<"$needs" | tr '\n' ' ')(not a released glibc version)"
  fi
  newest="$(printf '%s\n' "${needs//GLIBC_/}" | sort -V | tail -n 1)"
  if ! version_le "$newest" "$GLIBC_DIST"; then
    syms="$(objdump -T "$f" | awk -v v="(GLIBC_$newest)" 'index($0, v) && n++ < 5 { printf "%s ", $NF }')"
    die "$name needs GLIBC_$newest (e.g. ${syms% }), newer than the supported $GLIBC_DIST"
  fi
  libs="$(objdump -p "$f" | awk '$1 == "NEEDED" { print $2 }')"
  for lib in $libs; do
    [[ "$ALLOWED_LIBS" == *" $lib "* ]] || die "$name links $lib, which is not part of glibc (needed: $(tr '\n' ' ' <<<"$libs"))"
  done
  # Section names; .debug_gdb_scripts is no debug info but an allocated
  # section rustc always emits (it names gdb's pretty-printers), and stays.
  sections="$(readelf -S --wide "$f" | sed -n 's/^ *\[ *[0-9][0-9]*\] \([^ ]*\).*/\1/p')"
  if grep -Ev '^\.debug_gdb_scripts$' <<<"$sections" | grep -Eq '^\.(symtab|debug_)'; then
    die "$name is not stripped (it has .symtab or .debug_* sections)"
  fi
  printf '   %-15s %9d bytes (%s), newest glibc symbol version GLIBC_%s, links %s\n' \
    "$name" "$(stat -L -c %s "$f")" "$(awk -v b="$(stat -L -c %s "$f")" 'BEGIN { printf "%.1f MiB", b / 1048576 }')" \
    "$newest" "$(tr '\n' ' ' <<<"$libs" | sed 's/ $//')"
}

# check_dir DIR: SHA256SUMS verifies and lists exactly the binaries, each passes check_binary.
check_dir() {
  local dir="$1" listed bin
  [[ -f "$dir/SHA256SUMS" ]] || die "$dir/SHA256SUMS not found"
  (cd "$dir" && sha256sum --check --strict --quiet SHA256SUMS) || die "$dir/SHA256SUMS does not verify"
  listed="$(awk '{ sub(/^\*/, "", $2); print $2 }' "$dir/SHA256SUMS" | sort | tr '\n' ' ')"
  [[ "$listed" == "$(printf '%s\n' "${BINS[@]}" | sort | tr '\n' ' ')" ]] \
    || die "$dir/SHA256SUMS lists '$listed', expected ${BINS[*]}"
  for bin in "${BINS[@]}"; do check_binary "$dir/$bin"; done
  echo "   SHA256SUMS verifies"
}

for tool in objdump readelf strip sha256sum; do
  command -v "$tool" >/dev/null || die "$tool is not installed (binutils / coreutils)"
done

case "${1:-}" in
  -h|--help) usage; exit 0 ;;
  --check)
    [[ $# -eq 2 ]] || die "usage: scripts/dist.sh --check DIR"
    echo "dist.sh: checking $2"
    check_dir "$2"
    exit 0 ;;
  "") ;;
  *) usage >&2; exit 2 ;;
esac

command -v cargo >/dev/null || die "cargo is not installed (https://rustup.rs)"
rustup target list --installed 2>/dev/null | grep -qx "$TRIPLE" \
  || die "the Rust target $TRIPLE is not installed (rustup target add $TRIPLE)"
dist="${DIST_DIR:-$root/dist}"
start=$SECONDS

# cargo-lambda + zig, pinned; progress on stderr, the bin directory on stdout.
tools="$("$root/infra/lambda-tools.sh")"
export PATH="$tools:$PATH"
# What scripts/deploy.sh and cargo-lambda-cdk set for the Lambda build:
# the same values make the same (reusable) compiled units.
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$root/target}/lambda"
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"
export CARGO_PROFILE_RELEASE_STRIP=debuginfo

# cargo-lambda moves each binary out of the target directory into
# <lambda-dir>/<bin>/bootstrap (the Lambda package layout): a temporary
# directory here, from which the stripped copies are made.
scratch="$(mktemp -d)"
trap 'rm -rf "$scratch"' EXIT
echo "dist.sh: cargo lambda build ${BINS[*]} for $TRIPLE.$GLIBC_DIST into $CARGO_TARGET_DIR"
cargo lambda build --release --locked --disable-optimizations --target "$TRIPLE.$GLIBC_DIST" --lambda-dir "$scratch" \
  -p fedstep-client -p fedstep --bin fedstep-client --bin fedstep
echo "dist.sh: built in $((SECONDS - start)) s"

mkdir -p "$dist"
rm -f "$dist/SHA256SUMS"
for bin in "${BINS[@]}"; do
  built="$scratch/$bin/bootstrap"
  [[ -x "$built" ]] || die "cargo lambda build left no $built for $bin"
  rm -f "$dist/$bin"
  strip --strip-all -o "$dist/$bin" "$built"
done
(cd "$dist" && sha256sum "${BINS[@]}" > SHA256SUMS)

echo "dist.sh: checking $dist"
check_dir "$dist"
echo "dist.sh: done in $((SECONDS - start)) s"
