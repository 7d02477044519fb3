#!/usr/bin/env bash
# Runs the fio job set (configs/fio) in a real QEMU guest on vhost-user-blk disks and writes a
# report: target/guest-fio/report.md (table) and chart.svg. Arguments go to guest-fio (--help).
#   scripts/guest-fio.sh --local                  # twinpath file + smb disks vs qemu-storage-daemon
#   scripts/guest-fio.sh --local --jobs randread-4k-qd32,read-1m --runtime 10
#   scripts/guest-fio.sh --target vm1=/run/twinpath/scratch.sock --peer-image /srv/scratch.raw
# The jobs write to the disks: scratch images only. --local needs root and samba.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -q -p twinpath -p twinpath-tools --bin twinpath --bin guest-fio
TWINPATH_BIN=$PWD/target/release/twinpath exec target/release/guest-fio "$@"
