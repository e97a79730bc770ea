"""Lookups through many layers answered from the lower directories' names (fs/presence.py).

The union rules must come out exactly as when every layer is asked (whiteouts of every form,
opaque directories, merged directories, the upper), while the layers that lack a name are no
longer asked: the count of lstat calls per lookup stays flat in the number of layers.
"""

from __future__ import annotations

import errno

import pytest

from pyunionfs.fs import presence
from pyunionfs.fs.layers import LayerStack
from pyunionfs.fs.presence import LayerNames, candidates

from .conftest import errno_of, listdir, lookup_path, mkdir, mkfile, mkwhiteout, mkxwhiteout, read_path, set_opaque

N = 12


@pytest.fixture
def lowers(layer):
    """N lower layers l00 (top) .. l11 (bottom), each with d/ and a file of its own in it."""
    out = [layer(f"l{i:02d}") for i in range(N)]
    for i, lower in enumerate(out):
        mkfile(lower / "d" / f"own{i:02d}", b"%d" % i)
    return out


@pytest.fixture
def lstat_calls(monkeypatch):
    """How many times the layers are asked for a name (LayerStack.lstat), counted as they happen."""
    calls: list[tuple[int, bytes, bytes]] = []
    real = LayerStack.lstat

    def counting(self, layer, rel, name):
        calls.append((layer, rel, name))
        return real(self, layer, rel, name)

    monkeypatch.setattr(LayerStack, "lstat", counting)
    return calls


def test_a_bottom_name_is_found_without_asking_every_layer(lowers, make_fs, lstat_calls):
    mkfile(lowers[-1] / "d" / "deep", b"bottom")
    fs = make_fs(lowers)
    lookup_path(fs, "d")
    lstat_calls.clear()
    assert read_path(fs, "d/deep") == b"bottom"
    asked = [c for c in lstat_calls if c[2] in (b"deep", b".wh.deep")]
    assert asked == [(N - 1, b"d", b"deep")]  # only the layer that has it
    lstat_calls.clear()
    assert errno_of(lambda: lookup_path(fs, "d/nowhere")) == errno.ENOENT
    assert [c for c in lstat_calls if c[2] in (b"nowhere", b".wh.nowhere")] == []


def test_few_layers_are_asked_one_by_one(layer, make_fs, lstat_calls):
    ls = [layer(f"m{i}") for i in range(presence.MIN_LAYERS - 1)]
    for lower in ls:
        mkdir(lower / "d")
    mkfile(ls[-1] / "d" / "deep")
    fs = make_fs(ls)
    lookup_path(fs, "d")
    lstat_calls.clear()
    lookup_path(fs, "d/deep")
    assert len([c for c in lstat_calls if c[2] == b"deep"]) == len(ls)  # no listing below MIN_LAYERS


