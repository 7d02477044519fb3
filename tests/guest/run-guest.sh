#!/usr/bin/env bash
# Boots the test guest on a vhost-user-blk socket and waits for its verdict.
#   run-guest.sh SOCKET GUEST_DIR LOG [KERNEL_ARGS...]
# Uses KVM when /dev/kvm works and falls back to TCG when it does not (or when the guest does
# not reach its init under KVM within 15 s; the verdict is remembered in GUEST_DIR/accel).
# TWINPATH_GUEST_ACCEL=kvm|tcg forces one.
# Exit 0 when the guest printed TWINPATH-GUEST-OK.
set -uo pipefail

sock=$1 guest=$2 log=$3
shift 3
args="console=ttyS0 panic=-1 quiet $*"

boot() {
    local accel=$1
    : > "$log"
    # This is the QEMU command line README.md documents for attaching a twinpath disk.
    qemu-system-x86_64 -accel "$accel" -m 512M -smp 1 -nodefaults -display none -no-reboot \
        -object memory-backend-memfd,id=mem,size=512M,share=on -numa node,memdev=mem \
        -chardev socket,id=disk0,path="$sock",reconnect=1 \
        -device vhost-user-blk-pci,chardev=disk0,num-queues=1 \
        -kernel "$guest/vmlinuz" -initrd "$guest/initrd.img" -append "$args" \
        -serial file:"$log" -monitor none &
    qemu=$!
}

wait_for() { # PATTERN SECONDS -> 0 if seen, 1 if QEMU exited or time ran out
    local deadline=$((SECONDS + $2))
    while ((SECONDS < deadline)); do
        grep -q "$1" "$log" 2>/dev/null && return 0
        kill -0 "$qemu" 2>/dev/null || { grep -q "$1" "$log" 2>/dev/null; return; }
        sleep 0.5
    done
    return 1
}

accel=${TWINPATH_GUEST_ACCEL:-}
[[ -z $accel && -s $guest/accel ]] && accel=$(cat "$guest/accel")
if [[ -z $accel ]]; then
    accel=tcg
    [[ -r /dev/kvm && -w /dev/kvm ]] && accel=kvm
fi
boot "$accel"
if [[ $accel == kvm && -z ${TWINPATH_GUEST_ACCEL:-} ]]; then
    if wait_for TWINPATH-GUEST-BOOTED 15; then
        echo kvm > "$guest/accel"
    else
        echo "run-guest: no boot under KVM within 15 s; using TCG from now on" >&2
        kill -9 "$qemu" 2>/dev/null; wait "$qemu" 2>/dev/null
        echo tcg > "$guest/accel"
        accel=tcg
        boot tcg
    fi
fi
echo "run-guest: booting with $accel" >&2
wait_for 'TWINPATH-GUEST-OK\|TWINPATH-GUEST-FAIL' "${TWINPATH_GUEST_TIMEOUT:-600}"
kill -0 "$qemu" 2>/dev/null && sleep 2
kill -9 "$qemu" 2>/dev/null
wait "$qemu" 2>/dev/null
grep -q TWINPATH-GUEST-OK "$log"
