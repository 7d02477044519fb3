#!/usr/bin/env bash
# Runs each fuzz target (fuzz/fuzz_targets/) from its seed corpus (fuzz/corpus/<target>/) for a
# while, with AddressSanitizer; fails on the first crash, leak or broken invariant, leaving the
# input in fuzz/artifacts/<target>/.
#   scripts/fuzz.sh                          every target for 60 s (what scripts/test.sh runs)
#   FUZZ_SECONDS=1800 scripts/fuzz.sh grant  one target for 30 minutes
# New inputs go to a scratch directory, not into the seed corpus. Installs cargo-fuzz if it is
# missing. cargo-fuzz passes nightly-only flags (-Zsanitizer): on a stable toolchain
# RUSTC_BOOTSTRAP=1 lets them through.
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=${FUZZ_SECONDS:-60}
command -v cargo-fuzz >/dev/null || cargo install --locked cargo-fuzz
export RUSTC_BOOTSTRAP=1
targets=("$@")
if ((${#targets[@]} == 0)); then
    mapfile -t targets < <(cargo fuzz list)
fi
cargo fuzz build -O
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
for t in "${targets[@]}"; do
    mkdir -p "$scratch/$t" "fuzz/corpus/$t"
    echo "== fuzz $t for ${seconds}s"
    asan=${ASAN_OPTIONS:-}
    # The device target keeps one server running for the whole run (its worker threads are
    # alive at exit, which LeakSanitizer reports); it checks descriptors per connection itself.
    [[ $t == device ]] && asan=detect_leaks=0
    if ! ASAN_OPTIONS=$asan cargo fuzz run -O "$t" "$scratch/$t" "fuzz/corpus/$t" -- \
        -max_total_time="$seconds" -print_final_stats=1 >"$scratch/$t.log" 2>&1; then
        tail -60 "$scratch/$t.log"
        echo "fuzz: $t failed; the input is in fuzz/artifacts/$t/" >&2
        exit 1
    fi
    grep -E "^Done|stat::number_of_executed_units|stat::peak_rss" "$scratch/$t.log"
done
echo "== fuzz: no failures"
