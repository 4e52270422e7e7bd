"""The least a Faust agent can do with the quotes topic: raw bytes, `orjson.loads`, count.

    BENCH_BOOTSTRAP=... BENCH_TOPIC=... BENCH_APP_ID=... BENCH_PROGRESS=file BENCH_EXPECT=N \
        faust -A minimal_faust [-L uvloop] worker          (from benchmarks/contenders/)

The engine's floor for `faust -A stockstream worker`: the same consumer settings as the
worker (application.py), nothing of its own work. The harness (aggregate_throughput.py) runs it.
BENCH_LEAN=1 gives it the worker's transport (stockstream/kafka/faust_transport.py) instead of
Faust's own: the floor of the engine as the worker runs it. BENCH_BATCHED=1 (with BENCH_LEAN=1)
subscribes through a BatchedTopic (stockstream/kafka/record_batches.py), as the worker's
aggregation agent does: one event per fetched batch of a partition.
"""

from __future__ import annotations

import os
from typing import Any

import faust
import orjson
from progress import Progress

env = os.environ


class LeanApp(faust.App):
    def _new_transport(self) -> Any:
        from stockstream.kafka import faust_transport

        return faust_transport.Transport(self.conf.broker_consumer, self)


app = (LeanApp if env.get("BENCH_LEAN") == "1" else faust.App)(
    env["BENCH_APP_ID"],
    broker=f"kafka://{env['BENCH_BOOTSTRAP']}",
    store="memory://",
    datadir=env.get("BENCH_DATADIR", "/tmp/minimal-faust"),
    broker_commit_interval=2.8,
    producer_linger=0.02,
    consumer_auto_offset_reset="earliest",
    topic_partitions=int(env.get("BENCH_PARTITIONS", "3")),
    key_serializer="raw",
    value_serializer="raw",
    web_port=int(env.get("BENCH_WEB_PORT", "6099")),
    web_host="127.0.0.1",
    web_bind="127.0.0.1",
    stream_wait_empty=True,
    env_prefix="FAUST_",
)
progress = Progress.from_env()
BATCH = int(env.get("BENCH_BATCH", "1000"))

if env.get("BENCH_BATCHED") == "1":
    from stockstream.kafka.record_batches import BatchedTopic

    @app.agent(BatchedTopic(app, topics=[env["BENCH_TOPIC"]]))
    async def count_batches(stream: Any) -> None:
        async for records in stream:
            for record in records:
                orjson.loads(record.value)
            progress.add(len(records))

else:

    @app.agent(app.topic(env["BENCH_TOPIC"]))
    async def count(stream: Any) -> None:
        async for batch in stream.take(BATCH, within=0.05):
            for value in batch:
                orjson.loads(value)
            progress.add(len(batch))
