"""The same window logic as the worker without Faust: aiokafka in, windows out.

    BENCH_BOOTSTRAP=... BENCH_TOPIC=... BENCH_OUTPUT=... BENCH_PROGRESS=file BENCH_EXPECT=N \
        python benchmarks/contenders/plain_aggregate.py

Reads every partition of the quotes topic from the start (no group, no commits, no
changelog), validates with `QuoteValidator`, folds with `PartitionWindows` (tables/windows.py)
and sends each closed window to the output partition of its source partition, with the
worker's producer settings (idempotent, acks=all, 20 ms linger). What Python and aiokafka can
do for this job, i.e. the ceiling for a Faust worker doing the same.
"""

from __future__ import annotations

import asyncio
import os
import time

import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from progress import Progress

from stockstream.contracts.quotes import ContractError, QuoteValidator
from stockstream.settings import load_settings
from stockstream.tables.windows import Applied, PartitionWindows


async def main() -> None:
    env = os.environ
    settings = load_settings(environ={}, dotenv_path=None)
    agg = settings.aggregation
    validator = QuoteValidator.from_settings(settings.quotes)
    progress = Progress.from_env()
    consumer = AIOKafkaConsumer(
        env["BENCH_TOPIC"],
        bootstrap_servers=env["BENCH_BOOTSTRAP"],
        group_id=None,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
    )
    producer = AIOKafkaProducer(
        bootstrap_servers=env["BENCH_BOOTSTRAP"],
        acks="all",
        enable_idempotence=True,
        linger_ms=20,
    )
    output = env["BENCH_OUTPUT"]
    await consumer.start()
    await producer.start()
    windows: dict[int, PartitionWindows] = {}
    try:
        while True:
            batches = await consumer.getmany(timeout_ms=500, max_records=1000)
            sends = []
            for tp, records in batches.items():
                part = windows.get(tp.partition)
                if part is None:
                    part = windows[tp.partition] = PartitionWindows(
                        agg.window_seconds * 1000, int(agg.grace_seconds * 1000)
                    )
                now_ms = int(time.time() * 1000)
                for record in records:
                    try:
                        quote = validator.parse(record.key, record.value, now_ms)
                    except ContractError:
                        continue
                    if not isinstance(part.apply(quote, record.offset), Applied):
                        continue
                    due = part.closable()
                    for window in due:
                        sends.append(
                            await producer.send(
                                output,
                                key=window.symbol.encode(),
                                value=orjson.dumps(window.to_record()),
                                partition=tp.partition,
                            )
                        )
                    part.remove(due)
                progress.add(len(records))
            if sends:
                await asyncio.gather(*sends)
    finally:
        await consumer.stop()
        await producer.stop()


if __name__ == "__main__":
    asyncio.run(main())
