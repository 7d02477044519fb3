#!/usr/bin/env bash
# Map requests per second and their latency (p50, p99) through the authenticated map
# session: one host, read and write maps of 64 MiB windows on a loop LUN with xfs.
# Needs root (loop devices, mount). Prints a markdown table for docs/benchmarks.md.
#   COUNT=2000 ROUNDS=3 scripts/bench-map.sh
set -euo pipefail
cd "$(dirname "$0")/.."
[[ $(id -u) == 0 ]] || { echo "bench-map: needs root (loop devices, mount)" >&2; exit 1; }
cargo build --release -q -p twinpath -p twinpath-tools
TWINPATH_BIN=$PWD/target/release/twinpath exec target/release/bench-map
