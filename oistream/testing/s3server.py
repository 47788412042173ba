"""A local S3 endpoint on loopback (moto's server) that serves a folder as buckets.

Used by the tests and by ``oistream fake-bucket DIR --serve``: each top-level folder of DIR
becomes a bucket of that name, so a fake bucket made by ``oistream.testing.fakebucket`` is served as
``s3://open-images-dataset`` and ``s3://openimages``, the layout of the real public sources.

Anonymous access: moto lists a bucket for unsigned requests but answers 403 to an unsigned
GetObject unless the bucket allows it. The real ``open-images-dataset`` bucket is public through
its bucket policy, so the served buckets get one too: anonymous read for uploaded trees,
anonymous read and write for scratch buckets made with ``make_bucket``. (moto enforces the
policy on reads and on overwriting an existing object, but lets anonymous clients create new
keys anywhere: do not rely on it to refuse writes.) With that, the ``anon=True`` of
``oistream.sources.storage_options`` works unchanged against this endpoint.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import boto3
from botocore.config import Config
from moto.server import ThreadedMotoServer

from oistream import sources
from oistream.errors import OistreamError

# Credentials for the harness's own client only: moto accepts any, and these are not real.
_FAKE_KEY = "testing"
_REGION = "us-east-1"
_UPLOAD_THREADS = 16

# moto checks HEAD requests against "s3:HeadObject" (S3 itself uses s3:GetObject for them).
_READ_ACTIONS = ["s3:GetObject", "s3:HeadObject", "s3:ListBucket"]
_ALL_ACTIONS = ["s3:*"]


def _public_policy(bucket: str, actions: list[str]) -> str:
    return json.dumps(
        {
            "Version": "2012-10-17",
            "Statement": [
                {
                    "Sid": "Public",
                    "Effect": "Allow",
                    "Principal": "*",
                    "Action": actions,
                    "Resource": [f"arn:aws:s3:::{bucket}", f"arn:aws:s3:::{bucket}/*"],
                }
            ],
        }
    )


def _port_is_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        try:
            probe.bind((host, port))
        except OSError:
            return False
    return True


class LocalS3:
    """moto's S3 server on ``host`` (loopback) and a free port, as a context manager.

    ``images_url`` and ``metadata_url`` name the buckets a fake bucket tree is served as.
    """

    images_url = "s3://open-images-dataset"
    metadata_url = "s3://openimages"

    def __init__(self, port: int = 0, host: str = "127.0.0.1", *, quiet: bool = True) -> None:
        self.host = host
        self.port = port
        self.quiet = quiet
        self.endpoint_url = ""
        self._server: ThreadedMotoServer | None = None
        self._client: Any = None
        self._scratch_count = 0
        self._lock = threading.Lock()
        self._werkzeug_level: int | None = None

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> LocalS3:
        if self._server is not None:
            return self
        # ThreadedMotoServer binds inside its thread and would wait forever if that failed:
        # check the port here so a busy one is one clear error instead of a hang.
        if self.port and not _port_is_free(self.host, self.port):
            raise OistreamError(f"port {self.port} on {self.host} is in use; choose another port")
        if self.quiet:
            # moto's request handler logs every request through werkzeug's logger.
            logger = logging.getLogger("werkzeug")
            self._werkzeug_level = logger.level
            logger.setLevel(logging.WARNING)
        server = ThreadedMotoServer(ip_address=self.host, port=self.port, verbose=False)
        server.start()
        self._server = server
        host, port = server.get_host_and_port()
        self.port = port
        self.endpoint_url = f"http://{host}:{port}"
        return self

    def stop(self) -> None:
        if self._server is None:
            return
        self._server.stop()
        self._server = None
        self._client = None
        if self._werkzeug_level is not None:
            logging.getLogger("werkzeug").setLevel(self._werkzeug_level)
            self._werkzeug_level = None

    def __enter__(self) -> LocalS3:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- access ------------------------------------------------------------------------------

    @property
    def client(self) -> Any:
        """A boto3 S3 client on this endpoint (signed with fake keys, never real ones)."""
        if not self.endpoint_url:
            raise RuntimeError("LocalS3 is not started")
        if self._client is None:
            self._client = boto3.session.Session().client(
                "s3",
                endpoint_url=self.endpoint_url,
                aws_access_key_id=_FAKE_KEY,
                aws_secret_access_key=_FAKE_KEY,
                region_name=_REGION,
                config=Config(max_pool_connections=_UPLOAD_THREADS * 2),
            )
        return self._client

    def storage_options(self) -> dict[str, Any]:
        """fsspec/s3fs options that reach this endpoint anonymously, as a user's run would."""
        options = sources.storage_options("s3://", self.endpoint_url)
        options["anon"] = True  # also when the caller's environment holds credentials
        return options

    def env(self) -> dict[str, str]:
        """Environment variables that point oistream (and botocore) at this endpoint."""
        return {"FSSPEC_S3_ENDPOINT_URL": self.endpoint_url, "AWS_ENDPOINT_URL": self.endpoint_url}

    # -- content -----------------------------------------------------------------------------

    def make_bucket(self, name: str | None = None, *, public_write: bool = True) -> str:
        """Create a bucket (a fresh ``scratch-N`` one when no name is given); return its URL.

        ``public_write`` lets anonymous clients write and delete, for tests that write shards.
        """
        if name is None:
            with self._lock:
                self._scratch_count += 1
                name = f"scratch-{self._scratch_count}"
        self.client.create_bucket(Bucket=name)
        actions = _ALL_ACTIONS if public_write else _READ_ACTIONS
        self.client.put_bucket_policy(Bucket=name, Policy=_public_policy(name, actions))
        return f"s3://{name}"

    def upload_tree(self, root: str | os.PathLike) -> None:
        """Serve each top-level folder of ``root`` as a read-only public bucket of that name."""
        root = Path(root)
        jobs: list[tuple[str, str, Path]] = []
        for bucket_dir in sorted(p for p in root.iterdir() if p.is_dir()):
            self.make_bucket(bucket_dir.name, public_write=False)
            for dirpath, _, filenames in os.walk(bucket_dir):
                for filename in filenames:
                    path = Path(dirpath, filename)
                    jobs.append((bucket_dir.name, path.relative_to(bucket_dir).as_posix(), path))
        client = self.client

        def put(job: tuple[str, str, Path]) -> None:
            bucket, key, path = job
            client.put_object(Bucket=bucket, Key=key, Body=path.read_bytes())

        with ThreadPoolExecutor(_UPLOAD_THREADS) as pool:
            # list() so that the first failed upload raises here.
            list(pool.map(put, jobs))


