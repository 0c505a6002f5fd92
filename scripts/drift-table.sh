#!/usr/bin/env bash
# Issue #19's table: client-drift remedies on `fedstep simulate`'s defaults
# (3 clients, the STADLE split, 10 rounds, the same local budget), each as
# a fraction of centralized training, over seeds 0-4. A benchmark, not a
# test: about 5 × (4 + |MUS|) simulations of a few seconds each.
#
#   scripts/drift-table.sh [RUN_ROOT]        (default: runs/drift-<time>)
#   MUS="0.01 0.1 1" SEEDS="0 1 2 3 4" scripts/drift-table.sh
#
# Prints one line per run (`algorithm seed mu ratio accuracy centralized`),
# then the per-algorithm ratio over the seeds (FedProx: each μ of the
# sweep), and says whether the best algorithm reaches 0.95× centralized on
# every seed. FEDSTEP_BIN names an already-built `fedstep`.
set -euo pipefail
cd "$(dirname "$0")/.."
root="${1:-runs/drift-$(date -u +%Y%m%d-%H%M%S)}"
if [[ -n "${FEDSTEP_BIN:-}" ]]; then
  bin=$FEDSTEP_BIN
else
  cargo build --release --locked -p fedstep
  bin="${CARGO_TARGET_DIR:-target}/release/fedstep"
fi
seeds=(${SEEDS:-0 1 2 3 4})
mus=(${MUS:-0.01 0.1 1})
mkdir -p "$root"
results="$root/results.tsv"
: >"$results"

run() { # name seed mu flags...
  local name=$1 seed=$2 mu=$3
  shift 3
  local out="$root/$name-mu$mu-seed$seed"
  "$bin" simulate --seed "$seed" --out "$out" "$@" >"$out.log" 2>&1 ||
    { echo "run $name seed $seed failed: $out.log" >&2; exit 1; }
  python3 - "$out/report.json" "$name" "$seed" "$mu" >>"$results" <<'PY'
import json, sys
f = json.load(open(sys.argv[1]))["final"]
print(f"{sys.argv[2]}\t{sys.argv[3]}\t{sys.argv[4]}\t{f['federated_vs_centralized']:.4f}\t"
      f"{f['federated_accuracy']:.4f}\t{f['centralized_accuracy']:.4f}")
PY
  tail -n1 "$results"
}

for s in "${seeds[@]}"; do
  run fedavg "$s" - --algorithm fedavg
  for mu in "${mus[@]}"; do
    run fedprox "$s" "$mu" --algorithm fedprox --mu "$mu"
  done
  run scaffold "$s" - --algorithm scaffold
  run fedadam "$s" - --aggregation examples/aggregation/fedadam.toml
  run scaffold+fedadam "$s" - --algorithm scaffold --aggregation examples/aggregation/fedadam.toml
done

python3 - "$results" <<'PY'
import sys, collections
rows = [l.split("\t") for l in open(sys.argv[1]).read().splitlines()]
by = collections.defaultdict(dict)
for name, seed, mu, ratio, acc, central in rows:
    key = name if mu == "-" else f"{name} mu={mu}"
    by[key][int(seed)] = float(ratio)
seeds = sorted({int(r[1]) for r in rows})
print("\nalgorithm          " + "  ".join(f"seed {s}" for s in seeds) + "    mean    min")
for key, r in by.items():
    v = [r[s] for s in seeds]
    print(f"{key:<18} " + "  ".join(f"{x:6.3f}" for x in v) + f"  {sum(v)/len(v):6.3f} {min(v):6.3f}")
best_min = max(min(r[s] for s in seeds) for r in by.values())
best = [k for k, r in by.items() if min(r[s] for s in seeds) == best_min]
# Best per seed too: the target reads "the best of them >= 0.95x on every seed".
per_seed = {s: max(r[s] for r in by.values()) for s in seeds}
print(f"\nbest worst-seed ratio: {best_min:.3f} ({', '.join(best)})")
print("best per seed: " + ", ".join(f"{s}: {v:.3f}" for s, v in per_seed.items()))
print("target (best >= 0.95x centralized on every seed): "
      + ("met" if best_min >= 0.95 else "NOT met by any single algorithm")
      + ("; per seed by some algorithm: met" if min(per_seed.values()) >= 0.95 else ""))
PY
