#!/usr/bin/env bash
# Install Loupe as two systemd services (loupe-sensor, loupe-collector). Idempotent: run
# it again after an upgrade; it never overwrites files in /etc/loupe.
#
#   scripts/install-service.sh [--venv PATH] [--enforce] [--enable] [--now]
#
# What goes where:
#   /opt/loupe/venv          the package, in its own venv (--system-site-packages, so bcc
#                            from python3-bpfcc is importable), installed from this checkout
#   /opt/loupe/bin/loupe     the command the units run (a link into the venv; with --venv
#                            a two-line wrapper, see below)
#   /opt/loupe/share/doc     docs/ops.md, the units' Documentation=
#   /etc/loupe/*.toml        example configs (every key at its default), if absent
#   /etc/systemd/system/     loupe-sensor.service, loupe-collector.service
#   /etc/sysusers.d/loupe.conf, /etc/tmpfiles.d/loupe.conf: the `loupe` user, /var/lib/loupe
#
# --venv PATH uses an existing venv that already has Loupe's dependencies (a development
# checkout's .venv after `make install`) instead of building /opt/loupe/venv: the units
# then run this checkout's code with that venv's Python. /opt/loupe/bin/loupe is then a
# wrapper, `PATH/bin/python -m sensor.cli` with this checkout on PYTHONPATH, not a link to
# the venv's `loupe` script: that script's #! line and the editable install's .pth name
# the paths the venv was made at, which need not be the paths the units see. The
# checkout and the venv must be readable by user `loupe` and must not live where the
# units' sandbox hides them (/tmp and /var/tmp: PrivateTmp; /home, /root: ProtectHome).
# --enforce also installs systemd/loupe-sensor-enforce.conf as the sensor's drop-in
# /etc/systemd/system/loupe-sensor.service.d/enforce.conf, for hosts that enforce block
# verdicts: CAP_NET_RAW in the bounding set (TCP resets) and a writable
# /sys/fs/bpf/loupe (the maps `loupe block` needs). Without it, blocked flows are still
# dropped, with no resets and no `loupe block` (docs/ops.md). Uninstall removes it.
# --enable enables both units; --now also starts them.
# The default build needs PyPI (pip) for the dependencies, and the generated protobuf code
# (`make proto`, done by `make install`).
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)
say() { printf 'install-service: %s\n' "$*" >&2; }
die() { say "$*"; exit 1; }

venv="" enforce=0 enable=0 now=0
while [ $# -gt 0 ]; do
    case "$1" in
        --venv) venv=${2:?--venv needs a path}; shift 2 ;;
        --enforce) enforce=1; shift ;;
        --enable) enable=1; shift ;;
        --now) enable=1; now=1; shift ;;
        -h|--help) sed -n '2,32p' "$0"; exit 0 ;;
        *) die "unknown argument $1 (see --help)" ;;
    esac
done

[ "$(id -u)" = 0 ] || die "must run as root"
command -v systemctl >/dev/null || die "systemctl not found: these are systemd services"
prefix=/opt/loupe