def serve(root: str | os.PathLike, host: str = "127.0.0.1", port: int = 5000) -> None:
    """Serve ``root`` (a fake bucket) on a local S3 endpoint until Ctrl-C.

    Prints the endpoint and the environment and flags that point oistream at it.
    """
    root = Path(root)
    if not root.is_dir() or not any(p.is_dir() for p in root.iterdir()):
        raise OistreamError(f"{root}: no bucket folders to serve (make one with fake-bucket)")
    with LocalS3(port=port, host=host) as s3:
        s3.upload_tree(root)
        buckets = sorted(p.name for p in root.iterdir() if p.is_dir())
        shards = s3.make_bucket("oistream-shards")
        endpoint = s3.endpoint_url
        print(f"Serving {root} at {endpoint} as buckets: {', '.join(buckets)}")
        print(f"Writable bucket for output: {shards}")
        print("Point oistream at it (anonymous access, no credentials needed):")
        for name, value in s3.env().items():
            print(f"  export {name}={value}")
        print(f"  oistream classes --metadata {s3.metadata_url}")
        print(
            f"  oistream shard --classes Person Car --split validation --images {s3.images_url}"
            f" --metadata {s3.metadata_url} --out {shards}/validation"
        )
        print(
            f"or pass --endpoint-url {endpoint} instead of the exports. Ctrl-C stops.", flush=True
        )
        try:
            threading.Event().wait()
        except KeyboardInterrupt:
            print("Stopped.")
