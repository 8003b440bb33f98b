"""Manifests as buyers send them: YAML text, or a base64 tar.gz of a directory / Helm-rendered output.

An archive arrives before payment (its document count sets the price), so unpacking it is bounded in
work, not only in output: the gzip stream is inflated chunk by chunk and abandoned as soon as it passes
`max_unpacked` bytes or `max_ratio` times the archive's size (past a small floor), and the tar is read as
a stream, abandoned past `max_members` members. Callers run it off the event loop (`from_archive_async`).
"""
from __future__ import annotations

import asyncio
import base64
import binascii
import gzip
import io
import tarfile
import zlib
from dataclasses import dataclass

from ..errors import BadRequest, PayloadTooLarge

__all__ = ["ArchiveLimits", "from_archive", "from_archive_async"]

_CHUNK = 64 * 1024


@dataclass(frozen=True)
class ArchiveLimits:
    """What one archive may cost to unpack: the .yaml bytes kept, the whole tar stream inflated,
    its members, and the inflation ratio once past `ratio_floor` bytes."""

    max_bytes: int = 1024 * 1024
    max_unpacked: int = 4 * 1024 * 1024
    max_members: int = 1000
    max_ratio: int = 100
    ratio_floor: int = 1024 * 1024


class _Inflated(io.RawIOBase):
    """The gzip stream's inflated bytes, read lazily; raises PayloadTooLarge once past the limits."""

    def __init__(self, raw: bytes, limits: ArchiveLimits) -> None:
        self._gz = gzip.GzipFile(fileobj=io.BytesIO(raw), mode="rb")
        self._cap = min(limits.max_unpacked, max(limits.ratio_floor, limits.max_ratio * len(raw)))
        self._limits, self._total = limits, 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        data = self._gz.read(min(len(buffer), _CHUNK))
        self._total += len(data)
        if self._total > self._cap:
            raise PayloadTooLarge("archive_too_large",
                                  f"the archive unpacks to more than {self._cap} bytes (at most "
                                  f"{self._limits.max_unpacked}, and {self._limits.max_ratio}x its own size)")
        buffer[:len(data)] = data
        return len(data)


def from_archive(b64: str, *, max_bytes: int, limits: ArchiveLimits | None = None) -> str:
    """The .yaml/.yml regular files of the archive, in path order, joined as one multi-document YAML."""
    limits = limits or ArchiveLimits(max_bytes=max_bytes, max_unpacked=max(4 * max_bytes, 1024 * 1024))
    try:
        raw = base64.b64decode(b64, validate=True)
    except (binascii.Error, ValueError):
        raise BadRequest("invalid_archive", "archive must be base64 of a .tar.gz") from None
    files: list[tuple[str, str]] = []
    total = members = 0
    try:
        with tarfile.open(fileobj=io.BufferedReader(_Inflated(raw, limits), _CHUNK), mode="r|") as tar:
            for m in tar:
                members += 1
                if members > limits.max_members:
                    raise PayloadTooLarge("archive_too_large", f"the archive has more than {limits.max_members} "
                                                               "members")
                if not (m.isfile() and m.name.endswith((".yaml", ".yml"))):
                    continue
                total += m.size
                if total > limits.max_bytes:
                    raise PayloadTooLarge("payload_too_large",
                                          f"the archive's manifests exceed {limits.max_bytes} bytes")
                data = tar.extractfile(m)
                files.append((m.name, data.read().decode("utf-8", errors="strict").strip("\n") if data else ""))
    except (tarfile.TarError, OSError, EOFError, zlib.error):
        raise BadRequest("invalid_archive", "archive is not a readable .tar.gz") from None
    except UnicodeDecodeError:
        raise BadRequest("invalid_encoding", "manifests in the archive must be UTF-8") from None
    if not files:
        raise BadRequest("no_documents", "the archive holds no .yaml or .yml file")
    return "\n---\n".join(text for _, text in sorted(files)) + "\n"


async def from_archive_async(b64: str, *, max_bytes: int) -> str:
    """`from_archive` in the default executor: unpacking never runs on the event loop."""
    return await asyncio.get_running_loop().run_in_executor(None, lambda: from_archive(b64, max_bytes=max_bytes))
