"""The Faust application, assembled from the stages (the one place that knows all of them).

`faust -A stockstream worker` resolves `stockstream.app`, which calls `worker_app()`: settings
are loaded and the app is built then, not when a module is imported. What the worker runs:

    stock-quotes ─┬─> agents/aggregate.py (windows in tables/) ──> stock-quotes-aggregated ─┐
                  │     bad and late records ──> stock-quotes-dlq (deadletter.py)           │
                  └─> archive/ (own consumer group, own process) ──> object storage         │
    stock-quotes-aggregated ──> warehouse/ (own consumer group) ──> DuckDB | BigQuery <────┘
    stock-anomalies ──> alerts/ (a consumer group per receiver) ──> Slack webhook, PagerDuty
    stock-quotes-aggregated ──> agents/anomaly/ (histories in tables/) ──> stock-anomalies
                                  bad windows ──> stock-quotes-dlq
    web/: /health/ /ready/ /metrics/, inspection pages (/, /symbols/, /partitions/), /windows/
"""

from __future__ import annotations

import functools
import logging
import shutil
from pathlib import Path
from typing import Any

import faust
from faust.utils.terminal import SpinnerHandler

from stockstream.agents.aggregate.agent import Aggregation
from stockstream.agents.anomaly.agent import AnomalyDetection
from stockstream.alerts.delivery import alert_services
from stockstream.archive.archiver import archiver
from stockstream.deadletter import DeadLetters
from stockstream.kafka import clients, faust_transport
from stockstream.kafka.consumer_service import ConsumerServiceRunner
from stockstream.kafka.record_batches import BatchedTopic
from stockstream.kafka.topics import clock_topic_name, ensure_topics
from stockstream.logs import logging_config
from stockstream.service_process import ServiceProcess
from stockstream.settings import Settings, SettingsError, load_settings
from stockstream.tables import anomaly_state
from stockstream.tables.window_state import define_table
from stockstream.warehouse.backends import from_settings as warehouse_backend
from stockstream.warehouse.loader import WarehouseLoader
from stockstream.web import chart, views
from stockstream.web.cluster import advertised_url
from stockstream.web.recent import RecentWindows

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

    def _new_transport(self) -> Any:
        return faust_transport.Transport(self.conf.broker_consumer, self)

    def _new_producer_transport(self) -> Any:
        return faust_transport.Transport(self.conf.broker_producer, self)

    def _undo_spinner_logging(self) -> None:
        # `faust worker` at its default `-l warn` (or above) keeps its terminal spinner and, for
        # it, sets the root logger to DEBUG, our handler to the -l level: every debug call of
        # every library then builds a record (findCaller included) that is thrown away -- 5% of
        # the worker's time in benchmarks/ -- and our LOG_LEVEL is overridden. The spinner
        # has no use in a service's log, so its handler goes and LOG_LEVEL rules again.
        root = logging.getLogger()
        spinners = [h for h in root.handlers if isinstance(h, SpinnerHandler)]
        if not spinners:
            return
        for spinner in spinners:
            root.removeHandler(spinner)
        for handler in root.handlers:
            handler.setLevel(logging.NOTSET)
        root.setLevel(self.settings.log.level)

    async def on_first_start(self) -> None:
        self._undo_spinner_logging()
        # Faust creates only the last path component of its datadir.
        self.settings.data_dir.mkdir(parents=True, exist_ok=True)
        await super().on_first_start()
        self._discard_local_state_after_crash()
        await ensure_topics(self.settings)

    async def on_stop(self) -> None:
        await super().on_stop()
        # Reached only after the tables stopped and the producer flushed.
        self._clean_marker.touch()


