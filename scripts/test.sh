#!/usr/bin/env bash
# Runs the whole test suite on a fresh machine: installs what it needs (apt packages, as root),
# builds, checks formatting and lints, and runs every test including the QEMU guest test.
#   scripts/test.sh            everything
#   SKIP_APT=1 scripts/test.sh  do not touch apt (packages already present)
set -euo pipefail
cd "$(dirname "$0")/.."

packages=(qemu-system-x86 qemu-utils busybox-static cpio fio xz-utils zstd samba smbclient xfsprogs e2fsprogs
          tgt libiscsi-dev libiscsi-bin systemd libvirt-clients libxml2-utils)
# Installs what is missing; run twice, since installing QEMU from bookworm can remove a newer
# qemu-utils the machine came with (qemu-utils Breaks an older qemu-system-common).
install_missing() {
    local missing=()
    for p in "${packages[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
    done
    ((${#missing[@]})) || return 0
    if [[ ${SKIP_APT:-0} == 1 ]]; then
        return 0
    fi
    if [[ $(id -u) != 0 ]]; then
        echo "test.sh: missing packages: ${missing[*]} (run as root, or install them)" >&2
        exit 1
    fi
    echo "== installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}
install_missing
install_missing
# The guest kernel comes from Debian's archive; make sure the package lists exist.
if ! apt-cache depends linux-image-amd64 >/dev/null 2>&1 && [[ $(id -u) == 0 ]]; then
    apt-get update -qq
fi

echo "== format and lints"
cargo fmt --all --check
cargo clippy --workspace --all-targets -- -D warnings

echo "== dependencies: licenses, bans, sources (deny.toml)"
# The advisories check needs the RustSec database from the network; on a machine that has
# one, run the whole check: cargo deny check
command -v cargo-deny >/dev/null || cargo install --locked cargo-deny
cargo deny check licenses bans sources

echo "== build"
cargo build --workspace --all-targets

echo "== tests (unit, integration with real clients, QEMU guest)"
cargo test --workspace --no-fail-fast -- --include-ignored

echo "== fuzzing, 60 s per target"
scripts/fuzz.sh

echo "== all tests passed"
