"""The Faust application: settings, channels and tables in one place, then the agents.

Where a quote goes: `stock-quotes` -> agents/aggregate.py (validate, fold into the window table
of tables/window_state.py, close by tables/windows.py rules) -> `stock-quotes-aggregated`;
bad records -> `stock-quotes-dlq`.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

import faust

from stockstream.logs import logging_config
from stockstream.settings import Settings, SettingsError, load_settings
from stockstream.topics import bootstrap_list, clock_topic_name, ensure_topics

log = logging.getLogger(__name__)


class StockstreamApp(faust.App):
    """A Faust app that creates and checks its topics before it subscribes to them, and that
    never recovers its tables from local RocksDB state left behind by a crash."""

    settings: Settings

    @property
    def _clean_marker(self) -> Path:
        return Path(self.conf.datadir) / "clean-shutdown"

    def _discard_local_state_after_crash(self) -> None:
        # Faust writes RocksDB immediately but records only the last *acknowledged* changelog
        # offset; after a crash it replays the unacknowledged tail of the changelog over newer
        # local values, mixing two points in time (seen as re-emitted windows in the SIGKILL
        # test). Without a clean-shutdown marker the local state is dropped, so the tables are
        # rebuilt from the changelog alone: a consistent prefix of our writes.
        marker, tables = self._clean_marker, Path(self.conf.tabledir)
        if marker.exists():
            marker.unlink()
            return
        if tables.exists() and any(tables.iterdir()):
            log.warning(
                "previous run did not stop cleanly: discarding local table state,"
                " rebuilding it from the changelog",
                extra={"path": str(tables)},
            )
            shutil.rmtree(tables)

    async def on_first_start(self) -> None:
        await super().on_first_start()
        self._discard_local_state_after_crash()
        await ensure_topics(self.settings)

    async def on_stop(self) -> None:
        await super().on_stop()
        # Reached only after the tables stopped and the producer flushed.
        self._clean_marker.touch()


def create_app(settings: Settings) -> StockstreamApp:
    worker = settings.worker
    app = StockstreamApp(
        worker.app_id,
        broker=[f"kafka://{server}" for server in bootstrap_list(settings)],
        store=worker.store,
        datadir=str(settings.data_dir / "faust"),
        processing_guarantee=worker.processing_guarantee,
        broker_commit_interval=worker.commit_interval_seconds,
        # Changelog records are fire-and-forget: batching them is most of the producer cost.
        producer_linger=worker.producer_linger_seconds,
        # Faust would otherwise read bare variables such as PRODUCER_LINGER_MS, which are ours.
        env_prefix="FAUST_",
        # How long a crashed worker's partitions stay unassigned before others take them.
        broker_session_timeout=worker.session_timeout_seconds,
        broker_heartbeat_interval=min(3.0, worker.session_timeout_seconds / 3),
        consumer_auto_offset_reset=worker.consumer_auto_offset_reset,
        topic_partitions=settings.kafka.partitions,
        topic_replication_factor=settings.kafka.replication_factor,
        # Ours are plain JSON bytes: no Faust metadata ever reaches a topic.
        key_serializer="raw",
        value_serializer="raw",
        web_host=worker.web_host,
        web_port=worker.web_port,
        web_bind=worker.web_host,
        logging_config=logging_config(settings.log.level, settings.log.format),
        # A bad record must never stop the worker; failures are handled per record.
        stream_wait_empty=True,
    )
    app.settings = settings
    # Faust creates only the last path component of its datadir.
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    return app


try:
    settings = load_settings()
except SettingsError as exc:
    # Name the variable and stop; no traceback, and never a secret's value.
    raise SystemExit(f"configuration error: {exc}") from None
app = create_app(settings)

quotes_topic = app.topic(settings.kafka.quotes_topic, partitions=settings.kafka.partitions)
aggregated_topic = app.topic(settings.kafka.aggregated_topic, partitions=settings.kafka.partitions)
dlq_topic = app.topic(settings.kafka.dlq_topic, partitions=settings.kafka.partitions)
clock_topic = app.topic(clock_topic_name(settings), partitions=settings.kafka.partitions)
# One agent reads quotes and idle ticks, so ticks run in the same partition context (and the
# same changelog partition) as the quotes whose windows they close.
aggregation_input = app.topic(
    settings.kafka.quotes_topic,
    clock_topic_name(settings),
    partitions=settings.kafka.partitions,
)

window_table: Any = app.Table(
    "window-state",
    default=None,
    partitions=settings.kafka.partitions,
    schema=faust.Schema(key_serializer="json", value_serializer="json"),
    # Every quote rewrites its window: let compaction keep the changelog (and so recovery)
    # small instead of waiting for 1 GiB segments.
    extra_topic_configs={"segment.ms": "600000", "min.cleanable.dirty.ratio": "0.1"},
    help="Open one-minute windows (w|partition|symbol|start) and partition clocks (c|partition)",
)

# Registration side effects: agents, timers and web views attach themselves to `app`.
from stockstream import agents, web  # noqa: E402, F401
