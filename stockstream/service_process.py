"""A `ConsumerService` run in a child process of the worker, on a core of its own.

Why: a service with its own consumer group (the raw archive) shares nothing with the
aggregation but the process. In the worker's event loop its CPU is the aggregation's lost time
(benchmarks/: the archive cost the batched aggregation 22% of its rate); in a process of its
own it costs a second Python interpreter's memory instead, and nothing on a machine with a
core to spare. It stays part of the worker: `faust -A stockstream worker` starts it after
table recovery, stops it with the worker, restarts it after a crash, and serves its metrics.

The parent (`ServiceProcess`, a mode service of the Faust app) runs
`python -m stockstream.service_process <module:factory> <metrics fd>` and:
- writes the worker's `Settings` (pickled, length-prefixed) to the child's stdin, so both read
  exactly the same configuration however it was given, then keeps stdin open: the child stops
  when it reads EOF there, i.e. when the worker is gone, even after a SIGKILL;
- reads the child's metric snapshots (child_metrics.py) from a pipe and adds them to its own;
- on stop sends SIGTERM and waits `STOP_TIMEOUT_SECONDS` (the service stops as on a worker
  stop: revocation waits for an in-flight storage call), then SIGKILL, which is safe: every
  service commits only what it stored;
- restarts an exited child after `RESTART_DELAY_SECONDS`, except one that exits with
  `EXIT_ACCESS_DENIED` (Kafka refused its credentials or TLS): that stops the worker, as the
  in-process runner does.

The child builds the service with `factory(settings, dead_letters)`; its dead letters go to
the DLQ through an idempotent producer of its own (started on the first one), via the same
`DeadLetters` path as the worker's.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import logging
import logging.config
import os
import pickle
import signal
import sys
from collections.abc import Awaitable, Callable
from typing import Any

from aiokafka import AIOKafkaProducer
from mode import Service

from stockstream.child_metrics import WORKER_METRICS, MergedRegistry, parse_snapshot, snapshot
from stockstream.deadletter import DeadLetters
from stockstream.kafka import clients
from stockstream.kafka.consumer_service import RESTART_DELAY_SECONDS, ConsumerService, supervise
from stockstream.logs import logging_config
from stockstream.settings import Settings

log = logging.getLogger(__name__)

#: Builds the service in the child: `factory(settings, dead_letters)`.
Factory = Callable[[Settings, DeadLetters], ConsumerService]

#: The child's exit status when Kafka refused it (credentials, TLS): not restarted.
EXIT_ACCESS_DENIED = 78  # EX_CONFIG
STOP_TIMEOUT_SECONDS = 30.0
METRICS_INTERVAL_SECONDS = 1.0
#: A frame larger than this is not a metrics snapshot (ours are a few KB).
MAX_FRAME_BYTES = 16 * 1024 * 1024
_HEADER_BYTES = 4


def _frame(data: bytes) -> bytes:
    return len(data).to_bytes(_HEADER_BYTES, "big") + data


# ---------------------------------------------------------------------------- the worker side


class ServiceProcess(Service):
    """Runs the service `factory` ("module:function") builds in a child process for the
    worker's lifetime (module doc)."""

    def __init__(
        self,
        settings: Settings,
        name: str,
        factory: str,
        metrics: MergedRegistry = WORKER_METRICS,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.settings = settings
        self.name = name
        self.factory = factory
        self.metrics = metrics
        self.process: asyncio.subprocess.Process | None = None

    @property
    def label(self) -> str:
        return f"{type(self).__name__}({self.name})"

    @Service.task
    async def _supervise(self) -> None:
        while not self.should_stop:
            code = await self._run_child()
            if self.should_stop:
                return
            if code == EXIT_ACCESS_DENIED:
                await self.crash(
                    clients.KafkaAccessError(f"{self.name}: Kafka refused the service's client")
                )
                return
            log.error(
                f"{self.name} process exited, restarting in {RESTART_DELAY_SECONDS:g} s",
                extra={"exit_code": code},
            )
            await self.sleep(RESTART_DELAY_SECONDS)

    async def _run_child(self) -> int:
        read_fd, write_fd = os.pipe()
        try:
            process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                __name__,
                self.factory,
                str(write_fd),
                stdin=asyncio.subprocess.PIPE,
                pass_fds=(write_fd,),
            )
        except BaseException:
            os.close(read_fd)
            raise
        finally:
            os.close(write_fd)
        self.process = process
        log.info(f"{self.name} process started", extra={"pid": process.pid})
        try:
            assert process.stdin is not None
            process.stdin.write(_frame(pickle.dumps(self.settings)))
            with contextlib.suppress(ConnectionError):
                await process.stdin.drain()
            await self._read_metrics(read_fd)
            return await process.wait()
        finally:
            if process.returncode is None:  # cancelled: never leave it behind
                process.kill()
                await process.wait()
            self.metrics.retire(self.name)
            self.process = None

    async def _read_metrics(self, read_fd: int) -> None:
        """Until the child closes its end (it exited)."""
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader()
        transport, _ = await loop.connect_read_pipe(
            lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(read_fd, "rb", 0)
        )
        try:
            while True:
                try:
                    size = int.from_bytes(await reader.readexactly(_HEADER_BYTES), "big")
                    if size > MAX_FRAME_BYTES:
                        log.error(f"{self.name} process sent a bad metrics frame; ignoring it")
                        await reader.read()  # drain until the child exits
                        return
                    data = await reader.readexactly(size)
                except asyncio.IncompleteReadError:
                    return
                try:
                    self.metrics.update(self.name, parse_snapshot(data))
                except ValueError as exc:
                    log.warning(f"{self.name} process sent unreadable metrics: {exc}")
        finally:
            transport.close()

    async def on_stop(self) -> None:
        process = self.process
        if process is None or process.returncode is not None:
            return
        process.terminate()
        try:
            await asyncio.wait_for(process.wait(), STOP_TIMEOUT_SECONDS)
        except TimeoutError:
            log.warning(
                f"{self.name} process did not stop within {STOP_TIMEOUT_SECONDS:g} s; killing it",
                extra={"pid": process.pid},
            )
            process.kill()
            await process.wait()


