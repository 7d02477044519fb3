#!/usr/bin/env bash
# Device benchmark: twinpath `file` disks against qemu-storage-daemon (the peer), same run,
# same machine, all serving one image on tmpfs. Every target is measured ROUNDS times, rounds interleaved so
# that machine noise hits all targets alike; the report gives medians and twinpath/peer ratios
# and replaces the device section of docs/benchmarks.md.
#   ROUNDS=3 RUNTIME=5 scripts/bench-device.sh
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${ROUNDS:-3}
runtime=${RUNTIME:-5}
tests=${TESTS:-randread-4k-q1,randread-4k-q32,randwrite-4k-q1,randwrite-4k-q32,read-1m-q1,write-1m-q1}

command -v qemu-storage-daemon >/dev/null || { echo "bench-device: qemu-storage-daemon missing (apt install qemu-utils)" >&2; exit 1; }
cargo build --release -q
bin=$PWD/target/release/twinpath
dir=/dev/shm/twinpath-bench
rm -rf "$dir"
mkdir -p "$dir"
# Written, not fallocated: tmpfs zeroes fallocated pages on first write, which would measure
# that instead of the device. Targets are measured one at a time, so they can share it (image
# locks off on every side: twinpath's lock: false, qemu-storage-daemon's locking=off).
img=$dir/bench.raw
dd if=/dev/zero of="$img" bs=1M count=1024 status=none

cat > "$dir/twinpath.yaml" <<YAML
disks:
YAML
for engine in auto uring threads; do
    cat >> "$dir/twinpath.yaml" <<YAML
  - name: tp-$engine
    socket: $dir/tp-$engine.sock
    lock: false
    backend: {type: file, path: $img, engine: $engine}
YAML
done

"$bin" serve --config "$dir/twinpath.yaml" 2> "$dir/twinpath.log" &
tp=$!
# The peer, as in the notes: io_uring, O_DIRECT, its own iothread.
qemu-storage-daemon --object iothread,id=iot0 \
    --blockdev file,node-name=f0,filename="$img",aio=io_uring,cache.direct=on,locking=off \
    --export type=vhost-user-blk,id=e0,node-name=f0,addr.type=unix,addr.path="$dir/qsd.sock",writable=on,num-queues=1,iothread=iot0 \
    > "$dir/qsd.log" 2>&1 &
qsd=$!
trap 'kill $tp $qsd 2>/dev/null || true' EXIT
for _ in $(seq 100); do
    [[ -S $dir/qsd.sock ]] && grep -q "ready:" "$dir/twinpath.log" && break
    sleep 0.1
done

for round in $(seq "$rounds"); do
    for target in qsd tp-auto tp-uring tp-threads; do
        echo "round $round/$rounds: $target" >&2
        "$bin" bench --socket "$dir/$target.sock" --runtime "$runtime" --tests "$tests" --json --quiet \
            > "$dir/$round-$target.json"
    done
done
kill -TERM $tp; wait $tp || true
kill $qsd; wait $qsd 2>/dev/null || true
trap - EXIT

python3 - "$dir" "$rounds" "$runtime" <<'PY'
import json, statistics, sys, re, pathlib, platform, subprocess
d, rounds, runtime = pathlib.Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
targets = ["qsd", "tp-auto", "tp-uring", "tp-threads"]
res = {}
for t in targets:
    for r in range(1, rounds + 1):
        for row in json.load(open(d / f"{r}-{t}.json")):
            res.setdefault(row["test"], {}).setdefault(t, []).append(row)
def med(rows, key): return statistics.median(x[key] for x in rows)
def fmt(test, rows):
    if "4k" in test:
        return f"{med(rows, 'iops')/1000:.1f}k IOPS (p50 {med(rows, 'lat_p50_us'):.0f} us)"
    return f"{med(rows, 'mb_per_s'):.0f} MB/s"
def metric(test, rows): return med(rows, "iops")
kernel = platform.release()
cpus = subprocess.run(["nproc"], capture_output=True, text=True).stdout.strip()
out = [f"Command: `ROUNDS={rounds} RUNTIME={runtime} scripts/bench-device.sh` "
       f"(medians of {rounds} interleaved rounds of {runtime} s per test; {cpus} CPUs, kernel {kernel}; "
       "one 1 GiB image on tmpfs served by all; one queue; client: `twinpath bench` on libblkio).", "",
       "| test | qemu-storage-daemon | twinpath (auto = inline) | ratio | twinpath uring | ratio | twinpath threads | ratio |",
       "|---|---|---|---|---|---|---|---|"]
for test, by in res.items():
    peer = metric(test, by["qsd"])
    cells = [fmt(test, by["qsd"])]
    for t in targets[1:]:
        cells += [fmt(test, by[t]), f"{metric(test, by[t]) / peer:.2f}x"]
    out.append(f"| {test} | " + " | ".join(cells) + " |")
table = "\n".join(out)
print(table)
doc = pathlib.Path("docs/benchmarks.md")
text = doc.read_text() if doc.exists() else "# Benchmarks\n\n<!-- device:start -->\n<!-- device:end -->\n"
text = re.sub(r"<!-- device:start -->.*<!-- device:end -->",
              "<!-- device:start -->\n" + table + "\n<!-- device:end -->", text, flags=re.S)
doc.write_text(text)
PY
