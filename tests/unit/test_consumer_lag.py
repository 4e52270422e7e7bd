"""The aggregation agent's lag gauges (agents/aggregate/lag.py) and the timings the agent
observes per batch and per closed window."""

from __future__ import annotations

from stockstream.agents.aggregate.lag import ConsumerLag, record_seconds
from stockstream.metrics import REGISTRY


def gauge(name: str, partition: int) -> float | None:
    return REGISTRY.get_sample_value(name, {"topic": "lag-test", "partition": str(partition)})


def test_records_behind_and_their_age_per_owned_partition() -> None:
    highs = {0: 100, 1: 50}
    lag = ConsumerLag("lag-test", highs.get, clock=lambda: 1_000.0)
    lag.processed(0, 89, 990.0)  # 10 records behind (90..99), last one 10 s old
    lag.processed(1, 49, 999_000)  # caught up; a millisecond timestamp (aiokafka record)
    assert lag.measure({0, 1}) == {0: (10, 10.0), 1: (0, 0.0)}
    assert gauge("stockstream_consumer_lag_records", 0) == 10
    assert gauge("stockstream_consumer_lag_seconds", 0) == 10.0
    assert gauge("stockstream_consumer_lag_seconds", 1) == 0.0


def test_a_partition_with_nothing_processed_or_no_high_watermark_is_not_guessed() -> None:
    lag = ConsumerLag("lag-test", {0: None, 1: 5}.get, clock=lambda: 0.0)
    lag.processed(0, 3, 1.0)
    assert lag.measure({0, 1, 2}) == {}


def test_an_older_redelivered_offset_does_not_move_progress_back() -> None:
    lag = ConsumerLag("lag-test", {0: 20}.get, clock=lambda: 100.0)
    lag.processed(0, 15, 90.0)
    lag.processed(0, 3, 10.0)  # re-read after a restart
    assert lag.measure({0}) == {0: (4, 10.0)}


def test_a_revoked_partition_stops_being_reported() -> None:
    lag = ConsumerLag("lag-test", {3: 10}.get, clock=lambda: 5.0)
    lag.processed(3, 4, 1.0)
    lag.measure({3})
    assert gauge("stockstream_consumer_lag_records", 3) == 5
    lag.forget({3})
    assert gauge("stockstream_consumer_lag_records", 3) is None
    lag.forget({3})  # twice is harmless


def test_record_timestamps_in_seconds_or_milliseconds() -> None:
    assert record_seconds(1_767_623_400.5) == 1_767_623_400.5
    assert record_seconds(1_767_623_400_500) == 1_767_623_400.5
    assert record_seconds(None) is None and record_seconds(-1) is None
