"""Sinks: where records leave Kafka for long-term storage.

- `object_store.py`: the storage interface, `LocalDirectoryStore` (embedded default) and
  `S3Store` (S3/MinIO/SeaweedFS through `minio`), `from_settings(ArchiveSettings)`.
- `parquet.py`: quote rows -> Parquet (zstd) with an explicit schema, and the archive's
  Hive-style object layout.

The raw archive that uses them (the bronze layer) is `stockstream/agents/archive.py`; the DLQ
re-drive is `stockstream/dlq_replay.py`.
"""

from stockstream.sinks.object_store import (
    LocalDirectoryStore,
    ObjectStore,
    S3Store,
    from_settings,
)

__all__ = ["LocalDirectoryStore", "ObjectStore", "S3Store", "from_settings"]
