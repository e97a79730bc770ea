"""Command-line parsing and validation: split_layers, parse_options, build_config."""

from __future__ import annotations

import os

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pyunionfs.config import MountConfig, build_config, parse_options, split_layers
from pyunionfs.errors import UsageError
from pyunionfs.options import Form, taken_by

# -- split_layers ------------------------------------------------------------------


def test_split_plain():
    assert split_layers("a:b:c") == ["a", "b", "c"]
    assert split_layers("/only") == ["/only"]


def test_split_escaped_colon():
    assert split_layers(r"a\:b:c") == ["a:b", "c"]
    assert split_layers(r"/x\:y\:z") == ["/x:y:z"]


def test_split_escaped_backslash():
    # "\\" is one literal backslash, and the ':' after it still separates.
    assert split_layers("a\\\\:b") == ["a\\", "b"]
    assert split_layers("a\\\\\\:b") == ["a\\:b"]


def test_split_backslash_before_ordinary_char_drops_backslash():
    # As overlayfs's unescaping: a backslash escapes whatever follows it.
    assert split_layers(r"a\bc") == ["abc"]


def test_split_trailing_backslash_refused():
    with pytest.raises(UsageError, match="backslash"):
        split_layers("a:b\\")
    with pytest.raises(UsageError):
        split_layers("\\")


def test_split_empty_components_kept():
    # Empty items are reported later by build_config ("empty lower layer path").
    assert split_layers("a::b") == ["a", "", "b"]
    assert split_layers("") == [""]


def _escape(p: str) -> str:
    return p.replace("\\", "\\\\").replace(":", "\\:")


@given(st.lists(st.text(alphabet="ab:\\/ x", min_size=0, max_size=8), min_size=1, max_size=5))
def test_split_roundtrip_of_escaped_list(paths):
    assert split_layers(":".join(_escape(p) for p in paths)) == paths


# -- parse_options ---------------------------------------------------------------------


def test_parse_options_empty_items_skipped():
    assert parse_options(["a,,b"]) == {"a": "", "b": ""}
    assert parse_options([",", ",,,", ""]) == {}


def test_parse_options_values_and_repeats():
    opts = parse_options(["ro,timeout=5", "workdir=/w=x", "e=", "timeout=7"])
    assert opts == {"ro": "", "timeout": "7", "workdir": "/w=x", "e": ""}


# -- build_config ----------------------------------------------------------------------


@pytest.fixture
def dirs(tmp_path):
    for n in ("l1", "l2", "u", "mnt", "w"):
        (tmp_path / n).mkdir()
    (tmp_path / "file").write_text("not a dir")
    return tmp_path


def test_build_basic(dirs):
    cfg = build_config(f"{dirs}/l1:{dirs}/l2", f"{dirs}/u", f"{dirs}/mnt", [])
    assert isinstance(cfg, MountConfig)
    assert cfg.lowers == (os.fsencode(f"{dirs}/l1"), os.fsencode(f"{dirs}/l2"))
    assert cfg.upper == os.fsencode(f"{dirs}/u")
    assert cfg.mountpoint == os.fsencode(f"{dirs}/mnt")
    assert cfg.readonly is False
    assert cfg.layers == (cfg.upper, *cfg.lowers)
    assert cfg.timeout == 86400.0
    assert cfg.oci_whiteouts is True
    assert cfg.userxattr is False
    assert cfg.workdir == os.fsencode(f"{dirs}/.u.pyunionfs-work")  # beside the upper


def test_build_relative_paths_made_absolute(dirs, monkeypatch):
    monkeypatch.chdir(dirs)
    cfg = build_config("l1:./l2", "u", "mnt", ["workdir=w"])
    for p in (*cfg.lowers, cfg.upper, cfg.mountpoint, cfg.workdir):
        assert isinstance(p, bytes)
        assert os.path.isabs(p)
    assert cfg.lowers == (os.fsencode(str(dirs / "l1")), os.fsencode(str(dirs / "l2")))
    assert cfg.upper == os.fsencode(str(dirs / "u"))
    assert cfg.mountpoint == os.fsencode(str(dirs / "mnt"))
    assert cfg.workdir == os.fsencode(str(dirs / "w"))


