"""Faust agents. Importing this package registers them on `stockstream.app.app`."""

from stockstream.agents import aggregate, idle

__all__ = ["aggregate", "idle"]
