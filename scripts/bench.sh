#!/usr/bin/env bash
# Aggregation benchmarks (issue #2's targets), outside the test suite:
#
#   scripts/bench.sh            # ~1-2 minutes, ~7 GB of temp files at peak
#
# 1. 8 clients × 25M f32 params, plain FedAvg, file → file: time vs reading
#    the inputs once (target ≤ 1.5× for F32, 2× for BF16), peak RSS (target ≤ 1.5 × model + 64 MB);
# 2. the same in bf16;
# 3. peak RSS as the client count grows 2 → 8 → 64 (target: flat);
# 4. one round against S3 on the emulators, streamed vs staged vs sharded,
#    and through a deployed stack of its own (issue #14);
# 5. a federation of 50, 100 and 200 clients on the emulators (issue #20);
# 6. SecAgg+'s cost per round for 8, 32, 64 clients × 1M params against
#    plain FedAvg (issue #18), in process.
# Figures are ratios within one run: the machine is shared and noisy.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
cargo build --release --locked -p fedstep -p fedstep-lambda
bin=target/release/fedstep
dir="${FEDSTEP_BENCH_DIR:-$(mktemp -d)}"
trap 'rm -rf "$dir"' EXIT

echo "== 8 clients × 25M f32"
$bin bench aggregate --clients 8 --params 25M --runs 5 --dir "$dir/a" --json "$dir/a.json"
rm -rf "$dir/a"
echo "== 8 clients × 25M bf16"
$bin bench aggregate --clients 8 --params 25M --dtype bf16 --runs 3 --dir "$dir/b"
rm -rf "$dir/b"
echo "== peak RSS as clients grow (25M f32 each)"
for n in 2 8 64; do
  $bin bench aggregate --clients "$n" --params 25M --runs 1 --dir "$dir/n$n" | grep -E "bench aggregate|peak RSS|ratio"
  rm -rf "$dir/n$n"
done

echo "== secure aggregation: SecAgg+ against plain FedAvg, 1M params"
for n in 8 32 64; do
  $bin bench secagg --clients "$n" --params 1M
done
$bin bench secagg --clients 32 --params 1M --dropouts 3 | grep -E "^(clients|dropouts|client_s|aggregator_s|aggregator_time_ratio|within_bound)"

# 4. One round against S3 on the emulators (issue #14): in place (streamed)
#    and staged on local disk, beside GETting every input once. Needs the
#    emulators: `scripts/emulators.sh up` (skipped with a note otherwise).
if scripts/emulators.sh status >/dev/null 2>&1; then
  eval "$(scripts/emulators.sh env)"
  echo "== one round on S3: 8 clients × 25M f32"
  $bin bench round --clients 8 --params 25M
  echo "== one round on S3: peak RSS as clients grow (25M f32 each, streamed)"
  for n in 2 8 32; do
    $bin bench round --clients "$n" --params 25M --mode streamed | grep -E "^clients|read_floor|streamed\."
  done
  echo "== one round through a deployed stack of its own: 8 clients × 25M f32, 1 and 4 shards"
  for k in 1 4; do
    $bin bench round --mode deployed --clients 8 --params 25M --shards "$k"
  done
  echo "== clients: 50, 100, 200 clients × 3 rounds (issue #20)"
  for n in 50 100 200; do
    $bin bench clients --clients "$n" --rounds 3
  done
else
  echo "== bench round skipped: the emulators are not up (scripts/emulators.sh up)"
fi
