"""Loupe sensor: kernel flow metering, userspace L7 engine, replay and export."""

# The per-packet path runs compiled when its build is current (sensor/_compiled.py).
from sensor import _compiled

_compiled.install()
