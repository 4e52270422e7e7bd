"""Faust agents and services. Importing this package registers them on `stockstream.app.app`:
the aggregation (aggregate, idle ticks) and the raw archive (bronze layer)."""

from stockstream.agents import aggregate, archive, idle

__all__ = ["aggregate", "archive", "idle"]