# Paths the units' sandbox replaces with empty private ones: code there exists for this
# script but not for the services, which then fail with status=203/EXEC or ImportError.
hidden_by_sandbox() {
    case "$1/" in
        /tmp/*|/var/tmp/*) echo "PrivateTmp=yes" ;;
        /home/*|/root/*|/run/user/*) echo "ProtectHome=yes" ;;
        *) return 1 ;;
    esac
}

# 1. The package.
[ -f loupe/v1/records_pb2.py ] || die "generated protobuf code missing: run make install (or make proto) first"
mkdir -p "$prefix/bin" "$prefix/share/doc"
if [ -n "$venv" ]; then
    [ -x "$venv/bin/python" ] || die "$venv/bin/python not found: run make install in that checkout first"
    venv=$(cd "$venv" && pwd -P)
    code=$(pwd -P)
    for path in "$code" "$venv"; do
        if why=$(hidden_by_sandbox "$path"); then
            die "$path is hidden from the services by $why: put the checkout elsewhere (e.g. /srv or /opt), or install without --venv"
        fi
    done
    # Written next to the target and renamed over it: the old /opt/loupe/bin/loupe may be
    # a link into a venv, and writing through it would overwrite that venv's script.
    cat >"$prefix/bin/loupe.new" <<WRAPPER
#!/bin/sh
# Written by $code/scripts/install-service.sh --venv: this checkout's code, that venv.
# -P: the working directory does not go first on sys.path (a directory holding another
# "sensor" package must not shadow this one).
PYTHONPATH='$code' exec '$venv/bin/python' -P -m sensor.cli "\$@"
WRAPPER
    chmod 0755 "$prefix/bin/loupe.new"
    mv -f "$prefix/bin/loupe.new" "$prefix/bin/loupe"
    target="$prefix/bin/loupe (runs $code with $venv)"
else
    if [ ! -x "$prefix/venv/bin/python" ]; then
        say "creating $prefix/venv"
        mkdir -p "$prefix"
        /usr/bin/python3 -m venv --system-site-packages "$prefix/venv"
    fi
    say "installing Loupe from $repo into $prefix/venv"
    "$prefix/venv/bin/pip" install -q --disable-pip-version-check "$repo"
    target=$prefix/venv/bin/loupe
    ln -sfn "$target" "$prefix/bin/loupe"
fi
install -m 0644 docs/ops.md "$prefix/share/doc/ops.md"

# 2. The system user and the state root.
install -D -m 0644 systemd/loupe.sysusers.conf /etc/sysusers.d/loupe.conf
install -D -m 0644 systemd/loupe.tmpfiles.conf /etc/tmpfiles.d/loupe.conf
if command -v systemd-sysusers >/dev/null; then
    systemd-sysusers /etc/sysusers.d/loupe.conf
elif ! id loupe >/dev/null 2>&1; then
    useradd --system --home-dir /var/lib/loupe --no-create-home --shell /usr/sbin/nologin loupe
fi
systemd-tmpfiles --create /etc/tmpfiles.d/loupe.conf

# The services run as `loupe`: it must be able to run the command (a venv under /root or
# a 0700 checkout would fail only at start, with a terse status=203/EXEC).
if ! out=$(setpriv --reuid=loupe --regid=loupe --clear-groups --inh-caps=-all \
        "$prefix/bin/loupe" --help 2>&1 >/dev/null); then
    die "user loupe cannot run $prefix/bin/loupe ($target): make it readable, or install without --venv; it said: $(printf '%s' "$out" | tail -n 1)"
fi

# 3. Configuration: examples only where the admin has none; existing files are theirs.
install -d -m 0750 -o root -g loupe /etc/loupe
for f in sensor.toml collector.toml; do
    if [ -e "/etc/loupe/$f" ]; then
        say "keeping existing /etc/loupe/$f"
    else
        install -m 0640 -o root -g loupe "systemd/$f" "/etc/loupe/$f"
    fi
done

# 4. Units.
for unit in loupe-sensor.service loupe-collector.service; do
    install -m 0644 "systemd/$unit" "/etc/systemd/system/$unit"
done
# Without --enforce an enforce.conf from an earlier install stays: dropping privileges
# is the admin's decision (remove the file, or run uninstall-service.sh).
if [ "$enforce" = 1 ]; then
    install -D -m 0644 systemd/loupe-sensor-enforce.conf \
        /etc/systemd/system/loupe-sensor.service.d/enforce.conf
fi
systemctl daemon-reload
systemd-analyze verify /etc/systemd/system/loupe-sensor.service \
    /etc/systemd/system/loupe-collector.service
if [ "$enable" = 1 ]; then
    systemctl enable loupe-collector.service loupe-sensor.service
fi
if [ "$now" = 1 ]; then
    systemctl restart loupe-collector.service loupe-sensor.service
fi
say "ok: units installed; start with: systemctl enable --now loupe-collector loupe-sensor"
