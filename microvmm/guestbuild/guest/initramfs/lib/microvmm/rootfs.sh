# `microvmm run --rootfs host`: the host's / (the virtio-9p share tagged
# microvmm.rootfs=TAG on the kernel command line, read-only) under a tmpfs
# overlay becomes the root that `-- CMD` and the shell run in (chroot), so
# host programs run inside the guest. Sourced by /init after shares.sh; sets
# MICROVMM_ROOT (exported: microvmm-run-command and /etc/profile chroot into
# it). A kernel without 9p or overlayfs built in: say which, power off.
rootfs_tag=
read -r rootfs_cmdline </proc/cmdline
for rootfs_arg in $rootfs_cmdline; do
    case "$rootfs_arg" in microvmm.rootfs=*) rootfs_tag=${rootfs_arg#microvmm.rootfs=} ;; esac
done
if [ -n "$rootfs_tag" ]; then
    rootfs_missing=
    grep -qw 9p /proc/filesystems || rootfs_missing="CONFIG_9P_FS (with CONFIG_NET_9P_VIRTIO)"
    grep -qw overlay /proc/filesystems || rootfs_missing="$rootfs_missing CONFIG_OVERLAY_FS"
    if [ -n "$rootfs_missing" ]; then
        echo "microvmm: --rootfs host needs built into the guest kernel: $rootfs_missing; powering off" >/dev/console
        exec /bin/busybox reboot -f
    fi
    mkdir -p /host/lower /host/rw /host/root
    mount -t 9p -o ro,trans=virtio,version=9p2000.L "$rootfs_tag" /host/lower &&
        mount -t tmpfs -o mode=755 tmpfs /host/rw &&
        mkdir -p /host/rw/upper /host/rw/work &&
        mount -t overlay -o lowerdir=/host/lower,upperdir=/host/rw/upper,workdir=/host/rw/work overlay /host/root ||
        { echo "microvmm: could not mount the host's root (tag $rootfs_tag); powering off" >/dev/console
          exec /bin/busybox reboot -f; }
    for rootfs_dir in dev proc sys tmp run mnt; do
        mkdir -p "/host/root/$rootfs_dir" && mount -o rbind "/$rootfs_dir" "/host/root/$rootfs_dir"
    done
    export MICROVMM_ROOT=/host/root
fi
unset rootfs_tag rootfs_cmdline rootfs_arg rootfs_missing rootfs_dir
