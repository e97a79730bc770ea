"""The ``pyunionfs`` command: argument parsing and one-line errors, nothing more."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from typing import TYPE_CHECKING

from ..config import build_config
from ..errors import PyunionfsError, StoreError, UsageError
from ..options import Form, help_lines
from .dropin import HELPER_DIR, route
from .registry import add_connection_options, add_login_parsers

if TYPE_CHECKING:
    from ..image.layertar import CommitResult


def _parser() -> argparse.ArgumentParser:
    from ..config import VERSION
    from .dropin import help_text

    p = argparse.ArgumentParser(
        prog="pyunionfs",
        description="A union filesystem in userspace, on disk compatible with overlayfs.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=help_text(),
    )
    p.add_argument("-V", "--version", action="version", version=f"pyunionfs {VERSION}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    m = sub.add_parser(
        "mount",
        help="mount LOWER1:LOWER2:... (or image:NAME[:TAG]) over UPPER at MNT",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=(
            "Mount the union of LOWER1:LOWER2:... (leftmost topmost; escape ':' and '\\' "
            "with a backslash) under the writable UPPER at MNT.  An empty UPPER (\"\") "
            "or -o ro makes a read-only mount.  LOWERS may instead be image:NAME[:TAG], an image "
            "of the layer store (see pull, commit --tag): its layers, topmost first."
            "\n\noptions for -o (docs/options.md has them all):\n" + "\n".join(help_lines(Form.MOUNT))
        ),
    )
    m.add_argument("lowers", metavar="LOWERS")
    m.add_argument("upper", metavar="UPPER")
    m.add_argument("mountpoint", metavar="MNT")
    m.add_argument("-o", dest="options", action="append", default=[], metavar="OPT[,OPT...]")
    m.add_argument("-f", "--foreground", action="store_true", help="stay in the foreground")
    m.add_argument("--debug", action="store_true",
                   help="log every request; implies -f (the log goes to stderr, or to --log FILE)")
    m.add_argument("--log", metavar="FILE", help="where the daemon writes its log (relative to this directory)")
    _store_option(m)

    u = sub.add_parser("umount", help="unmount a pyunionfs mount and wait for its daemon")
    u.add_argument("mountpoint", metavar="MNT")
    u.add_argument("-z", "--lazy", action="store_true", help="detach now, finish when no longer busy")

    c = sub.add_parser("drop-caches", help="make a live mount forget what it cached (after a lower changed under it)")
    c.add_argument("mountpoint", metavar="MNT")

    h = sub.add_parser("install-helper", help="link this pyunionfs into DIR, where mount -t fuse.pyunionfs finds it")
    h.add_argument("--dir", default=HELPER_DIR, help=f"where to put the link (default {HELPER_DIR})")
    h.add_argument("--remove", action="store_true", help="remove the link instead")

    d = sub.add_parser("demo", help="build two small lowers and an upper, mount them, show the merged tree")
    d.add_argument("--keep", action="store_true", help="leave the demo's folder in place")
    _layer_parsers(sub)
    _image_parsers(sub)
    return p


def _layer_parsers(sub: argparse._SubParsersAction) -> None:
    """``diff``, ``commit``, ``apply``: image layers in and out, no FUSE involved."""
    df = sub.add_parser("diff", help="list what an upper changed (A added, C changed, D deleted), like docker diff")
    df.add_argument("upper", metavar="UPPER")
    df.add_argument("--lowers", metavar="L1:L2:...", help="decide A/C/D by the merged lowers (topmost first)")
    _workdir_option(df)
    df.add_argument("--userxattr", action="store_true", help="markers are user.overlay.* only")

    c = sub.add_parser("commit", help="write an upper as an OCI layer tar (-o), or as a new image in the store (--tag)")
    c.add_argument("upper", metavar="UPPER")
    out = c.add_mutually_exclusive_group(required=True)
    out.add_argument("-o", "--output", metavar="LAYER.tar", help="write the layer tar here; print its DiffID")
    out.add_argument("--tag", metavar="NAME[:TAG]", help="store the upper as a new image NAME[:TAG]")
    c.add_argument("--gzip", action="store_true", help="with -o: also write LAYER.tar.gz and print its digest")
    _compress_options(c, "with -o: also write LAYER.tar.gz or .zst and print its digest; with --tag: the "
                         "stored layer's format (default gzip)")
    c.add_argument("--from", dest="base", metavar="IMAGE", help="with --tag: the image the upper was mounted on")
    c.add_argument("-m", "--message", metavar="TEXT", 
                   help="with --tag: the history's CREATED BY (default: pyunionfs commit)")
    c.add_argument("--lowers", metavar="L1:L2:...",
                   help="the layers UPPER was mounted on, topmost first (default with --from: that image's); "
                        "needed for the names copied-up hard links have only in the lowers and for the data "
                        "of metadata-only copies (metacopy=on)")
    _workdir_option(c)
    c.add_argument("--userxattr", action="store_true", help="markers are user.overlay.* only")
    _store_option(c)

    a = sub.add_parser("apply", help="unpack an OCI image layer (tar or tar.gz) into DIR")
    a.add_argument("layer", metavar="LAYER")
    a.add_argument("dir", metavar="DIR")
    a.add_argument("--whiteouts", choices=("device", "oci"), default="device",
                   help="write deletions as 0/0 devices and overlay.opaque (default) or keep .wh. files")
    a.add_argument("--flatten", action="store_true", help="apply onto the layers below: delete, write no markers")
    a.add_argument("--userxattr", action="store_true", help="write user.overlay.opaque (implied when not root)")


def _compress_options(p: argparse.ArgumentParser, what: str) -> None:
    """--compress and --compress-level, both checked by :meth:`Compression.choose` (one-line errors)."""
    p.add_argument("--compress", metavar="gzip|zstd", help=what + "; zstd needs the zstandard package")
    p.add_argument("--compress-level", metavar="N",
                   help="compression level: gzip 1-9 (default 6), zstd 1-19 (default 3)")


def _workdir_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--workdir", metavar="DIR",
                   help="the work directory UPPER was mounted with (default: pyunionfs's, beside UPPER); with "
                        "the lowers, its index/ gives the names copied-up hard links have only in the lowers")


def _lower_paths(spec: str | None) -> list[str] | None:
    """--lowers as absolute paths, topmost first (escaped as for mount)."""
    from ..config import split_layers

    return [os.path.abspath(p) for p in split_layers(spec)] if spec else None


def _store_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--store", metavar="DIR",
                   help="the layer store (default: $PYUNIONFS_STORE, /var/lib/pyunionfs as root, else "
                        "$XDG_DATA_HOME/pyunionfs)")


def _image_parsers(sub: argparse._SubParsersAction) -> None:
    """``pull``, ``push``, ``images``, ``history``, ``rmi``: whole images and the layer store."""
    p = sub.add_parser("pull", help="import an image from an OCI layout directory or a registry into the store")
    p.add_argument("source", metavar="LAYOUT[:TAG]|docker://HOST[:PORT]/REPO[:TAG|@DIGEST]")
    p.add_argument("--tag", metavar="NAME[:TAG]",
                   help="store it under this name (default: the layout's name for it; HOST[:PORT]/REPO:TAG)")
    p.add_argument("--platform", metavar="OS/ARCH[/VARIANT]",
                   help="the image to take from a multi-platform index (default: this machine's)")
    add_connection_options(p)
    _store_option(p)
    q = sub.add_parser("push", help="export an image of the store as an OCI layout directory or to a registry")
    q.add_argument("image", metavar="IMAGE")
    q.add_argument("dest", metavar="LAYOUT[:TAG]|docker://HOST[:PORT]/REPO[:TAG]")
    _compress_options(q, "compress plain layers so, and recompress layers compressed otherwise "
                         "(default: plain layers gzipped, compressed ones copied as they are)")
    add_connection_options(q)
    _store_option(q)
    i = sub.add_parser("images", help="list the images of the store")
    _store_option(i)
    h = sub.add_parser("history", help="show an image's layers, newest first, like docker history")
    h.add_argument("image", metavar="IMAGE")
    h.add_argument("--no-trunc", action="store_true", help="show CREATED BY whole (cut to 45 characters otherwise)")
    _store_option(h)
    t = sub.add_parser("tag", help="give an image of the store another NAME[:TAG], like docker tag")
    t.add_argument("image", metavar="IMAGE")
    t.add_argument("name", metavar="NAME[:TAG]")
    _store_option(t)
    r = sub.add_parser("rmi", help="remove an image, and the layers no other image uses")
    r.add_argument("images", metavar="IMAGE", nargs="+")
    _store_option(r)
    add_login_parsers(sub)


def _image_command(args: argparse.Namespace) -> int:
    """Store commands; an I/O error (full disk, permissions) is one line too, not a traceback, and
    so is Ctrl-C (the store is as it was: nothing is moved in before everything is checked)."""
    try:
        return _store_command(args)
    except OSError as exc:
        raise StoreError(f"{exc.filename or args.command}: {exc.strerror or exc}") from None
    except KeyboardInterrupt:
        print(f"pyunionfs: {args.command}: interrupted", file=sys.stderr)
        return 130


def _store_command(args: argparse.Namespace) -> int:
    from ..image.compression import Compression
    from ..image.listing import format_history, format_images
    from ..image.store import Store

    from ..image.references import check_transport, is_registry
    from . import registry

    remote, opts = False, None
    if args.command in ("pull", "push"):
        target = args.source if args.command == "pull" else args.dest
        check_transport(target)
        remote = is_registry(target)
        opts = registry.options(args, remote)  # registry options with a layout: a usage error
    if args.command == "commit" and args.gzip:
        raise UsageError("--gzip goes with -o; with --tag, --compress chooses how the layer is stored")
    compress = Compression.choose(args.compress, args.compress_level) if args.command in ("push", "commit") else None
    # A read (images, history, push) creates no store; the others make it on first use.
    store = Store(args.store, create=args.command not in ("images", "history", "push"))
    if args.command == "pull" and remote and opts is not None:
        registry.pull(store, args, opts)
    elif args.command == "pull":
        platform = None
        if args.platform:
            from ..image.references import Platform

            platform = Platform.parse(args.platform)
        img = store.pull(args.source, args.tag, platform)
        print(f"{img.name}  {img.id}  {img.manifest_digest}")
    elif args.command == "push" and remote and opts is not None:
        registry.push(store, args, compress, opts)
    elif args.command == "push":
        img, tag, desc = store.push(args.image, args.dest, compress, convert=args.compress is not None)
        print(f"{img.name}  {desc.digest}  {args.dest.removesuffix(':' + tag)}:{tag}")
    elif args.command == "images":
        print(format_images(store))
    elif args.command == "history":
        print(format_history(store, args.image, trunc=not args.no_trunc))
    elif args.command == "tag":
        img = store.tag(args.image, args.name)
        print(f"{img.name}  {img.id}")
    elif args.command == "rmi":
        for ref in args.images:
            img, removed = store.remove(ref)
            print(f"Untagged: {img.name}")
            for diff_id in removed:
                print(f"Deleted: {diff_id}")
    elif args.command == "commit":
        img, layer_id, skipped = store.commit(args.upper, args.tag, args.base, args.message, args.userxattr,
                                              lowers=_lower_paths(args.lowers), workdir=args.workdir,
                                              compress=compress)
        for path in skipped:
            print(f"pyunionfs: warning: {os.fsdecode(path)}: a socket, left out (tar cannot hold one)", file=sys.stderr)
        print(f"{img.name}  {img.id}  {layer_id or '(no changes: an empty_layer history entry)'}")
    return 0


def _layer_command(args: argparse.Namespace) -> int:
    if args.command == "diff":
        from ..fs.markers import Markers
        from ..image.changes import changes

        lowers = [os.fsencode(p) for p in _lower_paths(args.lowers) or ()]
        workdir = None if args.workdir is None else os.fsencode(os.path.abspath(args.workdir))
        out = sys.stdout.buffer
        for kind, path in changes(os.fsencode(args.upper), Markers(userxattr=args.userxattr), lowers, workdir):
            out.write(kind.encode() + b" /" + path.replace(b"\\", b"\\\\").replace(b"\n", b"\\n") + b"\n")
        out.flush()
        return 0
    if args.command == "commit":
        if args.tag is None and (args.base is not None or args.message is not None or args.store is not None):
            raise UsageError("--from, --message and --store go with --tag, not -o")
        with _upper_claimed(args.upper, "commit"):
            if args.tag is not None:
                return _image_command(args)
            res = _commit_file(args)
        for path in res.skipped:
            print(f"pyunionfs: warning: {os.fsdecode(path)}: a socket, left out (tar cannot hold one)", file=sys.stderr)
        print(f"{res.diff_id}  {res.tar_path}")
        if res.compressed_path is not None:
            print(f"{res.compressed_digest}  {res.compressed_path}")
        return 0
    from ..image.layerapply import apply_layer

    if args.flatten and args.whiteouts == "oci":
        raise UsageError("--flatten deletes what a whiteout names; it cannot keep .wh. files (--whiteouts=oci)")
    with _upper_claimed(args.dir, "apply"):
        apply_layer(args.layer, args.dir, mode="flatten" if args.flatten else args.whiteouts,
                    userxattr=args.userxattr)
    return 0


def _upper_claimed(path: str, purpose: str) -> contextlib.AbstractContextManager[object]:
    """Hold *path* against a live mount of it while a command reads or writes it
    (commit: shared, so that commits may run together; apply: exclusive)."""
    from ..fuse.inuse import claimed

    if not os.path.isdir(path):
        return contextlib.nullcontext()  # apply makes it (then no mount uses it); commit says what is wrong
    what = "upper" if purpose == "commit" else "directory"
    return claimed([(what, os.fsencode(os.path.abspath(path)))], purpose, shared=purpose == "commit")


def _commit_file(args: argparse.Namespace) -> CommitResult:
    """``commit -o LAYER.tar``: the tar (and .gz) is built beside the output under
    temporary names this process flocks, so that the next commit to the same
    output can tell a killed command's leftovers from a live one's and remove them."""
    from ..image.compression import Compression
    from ..image.layertar import commit
    from ..image.tempfiles import held_temporaries

    compress = None
    if args.gzip and args.compress not in (None, "gzip"):
        raise UsageError(f"--gzip and --compress {args.compress} ask for two formats: give one")
    if args.gzip or args.compress is not None:
        compress = Compression.choose(args.compress, args.compress_level)
    elif args.compress_level is not None:
        raise UsageError("--compress-level goes with --gzip or --compress (with -o, the tar is not compressed)")
    outputs = [args.output] if compress is None else [args.output, args.output + compress.suffix]
    upper, where = os.path.realpath(args.upper), os.path.realpath(os.path.dirname(os.path.abspath(args.output)))
    inside = where == upper or where.startswith(upper.rstrip("/") + "/")  # refused by commit: make nothing there
    with contextlib.nullcontext() if inside else held_temporaries(outputs):
        return commit(args.upper, args.output, userxattr=args.userxattr, compress=compress,
                      lowers=_lower_paths(args.lowers), workdir=args.workdir)


def _command(args: argparse.Namespace) -> int:
    if args.command == "mount":
        lowers = args.lowers
        if lowers.startswith("image:"):
            from ..image.records import IMAGE_PREFIX
            from ..image.store import Store

            dirs = Store(args.store, create=False).lowers(lowers[len(IMAGE_PREFIX):])
            lowers = ":".join(d.replace("\\", "\\\\").replace(":", "\\:") for d in dirs)
        elif args.store is not None:
            raise UsageError("--store goes with an image (image:NAME[:TAG]), not a list of directories")
        # --debug implies -f, as its help says (as libfuse's -d does)
        cfg = build_config(lowers, args.upper, args.mountpoint, args.options, args.foreground or args.debug,
                           args.debug)
        from ..fuse.mount import mount_configured

        return mount_configured(cfg, args.log)
    if args.command == "umount":
        from ..fuse.mount import unmount

        unmount(os.fsencode(os.path.abspath(args.mountpoint)), lazy=args.lazy)
        return 0
    if args.command == "drop-caches":
        from ..fuse.control import drop_caches

        print(f"pyunionfs: {drop_caches(os.fsencode(os.path.abspath(args.mountpoint)))}")
        return 0
    if args.command == "demo":
        from .demo import run_demo

        return run_demo(keep=args.keep)
    if args.command == "install-helper":
        from .dropin import install_helper

        print(f"pyunionfs: {install_helper(args.dir, remove=args.remove)}")
        return 0
    if args.command in ("diff", "commit", "apply"):
        return _layer_command(args)
    if args.command in ("pull", "push", "images", "history", "tag", "rmi"):
        return _image_command(args)
    if args.command in ("login", "logout"):
        from .registry import login_command

        return login_command(args)
    return 2


def subcommands(parser: argparse.ArgumentParser | None = None) -> frozenset[str]:
    """The first words that name a subcommand (rather than a mount.fuse3 SOURCE), from the parser."""
    sub = next(a for a in (parser or _parser())._actions if isinstance(a, argparse._SubParsersAction))
    return frozenset(sub.choices)


def main(argv: list[str] | None = None) -> int:
    """The one entry of every command line: a subcommand, or the fuse-overlayfs /
    mount.fuse3 form (:func:`.dropin.route` tells which, once).  A first word
    that is no subcommand but close to one gets argparse's "invalid choice",
    naming the closest (before Python 3.14 argparse only lists them all);
    exit status 2, as for every bad command line."""
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        parser = _parser()
        form = route(argv, subcommands(parser))
        if form.dropin:
            # pyunionfs -o lowerdir=...,upperdir=...,workdir=... [SOURCE] MNT (fuse-overlayfs, mount.fuse3)
            from .dropin import run

            return run(argv)
        if form.meant is not None:
            parser.error(f"argument COMMAND: invalid choice: {argv[0]!r} (did you mean {form.meant!r}?)")
        return _command(parser.parse_args(argv))
    except UsageError as exc:
        print(f"pyunionfs: {exc}", file=sys.stderr)
        return 2
    except PyunionfsError as exc:  # a mount, layer, image or store failure: one line, not a traceback
        print(f"pyunionfs: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