# ----------------------------------------------------------------------------- the child side


class DeadLetterProducer:
    """The child's way into the DLQ: an idempotent producer, started on the first dead letter
    (a child that never dead-letters never connects one)."""

    def __init__(self, settings: Settings, client_id: str) -> None:
        self.kafka = settings.kafka
        self.client_id = client_id
        self._producer: AIOKafkaProducer | None = None
        self._lock = asyncio.Lock()

    async def send(self, key: bytes | None, value: bytes) -> Awaitable[Any]:
        producer = await self._started()
        delivery: Awaitable[Any] = await producer.send(self.kafka.dlq_topic, value, key=key)
        return delivery

    async def _started(self) -> AIOKafkaProducer:
        async with self._lock:
            if self._producer is None:
                producer = clients.producer(
                    self.kafka, acks="all", enable_idempotence=True, client_id=self.client_id
                )
                try:
                    await clients.start(producer, self.kafka)
                except BaseException:
                    await producer.stop()
                    raise
                self._producer = producer
            return self._producer

    async def stop(self) -> None:
        if self._producer is not None:
            await self._producer.stop()
            self._producer = None


def _read_exactly(fd: int, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = os.read(fd, size - len(data))
        if not chunk:
            raise EOFError("the worker closed the pipe before the settings were read")
        data += chunk
    return data


def read_settings(fd: int) -> Settings:
    size = int.from_bytes(_read_exactly(fd, _HEADER_BYTES), "big")
    settings = pickle.loads(_read_exactly(fd, size))  # from our parent: trusted
    if not isinstance(settings, Settings):
        raise TypeError(f"expected Settings on stdin, got {type(settings).__name__}")
    return settings


def resolve(path: str) -> Factory:
    module, _, name = path.partition(":")
    factory: Factory = getattr(importlib.import_module(module), name)
    return factory


class _ParentWatch(asyncio.Protocol):
    """EOF on stdin: the worker is gone (stopped or killed)."""

    def __init__(self, gone: Callable[[], Any]) -> None:
        self.gone = gone

    def eof_received(self) -> bool:
        self.gone()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.gone()


async def serve(settings: Settings, factory: Factory, metrics_fd: int) -> int:
    """The child's life: run the service until SIGTERM/SIGINT or the worker's end; the exit
    status (0, or `EXIT_ACCESS_DENIED`)."""
    loop = asyncio.get_running_loop()
    main = asyncio.current_task()
    assert main is not None
    stopping = False

    def stop() -> None:  # once: a second cancel would cut the service's own stop short
        nonlocal stopping
        if not stopping:
            stopping = True
            main.cancel()

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop)
    await loop.connect_read_pipe(lambda: _ParentWatch(stop), os.fdopen(0, "rb", 0))
    metrics_out, _ = await loop.connect_write_pipe(asyncio.Protocol, os.fdopen(metrics_fd, "wb", 0))
    dlq = DeadLetterProducer(settings, f"{settings.worker.app_id}-{os.getpid()}-dlq")
    service = factory(settings, DeadLetters(dlq.send, settings.kafka.dlq_max_record_bytes))

    async def publish() -> None:
        while True:
            metrics_out.write(_frame(snapshot()))
            await asyncio.sleep(METRICS_INTERVAL_SECONDS)

    publisher = asyncio.create_task(publish())
    code = 0
    try:
        await supervise(service)
    except asyncio.CancelledError:
        pass  # asked to stop
    except clients.KafkaAccessError as exc:
        log.critical(f"{service.name} cannot access Kafka: {exc}", extra={"topic": service.topic})
        code = EXIT_ACCESS_DENIED
    finally:
        publisher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await publisher
        metrics_out.write(_frame(snapshot()))  # the final figures
        metrics_out.close()
        await dlq.stop()
    return code


def main(argv: list[str]) -> int:
    factory_path, metrics_fd = argv[0], int(argv[1])
    settings = read_settings(0)
    logging.config.dictConfig(logging_config(settings.log.level, settings.log.format))
    try:
        return asyncio.run(serve(settings, resolve(factory_path), metrics_fd))
    except (asyncio.CancelledError, KeyboardInterrupt):
        return 0  # stopped before the service ran


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
