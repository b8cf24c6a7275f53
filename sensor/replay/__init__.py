"""Replay: capture files through the userspace engine into Loupe records.

The Python API (sensor/replay/api.py) is exported here lazily, so importing the reader
alone does not load the whole engine.
"""

__all__ = ["replay", "replay_records", "to_dataframe", "RECORD_KINDS"]


def __getattr__(name: str):
    if name in __all__:
        from sensor.replay import api

        return getattr(api, name)
    raise AttributeError(f"module 'sensor.replay' has no attribute {name!r}")
