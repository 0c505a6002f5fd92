#!/usr/bin/env bash
# Issue #17's table: `fedstep simulate --mode async` against the sync run
# at the same client speeds, on simulate's defaults (3 clients, the STADLE
# split, 10 sync rounds), over seeds and buffer sizes. A benchmark, not a
# test: |SEEDS| × |BUFFERS| simulations of about two seconds each.
#
#   scripts/async-table.sh [RUN_ROOT]          (default: runs/async-<time>)
#   SEEDS="0 1 2 3 4" BUFFERS="1 2" SPEEDS=1,1,4 scripts/async-table.sh
#
# One line per run: seed, K, simulated seconds to the target accuracy
# (0.95 × the sync run's final accuracy) for sync and async, their ratio,
# and both final accuracies; then the median ratio per K.
# FEDSTEP_BIN names an already-built `fedstep`.
set -euo pipefail
cd "$(dirname "$0")/.."
root="${1:-runs/async-$(date -u +%Y%m%d-%H%M%S)}"
if [[ -n "${FEDSTEP_BIN:-}" ]]; then
  bin=$FEDSTEP_BIN
else
  cargo build --release --locked --workspace --bins
  bin="${CARGO_TARGET_DIR:-target}/release/fedstep"
fi
seeds=(${SEEDS:-0 1 2 3 4})
buffers=(${BUFFERS:-1 2})
speeds=${SPEEDS:-1,1,4}
mkdir -p "$root"
results="$root/results.tsv"
printf 'seed\tK\tsync_s\tasync_s\tratio\tsync_final\tasync_final\n' >"$results"
for s in "${seeds[@]}"; do
  for k in "${buffers[@]}"; do
    out="$root/seed$s-k$k"
    "$bin" simulate --mode async --seed "$s" --buffer-size "$k" --client-speeds "$speeds" \
      --out "$out" >"$out.log" 2>&1 || { echo "seed $s K $k failed: $out.log" >&2; exit 1; }
    python3 - "$out/report.json" "$s" "$k" >>"$results" <<'PY'
import json, sys
a = json.load(open(sys.argv[1]))["async"]
fmt = lambda v: "never" if v is None else f"{v:g}"
ratio = a["time_to_target_ratio"]
print(f"{sys.argv[2]}\t{sys.argv[3]}\t{fmt(a['sync_time_to_target'])}\t{fmt(a['async_time_to_target'])}\t"
      f"{'-' if ratio is None else f'{ratio:.2f}'}\t{a['sync_final_accuracy']:.4f}\t{a['async_final_accuracy']:.4f}")
PY
  done
done
column -t "$results"
python3 - "$results" <<'PY'
import csv, statistics, sys
rows = list(csv.DictReader(open(sys.argv[1]), delimiter="\t"))
for k in sorted({r["K"] for r in rows}):
    rs = [r for r in rows if r["K"] == k]
    ratios = [float(r["ratio"]) for r in rs if r["ratio"] != "-"]
    gaps = [100 * (float(r["async_final"]) - float(r["sync_final"])) for r in rs]
    med = statistics.median(ratios) if ratios else float("nan")
    print(f"K={k}: median time-to-target ratio {med:.2f} over {len(ratios)} of {len(rs)} seeds "
          f"(target <= 0.5); final accuracy async - sync: {min(gaps):+.1f} to {max(gaps):+.1f} pts")
PY
