"""The standard library's reading of a zip's directory, as ``remotezip.ZipMember`` records: the
reference that the tests and the central-directory benchmark hold our walk against."""

from __future__ import annotations

import io
import zipfile
from collections.abc import Container

from oistream.sharding.remotezip import ZipMember


def zipfile_members(data: bytes, wanted: Container[str] | None = None) -> dict[str, ZipMember]:
    """Every member of the zip ``data`` (or only those named in ``wanted``) by name, as
    ``zipfile`` reads them."""
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        return {
            info.filename: ZipMember(
                info.filename,
                info.header_offset,
                info.compress_size,
                info.file_size,
                info.compress_type,
                info.CRC,
            )
            for info in archive.infolist()
            if wanted is None or info.filename in wanted
        }
