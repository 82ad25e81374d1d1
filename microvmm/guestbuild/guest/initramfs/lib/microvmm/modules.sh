# Kernel modules added by `microvmm run --modules DIR` (microvmm/guestmodules.py),
# sourced by /init once /proc and /sys are mounted and before anything needs a
# console: a distribution kernel (Debian's) has virtio_pci and virtio_console
# as modules, so without them there is no /dev/hvc0 and no virtio port.
# microvmm appends an archive to this initramfs that puts the modules in
# $MICROVMM_MODULES_DIR with a list, load-order, naming them dependencies
# first. Without that archive (the default guest) this does nothing and
# forks nothing.
#
# The variables exist so that this can be tested on a host (with a fake
# insmod and sysfs); the guest never sets them.
: "${MICROVMM_MODULES_DIR:=/lib/microvmm/modules}"
: "${MICROVMM_INSMOD:=/bin/busybox insmod}"
: "${MICROVMM_CMDLINE:=/proc/cmdline}"
: "${MICROVMM_TTY_SYSFS:=/sys/class/tty}"
: "${MICROVMM_DEV:=/dev}"

# hvc0_usable: hvc0 exists and opens. Its sysfs entry alone is not enough:
# virtio_console registers the tty (and the console) before it lists the
# port as a console, and an open in between fails with EINVAL ("hvc_open:
# request_irq failed with rc -22"). /init's `exec 0</dev/console` failing
# there killed init (seen with Debian's kernel in the real-KVM lane). A
# failed open leaves nothing behind, so trying is safe.
hvc0_usable() {
    [ -e "$MICROVMM_TTY_SYSFS/hvc0" ] && { true <>"$MICROVMM_DEV/hvc0"; } 2>/dev/null
}

# load_microvmm_modules: insmod each listed module in order; a failure is
# reported on the console (the kernel's own message says why) and the rest
# are still tried. With console=hvc0 on the command line, wait up to five
# seconds for a usable hvc0: virtio_console adds its ports from a kernel
# worker after the probe, and /init reopens /dev/console right after this.
load_microvmm_modules() {
    local module cmdline arg tries=0
    [ -r "$MICROVMM_MODULES_DIR/load-order" ] || return 0
    while read -r module; do
        [ -n "$module" ] || continue
        $MICROVMM_INSMOD "$MICROVMM_MODULES_DIR/$module" \
            || echo "microvmm: insmod $module failed" >&2
    done <"$MICROVMM_MODULES_DIR/load-order"
    read -r cmdline <"$MICROVMM_CMDLINE" || :
    for arg in $cmdline; do
        if [ "$arg" = console=hvc0 ]; then
            until hvc0_usable; do
                [ "$tries" -ge 50 ] && { echo "microvmm: no hvc0 after loading the modules" >&2; break; }
                tries=$((tries + 1))
                sleep 0.1
            done
        fi
    done
}

load_microvmm_modules
