"""The embedded archive store (a local directory) and the store selection."""

from __future__ import annotations

import os
from pathlib import Path

import duckdb
import pytest

from stockstream.archive import parquet
from stockstream.archive.object_store import (
    LocalDirectoryStore,
    S3Store,
    check_key,
    from_settings,
    split_endpoint,
)
from stockstream.archive.parquet import ArchiveRow
from stockstream.settings import ArchiveSettings, Secret, load_settings
from tests.unit.test_parquet import T0, quote


def test_put_get_list_and_overwrite(tmp_path: Path) -> None:
    store = LocalDirectoryStore(tmp_path / "archive")
    store.ensure_ready()
    assert store.get("t/date=2026-01-05/hour=14/part-0-1-2.parquet") is None
    store.put("t/date=2026-01-05/hour=14/part-0-1-2.parquet", b"one")
    store.put("t/date=2026-01-05/hour=15/part-0-3-3.parquet", b"two")
    store.put("_progress/t/partition-0.json", b"{}")
    assert store.get("t/date=2026-01-05/hour=14/part-0-1-2.parquet") == b"one"
    store.put("t/date=2026-01-05/hour=14/part-0-1-2.parquet", b"again")
    assert store.get("t/date=2026-01-05/hour=14/part-0-1-2.parquet") == b"again"
    assert store.list("t/") == [
        "t/date=2026-01-05/hour=14/part-0-1-2.parquet",
        "t/date=2026-01-05/hour=15/part-0-3-3.parquet",
    ]
    assert store.list("t/date=2026-01-05/hour=15/") == [
        "t/date=2026-01-05/hour=15/part-0-3-3.parquet"
    ]
    assert store.list("t/date=2026-01-05/hour=1") == store.list("t/")
    assert store.list("nothing/here/") == []
    assert len(store.list("")) == 3
    assert (tmp_path / "archive" / "t" / "date=2026-01-05" / "hour=14").is_dir()


def test_write_is_atomic_temp_then_rename(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = LocalDirectoryStore(tmp_path)
    key = "t/date=2026-01-05/hour=14/part-0-1-2.parquet"
    store.put(key, b"old")
    seen: list[tuple[str, bytes]] = []
    real_replace = os.replace

    def crash_on_rename(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
        # At rename time the full content is in a hidden temp file next to the target.
        seen.append((Path(src).name, Path(src).read_bytes()))
        raise OSError("simulated crash")

    monkeypatch.setattr(os, "replace", crash_on_rename)
    with pytest.raises(OSError, match="simulated crash"):
        store.put(key, b"new content")
    monkeypatch.setattr(os, "replace", real_replace)
    ((name, content),) = seen
    assert name.startswith(".part-0-1-2.parquet.") and name.endswith(".tmp")
    assert content == b"new content"
    # The reader still sees the complete old object, and no temp file is left or listed.
    assert store.get(key) == b"old"
    assert sorted(p.name for p in (tmp_path / key).parent.iterdir()) == ["part-0-1-2.parquet"]


def test_stray_temp_files_from_a_crash_are_invisible(tmp_path: Path) -> None:
    store = LocalDirectoryStore(tmp_path)
    store.put("t/date=2026-01-05/hour=14/part-0-1-2.parquet", b"x")
    (tmp_path / "t/date=2026-01-05/hour=14/.part-0-3-4.parquet.abc.tmp").write_bytes(b"torn")
    assert store.list("t/") == ["t/date=2026-01-05/hour=14/part-0-1-2.parquet"]


@pytest.mark.parametrize("key", ["", "/abs", "a/../b", "a//b", "a/./b", "a\\b", "a/b/"])
def test_keys_that_could_escape_or_alias_are_refused(tmp_path: Path, key: str) -> None:
    with pytest.raises(ValueError, match="invalid object key"):
        check_key(key)
    with pytest.raises(ValueError):
        LocalDirectoryStore(tmp_path).put(key, b"x")


def test_duckdb_reads_the_layout_with_hive_partitioning(tmp_path: Path) -> None:
    """The local layout is what query engines expect: DuckDB prunes on date/hour."""
    store = LocalDirectoryStore(tmp_path)
    rows = [
        ArchiveRow(p, offset, None, quote(ts=T0 + offset * 600_000))
        for p in (0, 1)
        for offset in range(12)  # two hours of event time per partition
    ]
    for p in (0, 1):
        for key, group in parquet.split_by_hour(
            "stock-quotes", [r for r in rows if r.partition == p]
        ):
            store.put(key, parquet.encode(group))
    glob = str(tmp_path / "stock-quotes" / "**" / "*.parquet")
    con = duckdb.connect()
    total, distinct, hours = con.execute(
        "select count(*), count(distinct (kafka_partition, kafka_offset)), count(distinct hour)"
        " from read_parquet(?, hive_partitioning = true)",
        [glob],
    ).fetchone()  # type: ignore[misc]
    assert (total, distinct, hours) == (24, 24, 3)
    mismatched = con.execute(
        "select count(*) from read_parquet(?, hive_partitioning = true)"
        " where hour != hour(market_timestamp at time zone 'UTC')"
        " or date != cast(market_timestamp at time zone 'UTC' as date)",
        [glob],
    ).fetchone()
    assert mismatched == (0,)
    one_hour = con.execute(
        "select count(*) from read_parquet(?, hive_partitioning = true) where hour = 15",
        [glob],
    ).fetchone()
    assert one_hour == (12,)


def test_from_settings_local_by_default_s3_when_an_endpoint_is_set(tmp_path: Path) -> None:
    settings = load_settings(environ={"ARCHIVE_LOCAL_DIR": str(tmp_path)}, dotenv_path=None)
    store = from_settings(settings.archive)
    assert isinstance(store, LocalDirectoryStore) and store.root == tmp_path
    s3 = from_settings(
        ArchiveSettings(
            endpoint="http://127.0.0.1:9000",
            access_key=Secret("AK"),
            secret_key=Secret("SK"),
            bucket="bronze",
        )
    )
    assert isinstance(s3, S3Store)
    assert s3.describe() == "http://127.0.0.1:9000/bronze"  # no credentials in it
    assert "SK" not in repr(vars(s3))


def test_s3_credentials_can_come_from_secret_files(tmp_path: Path) -> None:
    (tmp_path / "ak").write_text("from-file-ak\n")
    (tmp_path / "sk").write_text("from-file-sk\n")
    settings = load_settings(
        environ={
            "S3_ENDPOINT": "minio:9000",
            "S3_ACCESS_KEY_FILE": str(tmp_path / "ak"),
            "S3_SECRET_KEY_FILE": str(tmp_path / "sk"),
        },
        dotenv_path=None,
    )
    assert settings.archive.access_key.reveal() == "from-file-ak"
    store = from_settings(settings.archive)
    assert isinstance(store, S3Store) and store.secure  # S3_SECURE defaults to TLS


@pytest.mark.parametrize(
    ("endpoint", "secure", "expected"),
    [
        ("127.0.0.1:9000", False, ("127.0.0.1:9000", False)),
        ("minio:9000", True, ("minio:9000", True)),
        ("https://s3.example.com", False, ("s3.example.com", True)),
        ("http://127.0.0.1:8333/", True, ("127.0.0.1:8333", False)),
    ],
)
def test_endpoint_forms(endpoint: str, secure: bool, expected: tuple[str, bool]) -> None:
    assert split_endpoint(endpoint, secure) == expected


def test_endpoint_with_a_path_is_refused() -> None:
    with pytest.raises(ValueError, match="S3_ENDPOINT"):
        split_endpoint("http://host:9000/bucket", True)
