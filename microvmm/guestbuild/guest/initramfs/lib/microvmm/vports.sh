# Shell functions for finding virtio-console ports by name, sourced by /init,
# /sbin/microvmm-run-command and /sbin/microvmm-agent (busybox ash).
# Builtins only: a lookup forks nothing (each fork is costly on an emulating host).
#
# These variables (and MICROVMM_LIB, where the agent finds this file) exist
# so that the scripts can be tested on a host with a fake sysfs; the guest
# never sets them.
: "${MICROVMM_VPORTS_SYSFS:=/sys/class/virtio-ports}"
: "${MICROVMM_VPORTS_DEV:=/dev}"
: "${MICROVMM_CONSOLE_DRIVER:=/sys/bus/virtio/drivers/virtio_console}"

# vport_path NAME: set $vport to the device node (/dev/vportNpM) of the port
# named NAME; false if there is none.
vport_path() {
    local dir name
    for dir in "$MICROVMM_VPORTS_SYSFS"/*; do
        [ -r "$dir/name" ] || continue
        name=
        read -r name <"$dir/name" || :
        if [ "$name" = "$1" ]; then
            vport=$MICROVMM_VPORTS_DEV/${dir##*/}
            return 0
        fi
    done
    return 1
}

# vports_settle TENTHS: a virtio-console device is bound but none of its ports
# is there yet -> wait up to TENTHS tenths of a second for the first one. The
# driver adds ports as the host announces them, in a kernel worker that can
# trail the probe; the host announces all ports at once, so once one port is
# there the others are too.
vports_settle() {
    local tries=0
    set -- "$1" "$MICROVMM_CONSOLE_DRIVER"/virtio*
    [ -e "$2" ] || return 0
    while set -- "$1" "$MICROVMM_VPORTS_SYSFS"/*; [ ! -e "$2" ]; do
        [ "$tries" -ge "$1" ] && return 1
        tries=$((tries + 1))
        sleep 0.1
    done
    return 0
}

# wait_for_vport NAME TENTHS: vport_path, retried for up to TENTHS tenths of a second.
wait_for_vport() {
    local tries=0
    until vport_path "$1"; do
        [ "$tries" -ge "$2" ] && return 1
        tries=$((tries + 1))
        sleep 0.1
    done
}

