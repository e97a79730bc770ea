"""The layer store: images pulled, committed and pushed, their layers unpacked once and shared.

:class:`Store` is the one object commands and tests use.  Its parts live in
modules of one responsibility each:

- :mod:`.records`: the store's directory (layout, lock, workspace, sweep of
  temporaries, crash safety), the image records, ``tag`` and ``rmi``;
- :mod:`.pull`: an OCI layout into the store, every blob checked first;
- :mod:`.push`: an image of the store out into an OCI layout;
- :mod:`.commit`: ``commit --tag``, an upper as a new layer and image;
- :mod:`.listing`: ``images`` and ``history`` tables.
"""

from __future__ import annotations

from .commit import commit
from .compression import Compression
from .ocilayout import Descriptor
from .pull import pull
from .push import push
from .records import Image, StoreRecords
from .references import Platform

__all__ = ["Store"]


class Store(StoreRecords):
    """A store directory (see :class:`.records.StoreRecords`) with the commands that fill and empty it."""

    def pull(self, arg: str, name: str | None = None, platform: Platform | None = None) -> Image:
        """Import the image LAYOUT[:TAG] (see :func:`.pull.pull`)."""
        return pull(self, arg, name, platform)

    def push(self, ref: str, arg: str, compress: Compression | None = None,
             convert: bool = False) -> tuple[Image, str, Descriptor]:
        """Write image *ref* into the OCI layout LAYOUT[:TAG] (see :func:`.push.push`)."""
        return push(self, ref, arg, compress, convert)

    def commit(self, upper: str, tag: str, base: str | None = None, message: str | None = None,
               userxattr: bool = False, lowers: list[str] | None = None,
               workdir: str | None = None,
               compress: Compression | None = None) -> tuple[Image, str | None, tuple[bytes, ...]]:
        """Store *upper* as a new layer on *base* and tag it *tag* (see :func:`.commit.commit`)."""
        return commit(self, upper, tag, base, message, userxattr, lowers, workdir, compress)
