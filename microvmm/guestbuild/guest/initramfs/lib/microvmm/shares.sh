# `microvmm run --share HOST_DIR[:TAG][:ro]`: mount every virtio-9p share at
# /mnt/TAG, sourced by /init once /sys is mounted and before a `-- CMD` runs.
# The tags come from the devices themselves (9pnet_virtio's mount_tag file
# in sysfs: the tag and a NUL), so the kernel command line carries nothing.
# Without a share (or a kernel without 9p) this forks nothing.
: "${MICROVMM_VIRTIO_SYSFS:=/sys/bus/virtio/drivers/9pnet_virtio}"
: "${MICROVMM_SHARES_ROOT:=/mnt}"
: "${MICROVMM_MOUNT:=mount}"

for share_tag_file in "$MICROVMM_VIRTIO_SYSFS"/virtio*/mount_tag; do
    [ -r "$share_tag_file" ] || continue
    share_tag=
    read -r share_tag <"$share_tag_file" || :
    case "$share_tag" in
        microvmm.*) continue ;;  # microvmm's own (--rootfs host: rootfs.sh)
        ''|.|..|*[!A-Za-z0-9_.-]*) echo "microvmm: share tag '$share_tag' not mounted"; continue ;;
    esac
    mkdir -p "$MICROVMM_SHARES_ROOT/$share_tag"
    $MICROVMM_MOUNT -t 9p -o trans=virtio,version=9p2000.L "$share_tag" "$MICROVMM_SHARES_ROOT/$share_tag" ||
        echo "microvmm: could not mount share $share_tag at $MICROVMM_SHARES_ROOT/$share_tag"
done
unset share_tag_file share_tag
