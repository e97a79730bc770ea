"""The owner rules of fuse-overlayfs's ID options (pyunionfs/fs/idmap.py), without FUSE."""

from __future__ import annotations

import pytest

from pyunionfs.errors import UsageError
from pyunionfs.fs.idmap import OVERFLOW_ID, IdMap
from pyunionfs.options import id_ranges


def test_ranges_map_both_ways_and_unmapped_ids_overflow() -> None:
    ids = IdMap(uids=id_ranges("1000:0:1:100000:1:65536"))
    assert [ids.shown_uid(u) for u in (1000, 100000, 100041, 165535, 0, 165536)] == [0, 1, 42, 65536, OVERFLOW_ID,
                                                                                     OVERFLOW_ID]
    assert [ids.stored_uid(u) for u in (0, 1, 42, 65536, 65537)] == [1000, 100000, 100041, 165535, OVERFLOW_ID]
    assert ids.shown_gid(1234) == 1234 and ids.stored_gid(1234) == 1234  # no gid ranges: as stored


def test_where_ranges_overlap_the_last_given_wins() -> None:
    ids = IdMap(uids=id_ranges("0:0:10:5:100:1"))
    assert ids.shown_uid(5) == 100 and ids.shown_uid(4) == 4
    assert ids.stored_uid(5) == 5 and ids.stored_uid(100) == 5


def test_squashing_changes_only_what_is_shown() -> None:
    ids = IdMap(uids=id_ranges("1000:0:1"), squash_uid=0, squash_gid=7)
    assert (ids.shown_uid(123), ids.shown_gid(456)) == (0, 7)
    assert ids.stored_uid(0) == 1000 and ids.stored_gid(7) == 7
    assert ids.squashes and not IdMap().squashes


@pytest.mark.parametrize("text", [":0:1000:2000", ":0:1000:2000:2000:5000:1", "0::1000:2000:", "0:1000:2000::"])
def test_empty_items_are_skipped_as_fuse_overlayfs_does(text: str) -> None:
    """containers/storage writes a colon before every triple (``uidmapping=:0:1000:2000``);
    fuse-overlayfs splits with strtok(), which skips empty items."""
    assert id_ranges(text)[0] == (0, 1000, 2000)


@pytest.mark.parametrize("text, says", [
    ("0:1000", "triples"), ("a:b:c", "triples"), ("0:0:1:2", "triples"), ("-1:0:1", "triples"),
    (":", "triples"), ("", "triples"), ("0:0:0", "count of at least 1"), ("4294967295:0:2", "below 2^32"),
])
def test_malformed_mappings_are_refused_in_one_line(text: str, says: str) -> None:
    with pytest.raises(UsageError) as err:
        id_ranges(text, "gidmapping")
    assert says in str(err.value) and "gidmapping" in str(err.value) and "\n" not in str(err.value)
