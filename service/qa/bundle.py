"""Manifests as buyers send them: YAML text, or a base64 tar.gz of a directory / Helm-rendered output."""
from __future__ import annotations

import base64
import binascii
import io
import tarfile

from ..errors import BadRequest, PayloadTooLarge

__all__ = ["from_archive"]


def from_archive(b64: str, *, max_bytes: int) -> str:
    """The .yaml/.yml regular files of the archive, in path order, joined as one multi-document YAML."""
    try:
        raw = base64.b64decode(b64, validate=True)
    except (binascii.Error, ValueError):
        raise BadRequest("invalid_archive", "archive must be base64 of a .tar.gz") from None
    chunks, total = [], 0
    try:
        with tarfile.open(fileobj=io.BytesIO(raw), mode="r:gz") as tar:
            members = sorted((m for m in tar.getmembers() if m.isfile() and m.name.endswith((".yaml", ".yml"))),
                             key=lambda m: m.name)
            for m in members:
                total += m.size
                if total > max_bytes:
                    raise PayloadTooLarge("payload_too_large", f"the archive's manifests exceed {max_bytes} bytes")
                data = tar.extractfile(m)
                chunks.append(data.read().decode("utf-8", errors="strict").strip("\n") if data else "")
    except (tarfile.TarError, OSError, EOFError):
        raise BadRequest("invalid_archive", "archive is not a readable .tar.gz") from None
    except UnicodeDecodeError:
        raise BadRequest("invalid_encoding", "manifests in the archive must be UTF-8") from None
    if not chunks:
        raise BadRequest("no_documents", "the archive holds no .yaml or .yml file")
    return "\n---\n".join(chunks) + "\n"
