"""sha256 digests of bytes on their way somewhere else: one pass for the data and its digest.

Layers, blobs and their gzip forms are identified by digest (OCI), and are
large: hashing them while they are written or read avoids a second pass.
"""

from __future__ import annotations

import hashlib
from typing import IO


class Hasher:
    """Counts and hashes bytes (digest and size in one pass)."""

    def __init__(self) -> None:
        self.sha = hashlib.sha256()
        self.size = 0

    def update(self, data: bytes) -> None:
        self.sha.update(data)
        self.size += len(data)

    @property
    def digest(self) -> str:
        return "sha256:" + self.sha.hexdigest()


class HashWriter:
    """A write-only file object that passes bytes to *out* and hashes them into *hasher*."""

    def __init__(self, out: IO[bytes], hasher: Hasher) -> None:
        self.out, self.hasher = out, hasher

    def write(self, data: bytes) -> int:
        self.hasher.update(data)
        self.out.write(data)
        return len(data)

    def tell(self) -> int:
        return self.hasher.size

    def flush(self) -> None:
        self.out.flush()
