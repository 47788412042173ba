"""Shared fixtures: a synthetic Open Images bucket, served by a local S3 endpoint.

- ``fake_bucket``: pathlib.Path of a fake bucket root (24 train images, 8 validation, 8 test,
  long side 160 px, seed 0), built once per session. ``fake_bucket_summary``: the dict that
  ``make_fake_bucket`` returned for it (counts per split and class).
- ``s3``: a started ``oistream.testing.s3server.LocalS3`` holding ``fake_bucket`` as the buckets
  ``open-images-dataset`` and ``openimages``: ``s3.endpoint_url``, ``s3.images_url``,
  ``s3.metadata_url``, ``s3.storage_options()``, ``s3.env()``, ``s3.make_bucket(name=None)``
  (a fresh bucket anonymous clients may write), ``s3.client`` (boto3).
- ``moto_endpoint``: the URL of a bare moto S3 server, for tests that make their own objects.
- ``s3_env``: ``s3`` with its ``env()`` applied to ``os.environ`` for one test.

``XDG_CACHE_HOME`` points at a session folder, so the metadata cache never touches ~/.cache;
a test that counts what the cache saves passes its own ``--cache``/``cache=`` folder.

The server runs in this process and keeps its buckets in moto's process-wide backends: do not
use ``moto.mock_aws`` in the same session (starting it resets those backends, emptying ``s3``);
use ``s3.make_bucket()`` for a bucket of your own.

No test reaches real AWS: for the whole session the environment has no credentials, no
endpoint, no profile and no instance-metadata lookups, and it is restored afterwards.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import fsspec.config
import pytest

from oistream.testing.fakebucket import make_fake_bucket
from oistream.testing.s3server import LocalS3

FAKE_BUCKET_ARGS = {"images": 24, "seed": 0, "image_size": 160}

_AWS_VARIABLES_TO_CLEAR = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_SECURITY_TOKEN",
    "AWS_PROFILE",
    "AWS_DEFAULT_PROFILE",
    "AWS_WEB_IDENTITY_TOKEN_FILE",
    "AWS_ROLE_ARN",
    "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
    "AWS_CONTAINER_CREDENTIALS_FULL_URI",
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "FSSPEC_S3_ENDPOINT_URL",
)


@pytest.fixture(scope="session", autouse=True)
def _offline_aws_environment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """A credential-free, endpoint-free AWS environment for the session, then the old one."""
    nowhere = tmp_path_factory.mktemp("no-aws")
    with pytest.MonkeyPatch.context() as mp:
        for name in _AWS_VARIABLES_TO_CLEAR:
            mp.delenv(name, raising=False)
        # Point the shared files at paths that do not exist, so ~/.aws is never read.
        mp.setenv("AWS_SHARED_CREDENTIALS_FILE", str(nowhere / "credentials"))
        mp.setenv("AWS_CONFIG_FILE", str(nowhere / "config"))
        mp.setenv("AWS_EC2_METADATA_DISABLED", "true")
        mp.setenv("AWS_DEFAULT_REGION", "us-east-1")
        # fsspec read FSSPEC_S3_* variables into its config when it was imported.
        mp.delitem(fsspec.config.conf, "s3", raising=False)
        yield


@pytest.fixture(scope="session", autouse=True)
def _private_cache_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """The metadata cache (default ``$XDG_CACHE_HOME/oistream``) of every test lives in a
    session folder, never in the real ~/.cache; the two root variables start unset."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("xdg-cache")))
        mp.delenv("OISTREAM_IMAGES", raising=False)
        mp.delenv("OISTREAM_METADATA", raising=False)
        yield


@pytest.fixture(scope="session")
def _fake_bucket_build(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("fake-bucket")
    summary = make_fake_bucket(root, **FAKE_BUCKET_ARGS)
    return root, summary


@pytest.fixture(scope="session")
def fake_bucket(_fake_bucket_build: tuple[Path, dict]) -> Path:
    return _fake_bucket_build[0]


@pytest.fixture(scope="session")
def fake_bucket_summary(_fake_bucket_build: tuple[Path, dict]) -> dict:
    return _fake_bucket_build[1]


@pytest.fixture(scope="session")
def s3(fake_bucket: Path, _offline_aws_environment: None) -> Iterator[LocalS3]:
    with LocalS3() as server:
        server.upload_tree(fake_bucket)
        yield server


@pytest.fixture(scope="session")
def moto_endpoint(_offline_aws_environment: None) -> Iterator[str]:
    """A bare moto S3 endpoint (no fake bucket) for tests that make their own objects."""
    with LocalS3() as server:
        yield server.endpoint_url


@pytest.fixture
def s3_env(s3: LocalS3, monkeypatch: pytest.MonkeyPatch) -> LocalS3:
    for name, value in s3.env().items():
        monkeypatch.setenv(name, value)
    return s3


@pytest.fixture
def restore_determinism() -> Iterator[None]:
    """``--deterministic`` switches torch globally; leave the process as the test found it."""
    import torch

    before = torch.are_deterministic_algorithms_enabled()
    yield
    torch.use_deterministic_algorithms(before)
