#!/usr/bin/env bash
# Direct-path benchmark: a `san` disk vs an `smb` disk vs fio on the raw LUN (a tmpfs-backed
# loop device with xfs), same run. Needs root (loop devices, mount), samba, smbclient, fio,
# xfsprogs (scripts/test.sh installs them). Replaces the san section of docs/benchmarks.md.
#   ROUNDS=3 RUNTIME=5 SIZE_MIB=512 scripts/bench-san.sh
set -euo pipefail
cd "$(dirname "$0")/.."
[[ $(id -u) == 0 ]] || { echo "bench-san: needs root (loop devices, mount)" >&2; exit 1; }
for tool in smbd fio mkfs.xfs qemu-storage-daemon; do
    command -v "$tool" >/dev/null || { echo "bench-san: $tool missing" >&2; exit 1; }
done
cargo build --release -q -p twinpath -p twinpath-tools
TWINPATH_BIN=$PWD/target/release/twinpath exec target/release/bench-san