def test_build_missing_lower_named(dirs):
    missing = f"{dirs}/nope"
    with pytest.raises(UsageError) as info:
        build_config(f"{dirs}/l1:{missing}", "", f"{dirs}/mnt", [])
    assert missing in str(info.value)


def test_build_nondir_lower_named(dirs):
    with pytest.raises(UsageError) as info:
        build_config(f"{dirs}/file", "", f"{dirs}/mnt", [])
    assert f"{dirs}/file" in str(info.value)
    assert "not a directory" in str(info.value)


def test_build_missing_upper_named(dirs):
    with pytest.raises(UsageError) as info:
        build_config(f"{dirs}/l1", f"{dirs}/nou", f"{dirs}/mnt", [])
    assert f"{dirs}/nou" in str(info.value)


def test_build_missing_mountpoint_named(dirs):
    with pytest.raises(UsageError) as info:
        build_config(f"{dirs}/l1", "", f"{dirs}/nomnt", [])
    assert f"{dirs}/nomnt" in str(info.value)


def test_build_empty_lower_component_refused(dirs):
    with pytest.raises(UsageError, match="empty"):
        build_config(f"{dirs}/l1::{dirs}/l2", "", f"{dirs}/mnt", [])


def test_build_same_lower_twice_refused(dirs):
    with pytest.raises(UsageError, match="twice"):
        build_config(f"{dirs}/l1:{dirs}/l1", "", f"{dirs}/mnt", [])


def test_build_same_dir_twice_via_other_spelling_refused(dirs):
    os.symlink(dirs / "l1", dirs / "alias")
    with pytest.raises(UsageError, match="twice"):
        build_config(f"{dirs}/l1:{dirs}/alias", "", f"{dirs}/mnt", [])
    with pytest.raises(UsageError, match="twice"):
        build_config(f"{dirs}/l1:{dirs}/l2/../l1", "", f"{dirs}/mnt", [])


def test_build_upper_equal_to_lower_refused(dirs):
    with pytest.raises(UsageError, match="twice"):
        build_config(f"{dirs}/l1", f"{dirs}/l1", f"{dirs}/mnt", [])
    with pytest.raises(UsageError, match="twice"):
        build_config(f"{dirs}/l1", f"{dirs}/l1", f"{dirs}/mnt", ["ro"])


def test_build_empty_upper_is_readonly(dirs):
    cfg = build_config(f"{dirs}/l1:{dirs}/l2", "", f"{dirs}/mnt", [])
    assert cfg.upper is None
    assert cfg.readonly is True
    assert cfg.layers == cfg.lowers
    # "rw" cannot make a mount without an upper writable.
    assert build_config(f"{dirs}/l1", "", f"{dirs}/mnt", ["rw"]).readonly is True


def test_build_ro_with_upper_makes_upper_top_lower(dirs):
    cfg = build_config(f"{dirs}/l1:{dirs}/l2", f"{dirs}/u", f"{dirs}/mnt", ["ro"])
    assert cfg.readonly is True
    assert cfg.upper is None
    assert cfg.lowers == tuple(os.fsencode(f"{dirs}/{n}") for n in ("u", "l1", "l2"))
    assert cfg.layers == cfg.lowers


@pytest.mark.parametrize("opt", ["bogus", "ro,frobnicate=1", "uppperdir=/x"])
def test_build_unknown_option_refused(dirs, opt):
    with pytest.raises(UsageError, match="unknown option") as info:
        build_config(f"{dirs}/l1", "", f"{dirs}/mnt", [opt])
    key = [p for p in opt.split(",") if p.split("=")[0] not in ("ro",)][0].split("=")[0]
    assert key in str(info.value)


