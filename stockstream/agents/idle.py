"""Idle ticks: the wall-clock half of the close rule.

A partition that received nothing for `AGG_IDLE_TIMEOUT_SECONDS` still has to emit its last
windows (end of the trading day, a quiet symbol). Table state may only change inside the
partition's own stream context, so instead of closing windows here the timer writes a tick to
the partition of the clock topic; the aggregation agent receives it in that partition's
context and re-checks idleness itself (agents/aggregate.py `handle_tick`). During a replay the
partition is never idle, so no wall-clock rule can close a window early.
"""

from __future__ import annotations

import logging
import time

import orjson

from stockstream.agents.aggregate import state
from stockstream.application import app, clock_topic, settings

log = logging.getLogger(__name__)

_agg = settings.aggregation
_last_tick: dict[int, float] = {}
# Partitions we own but have not yet loaded (no record since assignment): the first tick loads
# them, and a later tick flushes their restored windows if the partition stays idle.
_first_seen: dict[int, float] = {}


def _owned_partitions() -> set[int]:
    return {
        tp.partition
        for tp in app.assignor.assigned_actives()
        if tp.topic == settings.kafka.quotes_topic
    }


@app.timer(_agg.idle_check_seconds, name="idle-ticker")
async def idle_ticker() -> None:
    now = time.monotonic()
    owned = _owned_partitions()
    for partition in owned:
        windows = state.get(partition)
        if windows is None:
            since = _first_seen.setdefault(partition, now)
        elif not windows.open:
            continue
        else:
            _first_seen.pop(partition, None)
            since = state.last_activity.get(partition, now)
        due = now - since >= _agg.idle_timeout_seconds
        if due and now - _last_tick.get(partition, 0.0) >= _agg.idle_timeout_seconds:
            _last_tick[partition] = now
            await clock_topic.send(
                key=b"tick", value=orjson.dumps({"issued_at": time.time()}), partition=partition
            )
            log.debug("idle tick sent", extra={"partition": partition})
    for gone in set(_first_seen) - owned:
        _first_seen.pop(gone, None)
