"""Loupe sensor: kernel flow metering, userspace L7 engine, replay and export."""
