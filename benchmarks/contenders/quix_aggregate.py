"""The Quix Streams contender: the same one-minute windows per symbol with Quix Streams 3.x.

    BENCH_BOOTSTRAP=... BENCH_TOPIC=... BENCH_OUTPUT=... BENCH_APP_ID=... BENCH_PROGRESS=file \
        BENCH_EXPECT=N BENCH_STATE_DIR=dir .venv-bench/bin/python quix_aggregate.py

Runs in its own virtualenv (benchmarks/requirements-quix.txt), so it imports nothing of
stockstream. Event time is the quote's `market_timestamp`; `tumbling_window(60 s, grace 5 s)`,
the window fields the worker emits (count, sum, min, max, first and last price, volume),
`.final(closing_strategy="partition")`, written to the output topic; state in RocksDB with a
changelog topic, at-least-once, as the worker.
"""

from __future__ import annotations

import os
from typing import Any

from progress import Progress
from quixstreams import Application
from quixstreams.dataframe.windows import Count, Max, Min, Sum
from quixstreams.dataframe.windows.aggregations import First, Last


def event_time(value: Any, headers: Any, timestamp: float, timestamp_type: Any) -> int:
    return int(value["market_timestamp"])


def main() -> None:
    env = os.environ
    progress = Progress.from_env()
    app = Application(
        broker_address=env["BENCH_BOOTSTRAP"],
        consumer_group=env["BENCH_APP_ID"],
        auto_offset_reset="earliest",
        state_dir=env.get("BENCH_STATE_DIR", "/tmp/quix-state"),
        commit_interval=2.8,
        loglevel="WARNING",
    )
    quotes = app.topic(
        env["BENCH_TOPIC"], value_deserializer="json", timestamp_extractor=event_time
    )
    output = app.topic(env["BENCH_OUTPUT"], value_serializer="json")
    sdf = app.dataframe(quotes)

    def counted(value: Any) -> None:
        progress.add(1)

    sdf = sdf.update(counted)
    sdf = sdf.tumbling_window(duration_ms=60_000, grace_ms=5_000).agg(
        count=Count(),
        sum=Sum("current_price"),
        low=Min("current_price"),
        high=Max("current_price"),
        open=First("current_price"),
        close=Last("current_price"),
        volume=Sum("volume"),
    )
    sdf = sdf.final(closing_strategy="partition")
    sdf.to_topic(output)
    app.run()


if __name__ == "__main__":
    main()
