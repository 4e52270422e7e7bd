"""The worker's metrics as one page, including those of the processes it runs its services in.

A service the worker runs as a child process (service_process.py: the raw archive by
default) counts in its own process, on its own copy of `metrics.REGISTRY`. The child sends a
snapshot of its non-zero samples about once a second (`snapshot`); `WORKER_METRICS` adds the
latest one of each child to the worker's own values, so `/metrics/`, the health checks and the
alert rules see one worker, whichever process did the work.

Why not prometheus_client's multiprocess mode: every `inc()` would then write a memory-mapped
file under a lock, on the aggregation's hot path too, and gauges would need a mode each.

Merging rules: samples of the same name and labels are added (counters, histogram buckets, sums
and counts add across processes; a gauge is set by one process only, the others report 0 and
send nothing); a counter's `_created` timestamp is the worker's own. A child's snapshot replaces
its previous one, so a gauge it resets to 0 drops out of the sum. When a child exits, its
counters stay in the sum (`retire`): the worker's counters never go down because a child
restarted.
"""

from __future__ import annotations

from collections.abc import Collection, Iterator, Mapping
from typing import Any

import orjson
from prometheus_client import CollectorRegistry
from prometheus_client.metrics_core import Metric

from stockstream.metrics import REGISTRY

#: (sample name, sorted label pairs) -> value
SampleKey = tuple[str, tuple[tuple[str, str], ...]]
Families = dict[str, dict[SampleKey, float]]


def _key(name: str, labels: Mapping[str, str]) -> SampleKey:
    return name, tuple(sorted(labels.items()))


def snapshot(registry: CollectorRegistry = REGISTRY) -> bytes:
    """The registry's non-zero samples (timestamps of `_created` excluded), as JSON:
    `{family: [[sample, {labels}, value], ...]}`."""
    body: dict[str, list[list[Any]]] = {}
    for family in registry.collect():
        samples = [
            [s.name, s.labels, s.value]
            for s in family.samples
            if s.value and not s.name.endswith("_created")
        ]
        if samples:
            body[family.name] = samples
    return orjson.dumps(body)


def parse_snapshot(data: bytes) -> Families:
    """A `snapshot` read back; raises ValueError when it is not one."""
    body = orjson.loads(data)
    if not isinstance(body, dict):
        raise ValueError("a metrics snapshot is a JSON object")
    families: Families = {}
    for name, samples in body.items():
        values = families[name] = {}
        for sample, labels, value in samples:
            if not isinstance(labels, dict) or not isinstance(value, int | float):
                raise ValueError(f"bad sample in metrics snapshot: {sample!r}")
            values[_key(str(sample), labels)] = float(value)
    return families


class MergedRegistry:
    """`own`'s metrics plus the latest snapshot of each child (module doc). It has what
    `generate_latest` and the health checks use of a registry: `collect`, `get_sample_value`."""

    def __init__(self, own: CollectorRegistry) -> None:
        self.own = own
        self._children: dict[str, Families] = {}
        self._retired: Families = {}

    def update(self, child: str, families: Families) -> None:
        self._children[child] = families

    def retire(self, child: str) -> None:
        """The child exited: its counters and histograms stay in the sum (a restarted child
        counts from 0 again, and the worker's counters must not go down), its gauges go."""
        families = self._children.pop(child, None)
        if families:
            gauges = {family.name for family in self.own.collect() if family.type == "gauge"}
            _add(self._retired, families, skip=gauges)

    def _sources(self) -> tuple[Families, ...]:
        """What is added to `own`: each live child's latest snapshot, and the retired sum."""
        return (*self._children.values(), self._retired)

    def _extra(self) -> Families:
        extra: Families = {}
        for families in self._sources():
            _add(extra, families)
        return extra

    def collect(self) -> Iterator[Metric]:
        extra = self._extra()
        for family in self.own.collect():
            adds = extra.get(family.name)
            if not adds:
                yield family
                continue
            merged = Metric(family.name, family.documentation, family.type, family.unit)
            seen = set()
            for sample in family.samples:
                key = _key(sample.name, sample.labels)
                seen.add(key)
                add = 0.0 if sample.name.endswith("_created") else adds.get(key, 0.0)
                merged.samples.append(sample._replace(value=sample.value + add))
            for (name, labels), value in adds.items():
                if (name, labels) not in seen:
                    merged.add_sample(name, dict(labels), value)
            yield merged

    def get_sample_value(self, name: str, labels: Mapping[str, str] | None = None) -> float | None:
        own = self.own.get_sample_value(name, dict(labels or {}))
        if name.endswith("_created"):
            return own
        key = _key(name, labels or {})
        # Looked up in each source as it is: merging them all is `collect`'s work.
        adds = [
            values[key]
            for families in self._sources()
            for values in families.values()
            if key in values
        ]
        if not adds:
            return own
        return (own or 0.0) + sum(adds)


def _add(into: Families, families: Families, skip: Collection[str] = ()) -> None:
    """Add `families`' samples to `into`'s, sample by sample (families named in `skip` not)."""
    for name, values in families.items():
        if name in skip:
            continue
        sums = into.setdefault(name, {})
        for key, value in values.items():
            sums[key] = sums.get(key, 0.0) + value


#: What the worker serves at /metrics/ and its health checks read.
WORKER_METRICS = MergedRegistry(REGISTRY)
