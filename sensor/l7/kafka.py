"""Kafka: recognised by its port only, not parsed yet (flows carry app_proto "kafka")."""

from __future__ import annotations

from sensor.l7.registry import Protocol

PROTOCOL = Protocol(name="kafka", tcp_ports=(9092,))
