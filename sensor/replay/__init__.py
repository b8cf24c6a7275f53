"""Replay: capture files through the userspace engine into Loupe records.

The Python API (sensor/replay/api.py) is exported here lazily: the engine's pipeline
imports this package's reader and meter, so importing the API eagerly would be circular.
"""

__all__ = ["replay", "replay_records", "to_dataframe", "RECORD_KINDS"]


def __getattr__(name: str):
    if name in __all__:
        from sensor.replay import api

        return getattr(api, name)
    raise AttributeError(f"module 'sensor.replay' has no attribute {name!r}")