def test_build_every_known_option_accepted(dirs):
    opts = ["ro,rw,userxattr,allow_other,default_permissions,debug", "timeout=2.5,oci_whiteouts=off,workdir=/tmp"]
    cfg = build_config(f"{dirs}/l1", f"{dirs}/u", f"{dirs}/mnt", opts)
    assert cfg.userxattr is True
    assert cfg.oci_whiteouts is False
    assert cfg.timeout == 2.5
    assert cfg.debug is True
    assert cfg.allow_other is True
    assert cfg.workdir is None  # read-only: nothing is ever copied up
    assert {o.name for o in taken_by(Form.MOUNT)} >= {"ro", "rw", "timeout", "workdir"}


@pytest.mark.parametrize("value", ["abc", "", "1s", "-1", "-0.5"])
def test_build_bad_timeout_refused(dirs, value):
    with pytest.raises(UsageError, match="timeout"):
        build_config(f"{dirs}/l1", "", f"{dirs}/mnt", [f"timeout={value}"])


def test_build_zero_timeout_ok(dirs):
    assert build_config(f"{dirs}/l1", "", f"{dirs}/mnt", ["timeout=0"]).timeout == 0.0


def test_build_nan_timeout_refused(dirs):
    with pytest.raises(UsageError, match="timeout"):
        build_config(f"{dirs}/l1", "", f"{dirs}/mnt", ["timeout=nan"])


@pytest.mark.parametrize("value", ["yes", "", "ON"])
def test_build_bad_oci_whiteouts_refused(dirs, value):
    with pytest.raises(UsageError, match="oci_whiteouts"):
        build_config(f"{dirs}/l1", "", f"{dirs}/mnt", [f"oci_whiteouts={value}"])


def test_build_escaped_colon_in_layer_path(dirs):
    weird = dirs / "has:colon"
    weird.mkdir()
    cfg = build_config(f"{dirs}/has\\:colon:{dirs}/l1", "", f"{dirs}/mnt", [])
    assert cfg.lowers == (os.fsencode(str(weird)), os.fsencode(f"{dirs}/l1"))


def test_build_debug_flag(dirs):
    assert build_config(f"{dirs}/l1", "", f"{dirs}/mnt", [], debug=True).debug is True
    assert build_config(f"{dirs}/l1", "", f"{dirs}/mnt", []).debug is False


@pytest.mark.parametrize("which", ["lower-in-lower", "lower-in-upper"])
def test_build_overlapping_layers_refused(dirs, which):
    (dirs / "l1" / "sub").mkdir()
    (dirs / "u" / "sub").mkdir()
    lowers, upper = {
        "lower-in-lower": (f"{dirs}/l1:{dirs}/l1/sub", ""),
        "lower-in-upper": (f"{dirs}/u/sub", f"{dirs}/u"),
    }[which]
    with pytest.raises(UsageError):
        build_config(lowers, upper, f"{dirs}/mnt", [])


def test_workdir_given_must_stay_out_of_the_layers(dirs):
    cfg = build_config(f"{dirs}/l1", f"{dirs}/u", f"{dirs}/mnt", [f"workdir={dirs}/work-new"])
    assert cfg.workdir == os.fsencode(f"{dirs}/work-new")  # created at mount
    for bad in (f"{dirs}/u/w", f"{dirs}/l1/w", f"{dirs}/mnt/w", f"{dirs}"):
        with pytest.raises(UsageError, match="overlaps"):
            build_config(f"{dirs}/l1", f"{dirs}/u", f"{dirs}/mnt", [f"workdir={bad}"])


def test_workdir_on_another_filesystem_is_refused(dirs):
    if os.stat("/dev/shm").st_dev == os.stat(dirs).st_dev:
        pytest.skip("/dev/shm is on the same filesystem as the test dirs")
    with pytest.raises(UsageError, match="not on the upper's filesystem"):
        build_config(f"{dirs}/l1", f"{dirs}/u", f"{dirs}/mnt", ["workdir=/dev/shm/pyunionfs-w"])


def test_options_split_as_overlayfs_does_in_both_command_forms() -> None:
    """``-o`` of ``pyunionfs mount`` reads escapes and quotes as the overlay form does: one splitter."""
    assert parse_options([r"workdir=/w\,x,,timeout=5", 'context="a,b"']) == {
        "workdir": "/w,x", "timeout": "5", "context": '"a,b"'}