def create_app(settings: Settings) -> StockstreamApp:
    """The worker's app with every stage registered. Raises `SettingsError` for a setting
    that cannot work (checked here, before anything connects)."""
    worker, kafka = settings.worker, settings.kafka
    app = StockstreamApp(
        worker.app_id,
        broker=clients.faust_brokers(kafka),
        broker_credentials=clients.faust_credentials(kafka),
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
        # A worker learns that the group rebalances (one joined or left) only from its next
        # heartbeat's answer, and until all have rejoined nobody processes: 1 s, not 3 s,
        # keeps that part of the pause short for one small request a second.
        broker_heartbeat_interval=min(1.0, worker.session_timeout_seconds / 3),
        consumer_auto_offset_reset=worker.consumer_auto_offset_reset,
        topic_partitions=kafka.partitions,
        topic_replication_factor=kafka.replication_factor,
        # Ours are plain JSON bytes: no Faust metadata ever reaches a topic.
        key_serializer="raw",
        value_serializer="raw",
        web_host=worker.web_host,
        web_port=worker.web_port,
        web_bind=worker.web_host,
        # Where other workers forward requests for partitions this one owns (web/cluster.py).
        canonical_url=advertised_url(worker),
        logging_config=logging_config(settings.log.level, settings.log.format),
        # A bad record must never stop the worker; failures are handled per record.
        stream_wait_empty=True,
    )
    app.settings = settings

    def topic(*names: str) -> faust.TopicT:
        return app.topic(*names, partitions=kafka.partitions)

    dlq = topic(kafka.dlq_topic)
    dead_letters = DeadLetters(
        lambda key, value: dlq.send(key=key, value=value), kafka.dlq_max_record_bytes
    )
    aggregation = Aggregation(
        app,
        settings,
        define_table(app, kafka.partitions),
        output=topic(kafka.aggregated_topic),
        clock=topic(clock_topic_name(settings)),
        dead_letters=dead_letters,
    )
    # One agent reads quotes and idle ticks, so ticks run in the same partition context (and
    # the same changelog partition) as the quotes whose windows they close.
    # Delivered a fetched batch per partition at a time (kafka/record_batches.py).
    quotes_and_ticks = BatchedTopic(
        app, topics=[kafka.quotes_topic, clock_topic_name(settings)], partitions=kafka.partitions
    )
    aggregation.register(quotes_and_ticks)
    if settings.anomaly.enabled:
        # Its own topic: a second agent on the quotes topic would stall the first.
        anomalies = AnomalyDetection(
            app,
            settings,
            anomaly_state.define_table(app, kafka.partitions),
            output=topic(kafka.anomalies_topic),
            dead_letters=dead_letters,
        )
        anomalies.register(topic(kafka.aggregated_topic))
    # Faust's `app.service` is typed for classes but takes instances too (they are started
    # after table recovery and stopped with the worker).
    if settings.archive.enabled and settings.archive.process == "child":
        archive = ServiceProcess(settings, "archive", f"{archiver.__module__}:{archiver.__name__}")
        app.service(archive)  # type: ignore[arg-type]
    elif settings.archive.enabled:
        app.service(ConsumerServiceRunner(archiver(settings, dead_letters)))  # type: ignore[arg-type]
    if settings.warehouse.enabled:
        loader = WarehouseLoader(settings, warehouse_backend(settings), dead_letters)
        app.service(ConsumerServiceRunner(loader))  # type: ignore[arg-type]
    # One per alert receiver that is on (own consumer group each); none when both are off.
    for alerts in alert_services(settings, dead_letters):
        app.service(ConsumerServiceRunner(alerts))  # type: ignore[arg-type]
    recent = RecentWindows()
    aggregation.emitter.listeners.append(recent.record)
    views.register(app, settings, aggregation.state, recent)
    chart.register(app, settings, aggregation.state)
    return app


@functools.cache
def worker_app() -> StockstreamApp:
    """The app of this process, built on first use from the environment; a configuration
    error stops the process with a message naming the variable (never a secret's value)."""
    try:
        return create_app(load_settings())
    except SettingsError as exc:
        raise SystemExit(f"configuration error: {exc}") from None
