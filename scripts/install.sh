#!/usr/bin/env bash
# One install path for Loupe on Debian 12, run by `make install` (and so by `make run` and
# `make test`). Idempotent: every step checks before it acts.
#   1. Debian packages from scripts/apt-packages.txt (root only).
#   2. Kernel headers for bcc, with the fallback described in the README.
#   3. tracefs, for the tracepoints.
#   4. The venv (.venv, with system site-packages so `import bcc` works), protobuf code,
#      and the package itself in editable mode.
# `install.sh bench` (run by `make bench`) also installs the benchmarks' peers from
# scripts/apt-bench-packages.txt, Suricata 7 from Debian's bookworm-backports among them.
set -euo pipefail
cd "$(dirname "$0")/.."
say() { printf 'install: %s\n' "$*" >&2; }

# Debian 12's backports suite (Suricata 7 comes from there): one source entry, signed by
# Debian's own archive key. Packages are only taken from it when named with /bookworm-backports.
backports=/etc/apt/sources.list.d/loupe-bookworm-backports.sources
if [ "$(id -u)" = 0 ] && [ ! -f "$backports" ] \
        && ! grep -rqs 'bookworm-backports' /etc/apt/sources.list /etc/apt/sources.list.d/; then
    say "adding Debian's bookworm-backports source ($backports)"
    cat > "$backports" <<'SOURCES'
Types: deb
URIs: http://deb.debian.org/debian
Suites: bookworm-backports
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SOURCES
    apt-get update -q >/dev/null
fi

packages=$(grep -v '^\s*#' scripts/apt-packages.txt | grep -v '^\s*$' | tr '\n' ' ')
if [ "$(id -u)" = 0 ]; then
    missing=$(dpkg-query -W -f='${db:Status-Abbrev} ${Package}\n' $packages 2>/dev/null \
              | awk '$1 != "ii" {print $2}'; \
              for p in $packages; do dpkg-query -W "$p" >/dev/null 2>&1 || echo "$p"; done)
    missing=$(echo $missing | tr ' ' '\n' | sort -u | tr '\n' ' ')
    if [ -n "${missing// /}" ]; then
        say "installing Debian packages: $missing"
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -q >/dev/null
        # tshark asks whether non-root users may capture; answer no without a prompt.
        echo "wireshark-common wireshark-common/install-setuid boolean false" | debconf-set-selections
        apt-get install -y -q --no-install-recommends $missing >/dev/null
        # Servers installed here are test peers: the tests start their own instances on
        # ports and directories of their choosing. On a host with systemd, Debian starts
        # a server's service when it installs it; stop and disable the ones this step
        # just installed (a server that was there before is left as it was).
        if [ -d /run/systemd/system ]; then
            for pair in clickhouse-server:clickhouse-server mariadb-server:mariadb \
                        postgresql:postgresql redis-server:redis-server nginx-light:nginx \
                        nghttp2-server:nghttpd; do
                case " $missing " in
                    *" ${pair%%:*} "*) systemctl disable --now "${pair##*:}" >/dev/null 2>&1 || true ;;
                esac
            done
        fi
    fi
else
    say "not root: skipping Debian packages (needs: $packages)"
fi

# bcc compiles our programs against /lib/modules/$(uname -r)/build. On a normal Debian host
# linux-headers-$(uname -r) provides it. On a kernel no package matches (a custom or cloud
# kernel), Debian's current headers work because bpf/ only uses UAPI headers and touches
# no kernel-private struct: link them in. A host whose headers match never gets the link.
kver=$(uname -r)
moddir=/lib/modules/$kver
if [ ! -e "$moddir/build/include" ]; then
    if [ "$(id -u)" != 0 ]; then
        say "kernel headers for $kver missing and not root: run as root, or install linux-headers-$kver"
    elif apt-cache show "linux-headers-$kver" >/dev/null 2>&1; then
        say "installing linux-headers-$kver"
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q "linux-headers-$kver" >/dev/null
    else
        say "no headers package matches kernel $kver: using Debian's linux-headers-amd64 (UAPI only)"
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q linux-headers-amd64 >/dev/null
        arch_dir=$(ls -d /usr/src/linux-headers-*-amd64 | sort -V | tail -n 1)
        common_dir=${arch_dir%-amd64}-common
        mkdir -p "$moddir"
        ln -sfn "$arch_dir" "$moddir/build"
        ln -sfn "$common_dir" "$moddir/source"
    fi
fi

if [ "$(id -u)" = 0 ] && [ -d /sys/kernel/tracing ] && ! mountpoint -q /sys/kernel/tracing; then
    say "mounting tracefs on /sys/kernel/tracing"
    mount -t tracefs nodev /sys/kernel/tracing || say "could not mount tracefs; tracepoints will be unavailable"
fi

if [ ! -x .venv/bin/python ]; then
    say "creating .venv (with system site-packages, for bcc)"
    /usr/bin/python3 -m venv --system-site-packages .venv
fi
stamp=.venv/.loupe-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    say "installing Python dependencies into .venv"
    .venv/bin/pip install -q --disable-pip-version-check --upgrade pip
    .venv/bin/pip install -q --disable-pip-version-check grpcio-tools
fi
make --no-print-directory proto
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    .venv/bin/pip install -q --disable-pip-version-check -e '.[test]' --config-settings editable_mode=compat
    touch "$stamp"
fi
# The benchmarks' peers, for `make bench` only. Installing Suricata or softflowd on a host
# with systemd starts their services: stop and disable them, the benchmarks run their own.
if [ "${1:-}" = bench ] && [ "$(id -u)" = 0 ]; then
    bench_missing=""
    for entry in $(grep -v '^\s*#' scripts/apt-bench-packages.txt | grep -v '^\s*$'); do
        dpkg-query -W -f='${db:Status-Abbrev}' "${entry%%/*}" 2>/dev/null | grep -q '^ii' \
            || bench_missing="$bench_missing $entry"
    done
    if [ -n "$bench_missing" ]; then
        say "installing the benchmarks' peers:$bench_missing"
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
            $bench_missing >/dev/null
        if [ -d /run/systemd/system ]; then
            systemctl disable --now suricata softflowd >/dev/null 2>&1 || true
        fi
    fi
fi
say "ok: $(.venv/bin/loupe --help >/dev/null && echo 'loupe command ready in .venv/bin/loupe')"