@pytest.mark.parametrize("form", ["device", "xattr", "oci"])
def test_a_whiteout_in_a_middle_layer_still_hides(lowers, make_fs, form):
    mkfile(lowers[-1] / "d" / "gone", b"bottom")
    middle = lowers[N // 2] / "d"
    if form == "device":
        mkwhiteout(middle / "gone")
    elif form == "xattr":
        mkxwhiteout(middle / "gone")
    else:
        mkfile(middle / ".wh.gone")
    fs = make_fs(lowers)
    assert errno_of(lambda: lookup_path(fs, "d/gone")) == errno.ENOENT
    assert b"gone" not in listdir(fs, "d")


def test_merged_and_opaque_directories_through_many_layers(lowers, make_fs):
    for i in (2, 5, 9):
        mkfile(lowers[i] / "d" / "sub" / f"f{i}", b"%d" % i)
    set_opaque(lowers[5] / "d" / "sub")  # hides l09's sub/f9
    fs = make_fs(lowers)
    assert listdir(fs, "d/sub") == [b"f2", b"f5"]
    assert errno_of(lambda: lookup_path(fs, "d/sub/f9")) == errno.ENOENT
    assert listdir(fs, "d") == sorted(b"own%02d" % i for i in range(N)) + [b"sub"]


def test_the_upper_is_always_asked(lowers, layer, make_fs):
    upper = layer("upper")
    mkfile(lowers[-1] / "d" / "f", b"lower")
    fs = make_fs(lowers, upper)
    assert read_path(fs, "d/f") == b"lower"
    mkfile(upper / "d" / "new", b"made behind the cache")  # as a write through the mount would
    fs.drop_caches()
    assert read_path(fs, "d/new") == b"made behind the cache"


def test_drop_caches_forgets_the_names(lowers, make_fs):
    fs = make_fs(lowers)
    assert errno_of(lambda: lookup_path(fs, "d/late")) == errno.ENOENT
    mkfile(lowers[-1] / "d" / "late", b"added to a lower")  # lowers change only between drop-caches
    fs.drop_caches()
    assert read_path(fs, "d/late") == b"added to a lower"


def test_a_huge_directory_is_asked_name_by_name(lowers, make_fs, monkeypatch, lstat_calls):
    monkeypatch.setattr(presence, "MAX_DIR_NAMES", 3)
    for i in range(5):
        mkfile(lowers[-1] / "d" / f"many{i}")
    fs = make_fs(lowers)
    assert read_path(fs, "d/many4") == b""
    assert read_path(fs, "d/own03") == b"3"
    lstat_calls.clear()
    lookup_path(fs, "d/many3")
    assert (N - 1, b"d", b"many3") in lstat_calls  # the big one was not kept: asked
    assert all(c[0] == N - 1 for c in lstat_calls if c[2] == b"many3")  # the small ones were


def test_memory_is_bounded():
    listings = {b"a": [b"1", b"2", b"3"], b"b": [b"4", b"5", b"6"], b"c": [b"7"]}
    names = LayerNames(lambda layer, rel: listings[rel], lambda layer: False, max_names=4 * 6)
    layers = (0, 1, 2, 3)
    assert names.get(b"a", (0, 1)) is None  # too few layers: not read
    a = names.get(b"a", layers)
    assert a is not None and names.size == 12
    names.get(b"b", layers)
    assert names.size == 24
    names.get(b"c", layers)  # 28 > 24: the least recently used (a) goes
    assert names.size == 16
    assert [layer for layer, _ in candidates(a, b"2", None)] == list(layers)
    assert candidates(a, b"9", None) == []
    assert candidates(a, b"9", b".wh.9") == []
    names.clear()
    assert names.size == 0


def test_unreadable_or_missing_layer_directories():
    def listdir(layer: int, rel: bytes) -> list[bytes]:
        if layer == 1:
            raise FileNotFoundError(errno.ENOENT, "gone")
        if layer == 2:
            raise PermissionError(errno.EACCES, "no")
        return [b"n"]

    names = LayerNames(listdir, lambda layer: layer == 0)
    got = names.get(b"d", (0, 1, 2, 3))
    assert got is not None
    assert tuple(got) == ((0, None), (1, frozenset()), (2, None), (3, frozenset({b"n"})))
    assert [layer for layer, _ in candidates(got, b"n", None)] == [0, 2, 3]
    assert [layer for layer, _ in candidates(got, b"m", b".wh.m")] == [0, 2]  # asked ones only


def test_a_directory_merged_through_many_layers_looks_for_no_oci_whiteout_beside_it(lowers, make_fs, lstat_calls):
    """Each layer's names beside the directory are known: ``.wh.d`` is not
    asked for in every layer (it was, with one lstat per layer), yet a
    ``.wh.d`` that is there still ends the merge."""
    fs = make_fs(lowers)
    lookup_path(fs, "d")
    assert [c for c in lstat_calls if c[2] == b".wh.d"] == []
    assert len([c for c in lstat_calls if c[2] == b"d"]) == N  # every layer holds d: each is merged
    mkfile(lowers[5] / ".wh.d", b"")
    fs2 = make_fs(lowers)
    assert read_path(fs2, "d/own05") == b"5"
    assert errno_of(lambda: lookup_path(fs2, "d/own06")) == errno.ENOENT  # below layer 5's .wh.d: hidden
