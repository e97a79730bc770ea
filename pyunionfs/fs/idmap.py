"""Owners shown through the mount other than as stored: fuse-overlayfs's ID options.

Rootless podman and buildah run fuse-overlayfs with ``uidmapping=`` and
``gidmapping=`` so that files stored under a user's subordinate IDs show up
as the container's IDs, or with ``squash_to_root`` / ``squash_to_uid=`` /
``squash_to_gid=`` so that everything shows one owner.  pyunionfs takes them
with fuse-overlayfs's meaning:

* a mapping is ``STORED:SHOWN:COUNT`` triples (the on-disk ID first); an ID
  outside every range shows as the kernel's overflow ID (65534), and a shown
  ID outside every range is stored as that ID too; where ranges overlap, the
  last one given wins;
* a squash option changes only what is shown: ownership changes and new
  files are stored through the mappings as without it, and a failing
  ``chown`` is not reported (every file shows the same owner anyway).

One object holds the rules, so every place that shows or stores an owner
(attributes, creation, chown, the kill-suid check) asks the same question.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..config import MountConfig

#: What an unmapped ID shows as (the kernel's default ``overflowuid``/``overflowgid``).
OVERFLOW_ID = 65534

Ranges = tuple[tuple[int, int, int], ...]


def _find(ranges: Ranges, ident: int, to_shown: bool) -> int:
    for stored, shown, count in reversed(ranges):
        start, other = (stored, shown) if to_shown else (shown, stored)
        if start <= ident < start + count:
            return other + ident - start
    return OVERFLOW_ID


@dataclass(frozen=True, slots=True)
class IdMap:
    """The owner rules of one mount."""

    uids: Ranges = ()
    gids: Ranges = ()
    squash_uid: int | None = None
    squash_gid: int | None = None

    @property
    def squashes(self) -> bool:
        return self.squash_uid is not None or self.squash_gid is not None

    def shown_uid(self, uid: int) -> int:
        if self.squash_uid is not None:
            return self.squash_uid
        return _find(self.uids, uid, True) if self.uids else uid

    def shown_gid(self, gid: int) -> int:
        if self.squash_gid is not None:
            return self.squash_gid
        return _find(self.gids, gid, True) if self.gids else gid

    def stored_uid(self, uid: int) -> int:
        return _find(self.uids, uid, False) if self.uids else uid

    def stored_gid(self, gid: int) -> int:
        return _find(self.gids, gid, False) if self.gids else gid


def id_map(cfg: MountConfig) -> IdMap | None:
    """The mount's rules; None where owners show as stored (the common case costs nothing)."""
    if not cfg.uid_ranges and not cfg.gid_ranges and cfg.squash_uid is None and cfg.squash_gid is None:
        return None
    return IdMap(cfg.uid_ranges, cfg.gid_ranges, cfg.squash_uid, cfg.squash_gid)
