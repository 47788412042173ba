"""The parent's synchronous HTTP reads (``httpread``): one request per attempt, each counted,
404 as missing and a 503 as transient, against moto behind the fault proxy and a server that
ignores Range."""

from __future__ import annotations

from pathlib import Path

import pytest

from oistream import sources
from oistream.errors import OistreamError
from oistream.sharding import httpread
from oistream.sharding.fetch import RetryPolicy
from oistream.testing.faultproxy import FaultProxy
from oistream.testing.hostileserver import HostileServer

CSV_KEY = "v5/validation-annotations-object-segmentation.csv"


def _http(url: str):
    return sources.filesystem(*sources.reading_location(url, {}))


def test_a_head_over_http_is_one_request_per_attempt_and_a_503_is_not_missing(
    s3, fake_bucket, monkeypatch
):
    """fsspec's HTTP ``info`` follows a failed HEAD with a GET and makes any failure
    FileNotFoundError; ``cache.head`` sends only HEADs, retries a 503, says a missing key is
    missing and a server that keeps failing is transient."""
    monkeypatch.setattr(httpread, "_RETRY", RetryPolicy(attempts=3, base_delay=0.001))
    size = (fake_bucket / "openimages" / CSV_KEY).stat().st_size
    with FaultProxy(s3.endpoint_url, fail_rate=1.0, max_faults_per_request=2) as proxy:
        url = f"{proxy.endpoint_url}/openimages/{CSV_KEY}"
        fs, path = _http(url)
        sent: list[bool] = []
        info = httpread.head(fs, path, sent.append)
        assert info["size"] == size and info["ETag"]
        assert sent == [False, True, True]
        assert proxy.stats.methods == {"HEAD": 3} and proxy.stats.faults == {"fail": 2}
        with pytest.raises(FileNotFoundError):
            httpread.head(fs, f"{proxy.endpoint_url}/openimages/v5/no-such-file.csv")
    with FaultProxy(s3.endpoint_url, fail_rate=1.0) as proxy:
        url = f"{proxy.endpoint_url}/openimages/{CSV_KEY}"
        fs, path = _http(url)
        with pytest.raises(OistreamError, match="HTTP 503, 3 times in a row"):
            httpread.head(fs, path)
        assert proxy.stats.methods == {"HEAD": 3}


def test_a_probe_reads_the_first_byte_and_the_size_from_content_range(s3, fake_bucket):
    size = (fake_bucket / "openimages" / CSV_KEY).stat().st_size
    with FaultProxy(
        s3.endpoint_url, reset_rate=0.5, truncate_rate=0.5, max_faults_per_request=1, keep_log=True
    ) as proxy:
        fs, path = _http(f"{proxy.endpoint_url}/openimages/{CSV_KEY}")
        sent: list[bool] = []
        info = httpread.probe(fs, path, sent.append)
        assert info["size"] == size and info["ETag"]
        # A one-byte body cut to nothing is noticed and asked again: the byte is read.
        assert proxy.stats.faults and sent == [False, True]
        assert [entry[2] for entry in proxy.stats.log] == ["bytes=0-0"] * 2
        with pytest.raises(FileNotFoundError):
            httpread.probe(*_http(f"{proxy.endpoint_url}/openimages/v5/no-such-file.csv"))


def test_a_probe_answered_with_the_whole_object_takes_its_length_and_drops_the_body(
    tmp_path: Path,
):
    data = b"x" * (32 << 20)  # past what loopback's socket buffers take in at once
    (tmp_path / "big.jpg").write_bytes(data)
    (tmp_path / "empty.jpg").write_bytes(b"")
    with HostileServer(tmp_path, misbehave={"/big.jpg": "ignore_range"}) as server:
        assert httpread.probe(*_http(f"{server.url}/big.jpg"))["size"] == len(data)
        assert httpread.probe(*_http(f"{server.url}/empty.jpg"))["size"] == 0
    # Counted once the server has stopped: its writes to the dropped connection have failed.
    assert 0 < server.stats.bytes_by_path["/big.jpg"] < len(data) // 4  # not read to its end
