"""The store's listings: ``pyunionfs images`` and ``pyunionfs history``, as docker prints them.

Only formatting: they read the records under the shared lock (a listing
never meets an image half removed) and lay them out as tables.
"""

from __future__ import annotations

from typing import Any

from .ocilayout import digest_hex
from .progress import human
from .records import StoreRecords

__all__ = ["CREATED_BY_WIDTH", "format_history", "format_images"]


def _table(rows: list[tuple[str, ...]]) -> str:
    """Columns as wide as their widest cell, three spaces apart, as docker's tables are."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("   ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows)


def format_images(store: StoreRecords) -> str:
    """``docker images`` with sharing made visible.

    SIZE is the sum of the image's layers; SHARED SIZE the part of it in
    layers another image uses too (stored once); the last line says what
    the store holds on disk, each layer counted once.
    """
    with store.locked(shared=True):
        images = store.images()
        users: dict[str, set[str]] = {}  # layer -> the images (by ID: two tags are one image) using it
        for img in images:
            for d in img.diff_ids:
                users.setdefault(d, set()).add(img.config_digest)
        sizes = {d: int(store.layer_meta(d).get("size", 0)) for d in users}
    rows: list[tuple[str, ...]] = [("REPOSITORY:TAG", "IMAGE ID", "LAYERS", "SIZE", "SHARED SIZE")]
    for img in images:
        ids = list(dict.fromkeys(img.diff_ids))
        total = sum(sizes[d] for d in ids)
        shared = sum(sizes[d] for d in ids if len(users[d]) > 1)
        rows.append((img.name, img.id, str(len(img.diff_ids)), human(total), human(shared)))
    footer = f"{len(images)} images, {len(users)} layers, {human(sum(sizes.values()))} of layers stored"
    return _table(rows) + "\n" + footer


def _date(created: Any) -> str:
    """``2024-01-02T03:04:05Z`` as ``2024-01-02 03:04:05 UTC`` (the CREATED column); not a string: empty."""
    if not isinstance(created, str) or not created:
        return ""
    return created.replace("T", " ")[:19] + (" UTC" if len(created) >= 19 else "")


#: ``docker history`` cuts CREATED BY to this many characters, the last one an ellipsis.
CREATED_BY_WIDTH = 45


def _created_by(entry: dict[str, Any], trunc: bool) -> str:
    """One table cell: tabs and newlines as spaces; cut as docker does unless *trunc* is off."""
    text = " ".join(str(entry.get("created_by", "")).replace("\t", " ").splitlines())
    if trunc and len(text) > CREATED_BY_WIDTH:
        return text[: CREATED_BY_WIDTH - 1] + "\u2026"
    return text


def format_history(store: StoreRecords, ref: str, trunc: bool = True) -> str:
    """``docker history``: newest first; a row per history entry, an empty layer shown as 0B.

    CREATED BY is cut to 45 characters (the last an ellipsis) as docker
    does, so a long RUN line cannot stretch every row; *trunc* False
    (``--no-trunc``) shows it whole.  A config without history (or with
    fewer entries than layers) still gets one row per layer, with the
    columns it cannot know left empty.
    """
    with store.locked(shared=True):
        img = store.image(ref)
        sizes = {d: int(store.layer_meta(d).get("size", 0)) for d in img.diff_ids}
    diff_ids = img.diff_ids
    history = [h for h in img.config.get("history") or [] if isinstance(h, dict)]
    rows: list[tuple[str, ...]] = []
    layer = 0
    for h in history:
        if h.get("empty_layer"):
            rows.append(("<missing>", _date(h.get("created")), _created_by(h, trunc), "0B",
                         str(h.get("comment", ""))))
            continue
        if layer < len(diff_ids):
            d = diff_ids[layer]
            rows.append((digest_hex(d)[:12], _date(h.get("created")), _created_by(h, trunc),
                         human(sizes[d]), str(h.get("comment", ""))))
        layer += 1
    for d in diff_ids[layer:]:
        rows.append((digest_hex(d)[:12], "", "", human(sizes[d]), ""))
    header: tuple[str, ...] = ("LAYER", "CREATED", "CREATED BY", "SIZE", "COMMENT")
    return _table([header, *rows[::-1]])
