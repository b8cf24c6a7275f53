#!/usr/bin/env bash
# Build (once) the Debian 12 root filesystem that tests/ops boots with systemd-nspawn, so
# the service units run under a real systemd as PID 1 that cannot touch the host.
#
#   scripts/build-test-rootfs.sh [ROOTFS]     default: /var/cache/loupe-test/rootfs
#
# Idempotent: a finished tree carries a stamp with the hash of the package list below;
# when the stamp matches, the script exits at once. A build goes into ROOTFS.tmp and is
# renamed into place only when complete, so an interrupted build never leaves a tree that
# looks finished. A lock keeps two concurrent callers from building twice.
#
# The tree stays outside the repository on purpose (hundreds of MB). Tests boot it with
# --volatile=overlay, so nothing they do is ever written back into it.
set -euo pipefail
say() { printf 'build-test-rootfs: %s\n' "$*" >&2; }

rootfs=${1:-/var/cache/loupe-test/rootfs}
mirror=${LOUPE_DEBIAN_MIRROR:-http://deb.debian.org/debian}
suite=bookworm
# What the container needs to run Loupe's units: systemd as init, the same Python as the
# host (the repo's venv is bind-mounted in and points at /usr/bin/python3), bcc from the
# distribution for the sensor, iproute2 for interfaces, procps for ps/kill. python3-six:
# the venv is made with --system-site-packages on a host that has Debian's six, so pip
# took it from there for ddsketch (the collector's statistics) and the venv lacks it.
packages=systemd,systemd-sysv,dbus,python3,python3-venv,python3-bpfcc,python3-six,iproute2,procps
stamp_value="$suite $packages"
stamp=$rootfs/.loupe-rootfs-stamp

if [ "$(id -u)" != 0 ]; then
    say "must run as root (debootstrap)"; exit 1
fi
for tool in debootstrap systemd-nspawn; do
    command -v "$tool" >/dev/null || { say "$tool missing: apt-get install debootstrap systemd-container"; exit 1; }
done

mkdir -p "$(dirname "$rootfs")"
exec 9>"$rootfs.lock"
flock 9

if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$stamp_value" ]; then
    say "ok: $rootfs is up to date"
    exit 0
fi

tmp=$rootfs.tmp
rm -rf "$tmp"
mkdir -p "$tmp"
start=$(date +%s)
say "debootstrap $suite into $tmp (first time only; takes a few minutes)"
debootstrap --variant=minbase --include="$packages" "$suite" "$tmp" "$mirror" \
    >"$rootfs.debootstrap.log" 2>&1 || { say "debootstrap failed; see $rootfs.debootstrap.log"; exit 1; }

# nspawn supplies the machine id at boot; an empty file tells systemd to use it rather
# than run first-boot setup.
: >"$tmp/etc/machine-id"
# Units that only make sense on a real machine or console; masked so boot reaches
# multi-user.target quickly and cleanly in a container without a network or a tty.
for unit in getty@tty1.service console-getty.service systemd-networkd-wait-online.service \
            apt-daily.timer apt-daily-upgrade.timer e2scrub_all.timer fstrim.timer; do
    ln -sfn /dev/null "$tmp/etc/systemd/system/$unit"
done
# The mount points the test binds the kernel side into (bpffs, tracefs exist under /sys).
mkdir -p "$tmp/work" "$tmp/usr/src"
apt-get -o RootDir="$tmp" clean >/dev/null 2>&1 || true
echo "$stamp_value" >"$tmp/.loupe-rootfs-stamp"

rm -rf "$rootfs"
mv "$tmp" "$rootfs"
say "ok: built $rootfs in $(( $(date +%s) - start ))s"
