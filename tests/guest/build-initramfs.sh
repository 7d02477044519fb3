#!/usr/bin/env bash
# Builds the guest used by the QEMU tests: a Debian kernel (downloaded, not installed) and an
# initramfs with busybox, the virtio modules and fio. Output in $1 (default target/guest):
#   vmlinuz, initrd.img. Reuses an existing build (made from the same init) unless FORCE=1.
# Needs: apt-get (Debian's archive), busybox-static, cpio, fio.
set -euo pipefail

out=${1:-$(cd "$(dirname "$0")/../.." && pwd)/target/guest}
mkdir -p "$out"
out=$(cd "$out" && pwd)
here=$(cd "$(dirname "$0")" && pwd)
if [[ -s $out/vmlinuz && -s $out/initrd.img && ${FORCE:-0} != 1 ]] && cmp -s "$here/init" "$out/init"; then
    echo "guest already built in $out"
    exit 0
fi

for tool in busybox cpio fio apt-get dpkg; do
    command -v "$tool" >/dev/null || { echo "build-initramfs: $tool is missing (scripts/test.sh installs it)" >&2; exit 1; }
done

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# The kernel package linux-image-amd64 points at, downloaded and unpacked only.
pkg=$(apt-cache depends linux-image-amd64 | awk '/Depends: linux-image-[0-9]/ {print $2; exit}')
[[ -n $pkg ]] || { echo "build-initramfs: cannot find the kernel package (apt-get update?)" >&2; exit 1; }
(cd "$work" && apt-get download -q "$pkg" >/dev/null)
dpkg -x "$work"/"$pkg"_*.deb "$work/kernel"
kver=$(ls "$work/kernel/lib/modules")
cp "$work/kernel/boot/vmlinuz-$kver" "$out/vmlinuz"

root=$work/root
mkdir -p "$root"/{bin,sbin,dev,proc,sys,tmp,lib/modules,etc}
cp "$(command -v busybox)" "$root/bin/busybox"
for applet in sh mount umount insmod dd cmp md5sum cat echo sync poweroff sleep ls head tr mkdir grep; do
    ln -sf busybox "$root/bin/$applet"
done

# virtio is modular in Debian kernels; load order matters.
mods=(virtio_ring virtio virtio_pci_legacy_dev virtio_pci_modern_dev virtio_pci virtio_blk)
for m in "${mods[@]}"; do
    f=$(find "$work/kernel/lib/modules/$kver" -name "$m.ko*" | head -1)
    [[ -n $f ]] || { echo "build-initramfs: module $m not found" >&2; exit 1; }
    case $f in
        *.xz) xz -dc "$f" > "$root/lib/modules/$m.ko" ;;
        *.zst) zstd -qdc "$f" > "$root/lib/modules/$m.ko" ;;
        *) cp "$f" "$root/lib/modules/$m.ko" ;;
    esac
done
printf '%s\n' "${mods[@]}" > "$root/lib/modules/order"

# fio and every library it links, each at its own path.
cp "$(command -v fio)" "$root/bin/fio"
ldd "$(command -v fio)" | awk '{for (i = 1; i <= NF; i++) if ($i ~ /^\//) print $i}' | sort -u | while read -r lib; do
    mkdir -p "$root$(dirname "$lib")"
    cp -L "$lib" "$root$lib"
done

cp "$here/init" "$root/init"
chmod +x "$root/init"
(cd "$root" && find . | cpio -o -H newc --quiet) | gzip -1 > "$out/initrd.img"
cp "$here/init" "$out/init"
echo "guest built in $out (kernel $kver)"
