#!/usr/bin/env bash
# NBD data path, blockd vs qemu-storage-daemon, same machine, same run.
#
#   benches/nbd_vs_qsd.sh [RUNS] [KINDS]       (defaults: 5, raw)
#
# Uses the project's benchmark harness (../shared/bench/nbd_throughput.py):
# qemu-img bench over nbd+unix:// against each server exporting a fresh
# 1 GiB image (file node + format node, writable export), and the same
# test directly on a file (the ceiling). Runs alternate between the two
# servers so drift of a shared machine hits both; summarize.py prints the
# medians and "x better" (> 1: blockd wins).
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
bench="${BENCH_DIR:-$here/../shared/bench}"
runs="${1:-5}"
kinds="${2:-raw}"
bin="$here/target/release/blockd"
[ -x "$bin" ] || { echo "build first: cargo build --release -p blockd" >&2; exit 1; }
[ -x "$bench/nbd_throughput.py" ] || { echo "harness not found at $bench" >&2; exit 1; }
out="${OUT:-$here/target/bench-nbd-$(date -u +%Y%m%dT%H%M%SZ)}"
mkdir -p "$out"
for i in $(seq "$runs"); do
    echo "== run $i/$runs: qemu-storage-daemon" >&2
    "$bench/nbd_throughput.py" --kinds "$kinds" --label qsd | tail -1 >> "$out/qsd.jsonl"
    echo "== run $i/$runs: blockd" >&2
    "$bench/nbd_throughput.py" --kinds "$kinds" --label blockd \
        --server "$bin --qmp {sock}" | tail -1 >> "$out/blockd.jsonl"
done
"$bench/summarize.py" --md "$out/qsd.jsonl" "$out/blockd.jsonl"
echo "raw results: $out" >&2
