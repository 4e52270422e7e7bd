"""Evaluate Faust's processing_guarantee='exactly_once' against the real broker.

Runs the integration data set (24-30 symbols, 3 partitions, out-of-order, late and bad
records) through a worker with Faust transactions enabled, optionally SIGKILLs it mid-stream,
and compares the output with the independent recomputation used by the tests. Prints the
outcome; it is an evaluation, not a test, because the behaviour under test is Faust's.

    python benchmarks/evaluate_exactly_once.py [--kill] [--bootstrap HOST:PORT]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import traceback
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.integration.harness import (  # noqa: E402
    Stack,
    Worker,
    create_topics,
    dataset,
    end_offsets,
    produce,
    read_all,
)
from tests.integration.test_aggregation import _dedupe_dlq, check_output  # noqa: E402
from tests.reference import expected_windows  # noqa: E402


async def evaluate(bootstrap: str, kill: bool, workdir: Path) -> bool:
    stack = Stack(
        bootstrap,
        workdir / "data",
        extra_env={
            "STOCKSTREAM_PROCESSING_GUARANTEE": "exactly_once",
            "STOCKSTREAM_UNSAFE_FAUST_EXACTLY_ONCE": "true",
        },
    )
    await create_topics(stack)
    produced = await produce(bootstrap, stack.quotes, dataset(symbols=30, minutes=40, seed=11))
    expected, late = expected_windows(produced.records)
    worker = Worker(stack, workdir / "worker-1.log")
    worker.wait_ready(120)
    if kill:
        while await end_offsets(bootstrap, stack.aggregated, 3) < len(expected) // 3:
            await asyncio.sleep(0.2)
        worker.kill()
        worker = Worker(stack, workdir / "worker-2.log")
        worker.wait_ready(120)
    windows = await read_all(bootstrap, stack.aggregated, until=len(expected), wait_s=150)
    dlq = await read_all(bootstrap, stack.dlq, until=len(late) + len(produced.invalid), wait_s=30)
    worker.stop()
    keys = Counter((v["symbol"], v["window_start_ms"]) for _, _, _, v, _ in windows)
    print(
        f"windows expected {len(expected)}, read (read_committed) {len(windows)}, "
        f"distinct {len(keys)}, duplicated {sum(1 for n in keys.values() if n > 1)}, "
        f"missing {len(set(expected) - set(keys))}"
    )
    logs = " ".join(p.read_text(errors="replace") for p in workdir.glob("worker-*.log"))
    print(f"ProducerFenced mentions in worker logs: {logs.count('ProducerFenced')}")
    try:
        check_output(windows, _dedupe_dlq(dlq), produced, stack)
    except AssertionError:
        traceback.print_exc(limit=1)
        return False
    return True


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bootstrap", default="127.0.0.1:9092")
    parser.add_argument("--kill", action="store_true", help="SIGKILL the worker mid-stream")
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="eos-eval-"))
    ok = asyncio.run(evaluate(args.bootstrap, args.kill, workdir))
    print(f"exactly_once {'HOLDS' if ok else 'DOES NOT HOLD'} (logs in {workdir})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
