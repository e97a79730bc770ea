"""Second node ids (pyunionfs/fuse/nodeids.py) and the passthrough choice per open (openmodes.wanted)."""

from __future__ import annotations

import os
import stat

from pyunionfs.fuse.backing import CACHED, LOWER, LOWER_MIN, UPPER
from pyunionfs.fuse.nodeids import NodeIds
from pyunionfs.fuse.openmodes import wanted

REG = stat.S_IFREG | 0o644


def test_an_object_without_a_second_id_is_named_by_its_number() -> None:
    ids = NodeIds()
    assert ids.kernel(42) == 42
    assert ids.all_of(42) == [42]
    assert not ids.core


def test_renew_gives_one_new_id_per_pinned_inode() -> None:
    ids = NodeIds()
    ids.renew(42, 42)
    new = ids.kernel(42)
    assert new != 42 and ids.core == {new: 42}
    ids.renew(42, 42)  # a second open that failed on the same old inode
    assert ids.kernel(42) == new
    ids.renew(42, new)  # the new inode pinned in its turn
    newer = ids.kernel(42)
    assert newer not in (42, new)
    assert sorted(ids.all_of(42)) == sorted([42, new, newer])


def test_forgetting_drops_old_ids_and_keeps_the_current_one() -> None:
    ids = NodeIds()
    ids.renew(7, 7)
    first = ids.kernel(7)
    ids.answered(first)
    ids.answered(first)
    ids.renew(7, first)
    second = ids.kernel(7)
    ids.answered(second)
    ids.forgot(first, 1)
    assert first in ids.core
    ids.forgot(first, 1)
    assert first not in ids.core, "an id the kernel forgot is kept"
    assert ids.held() == 1
    ids.forgot(second, 1)
    assert ids.core == {second: 7}, "the id lookups answer went with the kernel's inode"
    assert ids.held() == 0
    ids.dropped(7)
    assert not ids.core and ids.kernel(7) == 7


def test_unknown_ids_are_ignored() -> None:
    ids = NodeIds()
    ids.answered(5)
    ids.forgot(5, 3)
    ids.dropped(5)
    assert not ids.core


def test_which_opens_go_passthrough() -> None:
    big = LOWER_MIN
    assert wanted(REG, True, False, 0, os.O_RDWR, False) == UPPER
    assert wanted(REG, True, False, 0, os.O_WRONLY | os.O_APPEND, True) == CACHED
    assert wanted(REG | stat.S_ISUID, True, False, 0, os.O_RDONLY, True) == CACHED
    assert wanted(REG, True, True, big, os.O_RDONLY, False) == CACHED  # a metadata-only copy: as lower files
    assert wanted(REG, True, True, big, os.O_RDONLY, True) == LOWER
    assert wanted(REG, False, False, big, os.O_RDONLY, False) == CACHED  # passthrough=on
    assert wanted(REG, False, False, big, os.O_RDONLY, True) == LOWER
    assert wanted(REG, False, False, big - 1, os.O_RDONLY, True) == CACHED
    assert wanted(REG, False, False, big, os.O_RDONLY | os.O_TRUNC, True) == CACHED
    assert wanted(stat.S_IFDIR | 0o755, True, False, 0, os.O_RDONLY, True) == CACHED
