"""Faust's Kafka transport with an idempotent producer, for the worker.

faust-streaming 0.15 enables producer idempotence only inside transactions. With at-least-once
processing its producer is therefore not idempotent: when an acknowledgement is lost, aiokafka
sends the batch again and the broker writes it twice -- a window or a dead letter duplicated
without any crash. The subclass below asks for `enable_idempotence` (and `acks=all`, which it
requires) always, so the broker drops the repeated batch. Everything else is Faust's.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from faust.transport.drivers import aiokafka as faust_aiokafka


class IdempotentProducer(faust_aiokafka.Producer):
    def _settings_extra(self) -> Mapping[str, Any]:
        return {**super()._settings_extra(), "acks": "all", "enable_idempotence": True}


class Transport(faust_aiokafka.Transport):
    Producer = IdempotentProducer
