#!/usr/bin/env bash
# The demo: builds twinpath, serves the two disks of configs/demo.yaml (images created on
# tmpfs), shows them working with the built-in vhost-user client, and stops the daemon.
# As root (with samba and xfsprogs), it then sets up a file server on this machine and shows
# a san disk and an smb disk side by side (tools/src/bin/demo-san.rs).
set -euo pipefail
cd "$(dirname "$0")/.."

echo "== building (release)"
cargo build --release -q
bin=target/release/twinpath
cfg=configs/demo.yaml
dir=/dev/shm/twinpath-demo
mkdir -p "$dir"

echo "== the config"
"$bin" check --config "$cfg"

echo "== serving"
"$bin" serve --config "$cfg" 2> "$dir/daemon.log" &
daemon=$!
trap 'kill "$daemon" 2>/dev/null || true' EXIT
for _ in $(seq 100); do
    grep -q "ready:" "$dir/daemon.log" && break
    kill -0 "$daemon" 2>/dev/null || { cat "$dir/daemon.log"; exit 1; }
    sleep 0.1
done
grep "ready:" "$dir/daemon.log"
ls -l "$dir"/*.sock

for disk in demo-root demo-data; do
    echo "== $disk: data check and a short benchmark through its vhost-user socket"
    "$bin" bench --socket "$dir/$disk.sock" --verify --runtime 2 --quiet \
        --tests randread-4k-q1,randread-4k-q32,randwrite-4k-q32,read-1m-q1,write-1m-q1
done

echo "== stopping (SIGTERM: drain, flush, remove sockets)"
kill -TERM "$daemon"
wait "$daemon" && echo "daemon exited cleanly"
trap - EXIT
tail -n 4 "$dir/daemon.log"
echo "Attach a guest to $dir/demo-root.sock as shown in README.md."

# Part two needs what only root has: loop devices, mount, a private smbd.
if [[ $(id -u) == 0 ]] && command -v smbd >/dev/null && command -v mkfs.xfs >/dev/null; then
    echo
    echo "== part two: a san disk and an smb disk side by side"
    cargo build --release -q -p twinpath-tools --bin demo-san
    TWINPATH_BIN=$PWD/$bin target/release/demo-san
else
    echo "(Run as root with samba and xfsprogs installed to also see a san disk next to an"
    echo " smb disk: scripts/test.sh installs them.)"
fi
