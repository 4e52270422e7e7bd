"""Faust agents. Importing this package registers them on `stockstream.app.app`."""

import stockstream.agents.archive  # the raw archive (bronze layer)
from stockstream.agents import aggregate, idle

__all__ = ["aggregate", "idle"]
