"""The kernel<->replay contract, below both: flow semantics (semantics.py), flow identity
(flowkey.py), Community ID (community_id.py) and the packet shape a packet source hands
the meter (packet.py).

The kernel reader (sensor/kernel/flowmap.py) and the userspace meter
(sensor/engine/meter.py) both follow these rules and are tested against each other, so
this package imports nothing of sensor.kernel, sensor.engine, sensor.replay or
sensor.export (tests/unit/test_layers.py checks that).
"""
