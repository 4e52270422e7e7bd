"""Faust agents and services. Importing this package registers them on `stockstream.app.app`:
the aggregation (aggregate, idle ticks), the raw archive (bronze layer) and the warehouse loader."""

from stockstream.agents import aggregate, archive, idle, warehouse

__all__ = ["aggregate", "archive", "idle", "warehouse"]
