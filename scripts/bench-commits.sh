#!/usr/bin/env bash
# Device benchmark across commits: is a row that moved a change of the code or noise? Builds
# the release daemon of each commit (in a scratch worktree), then serves one `file` disk per
# engine from each in turn on one tmpfs image, driven by this tree's `twinpath bench`, so only
# the daemon differs. Commits are interleaved in every round; the report gives each
# commit's median and every run, in round order, so a bimodal row shows as one.
#   COMMITS="e7ecd21 HEAD" ROUNDS=8 RUNTIME=5 ENGINES=threads,auto TESTS=randread-4k-q1 \
#       scripts/bench-commits.sh
set -euo pipefail
cd "$(dirname "$0")/.."
commits=${COMMITS:?COMMITS="a b ...": the commits to compare}
rounds=${ROUNDS:-8}
runtime=${RUNTIME:-5}
engines=${ENGINES:-threads,auto}
tests=${TESTS:-randread-4k-q1}

cargo build --release -q -p twinpath
client=$PWD/target/release/twinpath
dir=/dev/shm/twinpath-bench-commits
rm -rf "$dir"
mkdir -p "$dir/bin" "$dir/res"
wt=$(mktemp -d /tmp/twinpath-bench-commits.XXXXXX)
trap 'git worktree remove --force "$wt" 2>/dev/null || true' EXIT
git worktree add -q --detach "$wt" HEAD
# Seeded with this tree's build so each commit compiles only what it changed.
mkdir -p "$wt/target" && cp -a target/release "$wt/target/"
names=()
for c in $commits; do
    name=$(git rev-parse --short "$c")
    echo "building $name" >&2
    (cd "$wt" && git checkout -q "$name" && cargo build --release -q -p twinpath)
    cp "$wt/target/release/twinpath" "$dir/bin/$name"
    names+=("$name")
done

# Written, not fallocated: tmpfs would otherwise allocate pages while being measured.
dd if=/dev/zero of="$dir/bench.raw" bs=1M count=1024 status=none
echo "disks:" > "$dir/twinpath.yaml"
for e in ${engines//,/ }; do
    cat >> "$dir/twinpath.yaml" <<YAML
  - name: $e
    socket: $dir/$e.sock
    lock: false
    backend: {type: file, path: $dir/bench.raw, engine: $e}
YAML
done

for round in $(seq "$rounds"); do
    for name in "${names[@]}"; do
        echo "round $round/$rounds: $name" >&2
        rm -f "$dir"/*.sock
        "$dir/bin/$name" serve --config "$dir/twinpath.yaml" 2> "$dir/$name.log" &
        pid=$!
        for _ in $(seq 100); do
            grep -q "ready:" "$dir/$name.log" && break
            sleep 0.1
        done
        for e in ${engines//,/ }; do
            "$client" bench --socket "$dir/$e.sock" --runtime "$runtime" --tests "$tests" \
                --json --quiet > "$dir/res/$round-$name-$e.json"
        done
        kill -TERM $pid
        wait $pid || true
    done
done

python3 - "$dir/res" "$rounds" "${names[@]}" <<'PY'
import json, statistics, sys, pathlib
res_dir, rounds, names = pathlib.Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3:]
runs = {}
for r in range(1, rounds + 1):
    for name in names:
        for f in sorted(res_dir.glob(f"{r}-{name}-*.json")):
            engine = f.stem.split("-", 2)[2]
            for row in json.load(open(f)):
                key = "iops" if "4k" in row["test"] else "mb_per_s"
                runs.setdefault((row["test"], engine, name), []).append(row[key])
def fmt(test, x): return f"{x / 1000:.1f}k" if "4k" in test else f"{x:.0f}"
print(f"| test | engine | commit | median of {rounds} | runs, in round order |")
print("|---|---|---|---|---|")
for (test, engine, name), v in sorted(runs.items(), key=lambda kv: (kv[0][0], kv[0][1], names.index(kv[0][2]))):
    print(f"| {test} | {engine} | {name} | {fmt(test, statistics.median(v))} | "
          f"{', '.join(fmt(test, x) for x in v)} |")
PY
