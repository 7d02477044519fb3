#!/usr/bin/env bash
# Network-path benchmark: `smb` disks vs smbclient on a private smbd, on loopback and at +1 ms
# each way, plus the engine's serial-vs-pipelined ratio. Replaces the SMB section of
# docs/benchmarks.md. Needs samba and smbclient (scripts/test.sh installs them).
#   ROUNDS=3 RUNTIME=5 SIZE_MIB=1024 scripts/bench-smb.sh
set -euo pipefail
cd "$(dirname "$0")/.."
command -v smbd >/dev/null && command -v smbclient >/dev/null ||
    { echo "bench-smb: smbd and smbclient needed (apt install samba smbclient)" >&2; exit 1; }
cargo build --release -q -p twinpath -p twinpath-tools
TWINPATH_BIN=$PWD/target/release/twinpath exec target/release/bench-smb
