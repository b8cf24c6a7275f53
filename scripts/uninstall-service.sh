#!/usr/bin/env bash
# Reverse scripts/install-service.sh. Idempotent: removing what is already gone is fine.
#
#   scripts/uninstall-service.sh [--purge]
#
# Stops and disables both units and removes the units (and the sensor's enforce.conf
# drop-in from --enforce; other drop-ins there are the admin's and stay), /opt/loupe,
# the sysusers/tmpfiles entries and the `loupe` user. Configuration (/etc/loupe) and
# data (/var/lib/loupe: the collector's store, the sensor's spool) are kept, as Debian's
# `remove` keeps them; --purge deletes them too.
set -euo pipefail
say() { printf 'uninstall-service: %s\n' "$*" >&2; }
purge=0
case "${1:-}" in
    --purge) purge=1 ;;
    "") ;;
    *) say "unknown argument $1 (usage: uninstall-service.sh [--purge])"; exit 1 ;;
esac
[ "$(id -u)" = 0 ] || { say "must run as root"; exit 1; }

for unit in loupe-sensor.service loupe-collector.service; do
    if [ -e "/etc/systemd/system/$unit" ]; then
        systemctl disable --now "$unit" >/dev/null 2>&1 || systemctl stop "$unit" || true
        rm -f "/etc/systemd/system/$unit"
    fi
done
rm -f /etc/systemd/system/loupe-sensor.service.d/enforce.conf
rmdir --ignore-fail-on-non-empty /etc/systemd/system/loupe-sensor.service.d 2>/dev/null || true
systemctl daemon-reload
systemctl reset-failed loupe-sensor.service loupe-collector.service >/dev/null 2>&1 || true

rm -rf /opt/loupe
rm -f /etc/sysusers.d/loupe.conf /etc/tmpfiles.d/loupe.conf
if [ "$purge" = 1 ]; then
    rm -rf /etc/loupe /var/lib/loupe
    say "purged /etc/loupe and /var/lib/loupe"
else
    say "kept /etc/loupe and /var/lib/loupe (use --purge to delete them)"
fi
if id loupe >/dev/null 2>&1; then
    userdel loupe
fi
say "ok: Loupe services removed"
