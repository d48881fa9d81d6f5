#!/bin/busybox sh
# keyd lab initramfs: share the host's root read-only over 9p under a tmpfs
# overlay, bind the lab kernel's modules, lay the per-boot overlay files in,
# and hand over to systemd. Parameters come from the kernel command line:
#   keydlab.modules=HOST_PATH  the extracted lib/modules tree
#   keydlab.overlay=HOST_PATH  files copied over the guest root (units, links)
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev

fail() {
    echo "keyd-lab init: $*" >/dev/console
    echo "keyd-lab init: dropping to a shell" >/dev/console
    exec sh </dev/console >/dev/console 2>&1
}

for m in virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci \
         virtio_console 9pnet 9pnet_virtio netfs fscache 9p overlay; do
    insmod "/modules/$m.ko" || fail "insmod $m failed"
done

for arg in $(cat /proc/cmdline); do
    case "$arg" in
        keydlab.modules=*) MODULES="${arg#keydlab.modules=}" ;;
        keydlab.overlay=*) OVERLAY="${arg#keydlab.overlay=}" ;;
    esac
done
[ -n "$MODULES" ] && [ -n "$OVERLAY" ] || fail "keydlab.modules= and keydlab.overlay= are required"

mkdir -p /lower /rw /newroot
mount -t 9p -o trans=virtio,version=9p2000.L,ro,msize=512000,cache=loose hostroot /lower \
    || fail "cannot mount the host root over 9p"
mount -t tmpfs -o mode=0755 tmpfs /rw
mkdir -p /rw/upper /rw/work
mount -t overlay -o lowerdir=/lower,upperdir=/rw/upper,workdir=/rw/work overlay /newroot \
    || fail "cannot mount the overlay root"

# The host is a container: systemd would ignore the kernel command line, and its image's
# policy-rc.d (exit 101) would stop package scripts from starting or stopping services, which
# a NAS's packages do.
rm -f /newroot/.dockerenv /newroot/usr/sbin/policy-rc.d
mkdir -p /newroot/lib/modules
mount --bind "/lower$MODULES" /newroot/lib/modules || fail "cannot bind $MODULES"
cp -a "/lower$OVERLAY/." /newroot/ || fail "cannot copy the overlay files from $OVERLAY"

mount --move /dev /newroot/dev
mount --move /proc /newroot/proc
mount --move /sys /newroot/sys
exec switch_root /newroot /lib/systemd/systemd
