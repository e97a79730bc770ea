"""Progress of long store commands (pull, push, commit --tag) on stderr.

Why two forms: on a terminal one line is rewritten in place several times
a second; in a log or a pipe (a build script, CI, ``contrib/build.py``)
rewritten lines are noise, but total silence for minutes looks like a hang
(a 1 GB layer takes a while to compress), so a plain line is written every
few seconds instead.  A command that ends before the first of those lines
prints nothing, so quick commands stay quiet in scripts.

A registry pull downloads several layers at once, from worker threads: the
counts are kept under a lock, and on a terminal the line also shows each
layer under way (``3f4e5d6c7b8a 42%``).
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable
from typing import IO

__all__ = ["CHUNK", "LOG_INTERVAL", "Progress", "copy_counted", "human"]

#: Seconds between two progress lines when stderr is not a terminal.
LOG_INTERVAL = 5.0
#: Bytes read at a time from a blob or layer stream: large enough to be cheap, small enough to report often.
CHUNK = 1024 * 1024


def human(size: float) -> str:
    """Decimal units, as docker prints sizes: 10.24kB."""
    units = ["B", "kB", "MB", "GB", "TB"]
    while size >= 1000 and len(units) > 1:
        size, units = size / 1000, units[1:]
    return f"{size:.4g}{units[0]}"


class Progress:
    """Bytes and layers done: a rewritten line on a terminal, else a line every *interval* seconds."""

    def __init__(self, what: str, layers: int, stream: IO[str] | None = None,
                 interval: float = LOG_INTERVAL) -> None:
        self.stream = stream if stream is not None else sys.stderr
        try:
            self.tty = self.stream.isatty()
        except ValueError:  # a closed stream
            self.tty = False
        self.interval = 0.2 if self.tty else interval
        self.what, self.layers = what, layers
        self.done_layers = 0
        self.bytes = 0
        self.lines = 0  # plain lines written
        self._last = time.monotonic()
        self._lock = threading.Lock()
        self._active: dict[str, list[int]] = {}  # layer shown -> [bytes done, size]

    def add(self, n: int, layer: str | None = None) -> None:
        with self._lock:
            self.bytes += n
            if layer is not None and layer in self._active:
                self._active[layer][0] += n
            self._show()

    def start_layer(self, layer: str, size: int) -> None:
        """A layer transfer began (shown on a terminal until :meth:`layer_done` names it)."""
        with self._lock:
            self._active[layer] = [0, size]

    def layer_done(self, layer: str | None = None) -> None:
        with self._lock:
            self.done_layers += 1
            self._active.pop(layer or "", None)
            self._show(force=self.tty)

    def _text(self) -> str:
        text = f"{self.what}: {self.done_layers}/{self.layers} layers, {human(self.bytes)}"
        if self.tty and self._active:
            text += "".join(f" | {name[:12]} {100 * done // max(size, 1)}%"
                            for name, (done, size) in list(self._active.items())[:4])
        return text

    def _show(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last < self.interval:
            return
        self._last = now
        if self.tty:
            self.stream.write(f"\r{self._text()}\x1b[K")
        else:
            self.stream.write(f"pyunionfs: {self._text()}\n")
            self.lines += 1
        self.stream.flush()

    def close(self) -> None:
        """Clear the terminal line; in a log, the final count if it said anything before."""
        self._active.clear()
        if self.tty:
            self.stream.write("\r\x1b[K")
        elif self.lines:
            self.stream.write(f"pyunionfs: {self._text()}\n")
        else:
            return
        self.stream.flush()


def copy_counted(src: IO[bytes], dst: IO[bytes], progress: Callable[[int], None] | None = None) -> None:
    """Copy *src* to *dst* in chunks, telling *progress* each chunk's size (``shutil.copyfileobj``
    cannot), so a long copy shows it is moving."""
    while chunk := src.read(CHUNK):
        dst.write(chunk)
        if progress is not None:
            progress(len(chunk))
