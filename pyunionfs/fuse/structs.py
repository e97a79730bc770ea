"""Byte layouts of the FUSE protocol 7.45 as :class:`struct.Struct`.

Every layout is little-endian with no implicit padding (``<``): the kernel's
structs are padded by hand to 8-byte multiples so 32-bit servers work under
64-bit kernels, and the explicit pad fields appear here as ``x`` bytes or as
fields that are read and ignored.  Sizes are checked against the header in
``tests/unit/test_fuse_protocol.py``.

Times are packed signed (``q``) although the header says ``uint64_t``: the
kernel assigns them to ``time64_t``, so a file from before 1970 round-trips
only if the seconds are written as two's complement.

Layouts that end in a variable part (a name, data, a list) describe only the
fixed head; :mod:`.protocol` reads the rest.
"""

from __future__ import annotations

from struct import Struct

# -- headers ----------------------------------------------------------------

#: fuse_in_header (40): len, opcode, unique, nodeid, uid, gid, pid,
#: total_extlen (extension bytes / 8 at the end of the message, 7.38), padding.
IN_HEADER = Struct("<IIQQIIIHH")
#: fuse_out_header (16): len, error (0, -errno, or a notify code), unique.
OUT_HEADER = Struct("<IiQ")

# -- attributes ---------------------------------------------------------------

#: fuse_attr (88) as a format, to be embedded: ino, size, blocks, atime, mtime,
#: ctime (s), atimensec, mtimensec, ctimensec, mode, nlink, uid, gid, rdev
#: (new_encode_dev: for every device the kernel can name this is the low 32 bits
#: of glibc's dev_t), blksize (st_blksize; 0 lets the kernel pick), flags
#: (ATTR_SUBMOUNT, ATTR_DAX; 7.32, was padding).
ATTR_FMT = "QQQqqqIIIIIIIIII"
ATTR = Struct("<" + ATTR_FMT)
#: fuse_entry_out (128): nodeid (0: negative entry, cached for entry_valid),
#: generation (nodeid+generation must never repeat while the fs exists: NFS file
#: handles), entry_valid, attr_valid (s), entry_valid_nsec, attr_valid_nsec, attr.
ENTRY_OUT = Struct("<QQQQII" + ATTR_FMT)
#: fuse_attr_out (104): attr_valid (s), attr_valid_nsec, dummy, attr.
ATTR_OUT = Struct("<QI4x" + ATTR_FMT)
#: fuse_getattr_in (16): getattr_flags (GETATTR_FH), dummy, fh.
GETATTR_IN = Struct("<I4xQ")
#: fuse_setattr_in (88): valid (FattrFlag), padding, fh, size, lock_owner,
#: atime, mtime, ctime (s), atimensec, mtimensec, ctimensec, mode, unused4,
#: uid, gid, unused5.
SETATTR_IN = Struct("<I4xQQQqqqIIII4xII4x")

# -- statx (7.39) -------------------------------------------------------------

#: fuse_statx_in (24): getattr_flags, reserved, fh, sx_flags (AT_STATX_*),
#: sx_mask (STATX_* wanted).
STATX_IN = Struct("<I4xQII")
#: fuse_sx_time (16) as a format: tv_sec, tv_nsec, reserved.
SX_TIME_FMT = "qI4x"
#: fuse_statx (256), bit-compatible with statx(2): mask, blksize, attributes,
#: nlink, uid, gid, mode (u16), spare, ino, size, blocks, attributes_mask,
#: atime, btime, ctime, mtime, rdev_major, rdev_minor, dev_major, dev_minor,
#: 14 x u64 spare.
STATX_FMT = "IIQIIIH2xQQQQ" + SX_TIME_FMT * 4 + "IIII112x"
STATX = Struct("<" + STATX_FMT)
#: fuse_statx_out (288): attr_valid (s), attr_valid_nsec, flags, 2 x u64 spare, stat.
STATX_OUT = Struct("<QII16x" + STATX_FMT)

# -- lookup counts ------------------------------------------------------------

#: fuse_forget_in (8): nlookup, the number of lookups the kernel drops.
FORGET_IN = Struct("<Q")
#: fuse_batch_forget_in (8): count, dummy; followed by count forget_one.
BATCH_FORGET_IN = Struct("<I4x")
#: fuse_forget_one (16): nodeid, nlookup.
FORGET_ONE = Struct("<QQ")

# -- creating and linking names ----------------------------------------------

#: fuse_mknod_in (16): mode, rdev (new_encode_dev, usable as a dev_t), umask,
#: padding; followed by the name.
MKNOD_IN = Struct("<III4x")
#: fuse_mkdir_in (8): mode, umask; followed by the name.
MKDIR_IN = Struct("<II")
#: fuse_rename_in (8): newdir; followed by oldname, newname.
RENAME_IN = Struct("<Q")
#: fuse_rename2_in (16): newdir, flags (RENAME_NOREPLACE/EXCHANGE/WHITEOUT), padding.
RENAME2_IN = Struct("<QI4x")
#: fuse_link_in (8): oldnodeid (the existing inode); followed by the new name.
LINK_IN = Struct("<Q")
#: fuse_create_in (16): flags (open(2) flags), mode, umask, open_flags
#: (OPEN_KILL_SUIDGID; 7.33, was padding); followed by the name.
CREATE_IN = Struct("<IIII")

# -- open files ---------------------------------------------------------------

#: fuse_open_in (8): flags (open(2) flags), open_flags (OPEN_KILL_SUIDGID).
OPEN_IN = Struct("<II")
#: fuse_open_out (16): fh (the server's handle, echoed in later requests),
#: open_flags (FopenFlag), backing_id (FopenFlag.PASSTHROUGH; 7.40, was padding).
OPEN_OUT = Struct("<QIi")
#: fuse_release_in (24): fh, flags (open(2) flags), release_flags, lock_owner.
RELEASE_IN = Struct("<QIIQ")
#: fuse_flush_in (24): fh, unused, padding, lock_owner.
FLUSH_IN = Struct("<Q8xQ")
#: fuse_read_in (40): fh, offset, size, read_flags, lock_owner, flags, padding.
#: Also READDIR and READDIRPLUS, where size is the reply budget.
READ_IN = Struct("<QQIIQI4x")
#: fuse_write_in (40): fh, offset, size, write_flags, lock_owner, flags,
#: padding; followed by size bytes of data.
WRITE_IN = Struct("<QQIIQI4x")
#: fuse_write_out (8): size written, padding.  Also the reply to COPY_FILE_RANGE.
WRITE_OUT = Struct("<I4x")
#: fuse_fsync_in (16): fh, fsync_flags (FSYNC_FDATASYNC), padding.
FSYNC_IN = Struct("<QI4x")
#: fuse_fallocate_in (32): fh, offset, length, mode (FALLOC_FL_*), padding.
FALLOCATE_IN = Struct("<QQQI4x")
#: fuse_lseek_in (24): fh, offset, whence (SEEK_DATA/SEEK_HOLE), padding.
LSEEK_IN = Struct("<QQI4x")
#: fuse_lseek_out (8): the resulting offset.
LSEEK_OUT = Struct("<Q")
#: fuse_copy_file_range_in (56): fh_in, off_in, nodeid_out, fh_out, off_out,
#: len, flags.
COPY_FILE_RANGE_IN = Struct("<QQQQQQQ")
#: fuse_copy_file_range_out (8, 7.45): bytes_copied, for COPY_FILE_RANGE_64.
COPY_FILE_RANGE_OUT = Struct("<Q")

# -- xattrs ---------------------------------------------------------------------

#: fuse_setxattr_in (16) with InitFlag.SETXATTR_EXT: size, flags
#: (XATTR_CREATE/REPLACE), setxattr_flags (SETXATTR_ACL_KILL_SGID), padding;
#: followed by the name and size bytes of value.
SETXATTR_IN = Struct("<III4x")
#: The 8-byte form the kernel sends without SETXATTR_EXT: size, flags.
SETXATTR_IN_COMPAT = Struct("<II")
#: fuse_getxattr_in (8): size of the caller's buffer (0: "how large?"),
#: padding; for GETXATTR followed by the name.  Also LISTXATTR.
GETXATTR_IN = Struct("<I4x")
#: fuse_getxattr_out (8): the size needed, the answer when the buffer size was 0.
GETXATTR_OUT = Struct("<I4x")

# -- misc requests ----------------------------------------------------------------

#: fuse_access_in (8): mask (R_OK/W_OK/X_OK), padding.
ACCESS_IN = Struct("<I4x")
#: fuse_interrupt_in (8): unique of the request to interrupt.
INTERRUPT_IN = Struct("<Q")
#: fuse_file_lock (24) as a format: start, end, type (F_RDLCK...), pid.
FILE_LOCK_FMT = "QQII"
#: fuse_lk_in (48): fh, owner, lk, lk_flags (LK_FLOCK), padding.
LK_IN = Struct("<QQ" + FILE_LOCK_FMT + "I4x")
#: fuse_lk_out (24): the conflicting lock (GETLK).
LK_OUT = Struct("<" + FILE_LOCK_FMT)
#: fuse_bmap_in (16): block, blocksize, padding.
BMAP_IN = Struct("<QI4x")
#: fuse_bmap_out (8): block.
BMAP_OUT = Struct("<Q")
#: fuse_ioctl_in (32): fh, flags (IOCTL_*), cmd, arg, in_size, out_size;
#: followed by in_size bytes.
IOCTL_IN = Struct("<QIIQII")
#: fuse_ioctl_out (16): result, flags, in_iovs, out_iovs.
IOCTL_OUT = Struct("<iIII")
#: fuse_poll_in (24): fh, kh (the kernel's handle for NOTIFY_POLL), flags, events.
POLL_IN = Struct("<QQII")
#: fuse_poll_out (8): revents, padding.
POLL_OUT = Struct("<I4x")
#: fuse_syncfs_in (8): padding only.
SYNCFS_IN = Struct("<8x")
#: fuse_setupmapping_in (40, virtio-fs): fh, foffset, len, flags, moffset.
SETUPMAPPING_IN = Struct("<QQQQQ")
#: fuse_removemapping_in (4, virtio-fs): count of removemapping_one that follow.
REMOVEMAPPING_IN = Struct("<I")
#: fuse_removemapping_one (16): moffset, len.
REMOVEMAPPING_ONE = Struct("<QQ")

# -- INIT -----------------------------------------------------------------------

#: fuse_init_in (64): major, minor, max_readahead, flags, flags2 (valid with
#: INIT_EXT), 11 x u32 unused.  Kernels before 7.36 send only the first 16 bytes.
INIT_IN = Struct("<IIIII44x")
#: The 16 bytes kernels before 7.36 send: major, minor, max_readahead, flags.
INIT_IN_COMPAT = Struct("<IIII")
#: Where flags2 lies in fuse_init_in.
INIT_IN_FLAGS2 = Struct("<16xI")
#: fuse_init_out (64): major, minor, max_readahead, flags, max_background,
#: congestion_threshold (u16), max_write, time_gran, max_pages, map_alignment
#: (u16), flags2, max_stack_depth, request_timeout (u16, s; 7.43), 11 x u16 unused.
INIT_OUT = Struct("<IIIIHHIIHHIIH22x")

# -- statfs ----------------------------------------------------------------------

#: fuse_kstatfs = fuse_statfs_out (80): blocks, bfree, bavail, files, ffree,
#: bsize, namelen, frsize, padding, 6 x u32 spare.
STATFS_OUT = Struct("<QQQQQIII28x")

# -- directory listings -------------------------------------------------------------

#: fuse_dirent head (24): ino, off (the cookie that resumes *after* this
#: entry), namelen, type (DT_*, i.e. mode >> 12); the name follows and the
#: record is padded to 8 bytes.
DIRENT = Struct("<QQII")
#: fuse_direntplus head (152): an entry_out, then a dirent head.
DIRENTPLUS = Struct("<QQQQII" + ATTR_FMT + "QQII")

# -- notifications (unique 0) -------------------------------------------------------

#: fuse_notify_poll_wakeup_out (8): kh.
NOTIFY_POLL_WAKEUP_OUT = Struct("<Q")
#: fuse_notify_inval_inode_out (24): ino, off, len (signed; len 0 = attributes
#: only, negative = to the end).
NOTIFY_INVAL_INODE_OUT = Struct("<Qqq")
#: fuse_notify_inval_entry_out (16): parent, namelen, flags (EXPIRE_ONLY; 7.38,
#: was padding); followed by the name and a NUL.
NOTIFY_INVAL_ENTRY_OUT = Struct("<QII")
#: fuse_notify_delete_out (24): parent, child, namelen, padding; then name, NUL.
NOTIFY_DELETE_OUT = Struct("<QQI4x")
#: fuse_notify_store_out (24): nodeid, offset, size, padding; then the data.
NOTIFY_STORE_OUT = Struct("<QQI4x")
#: fuse_notify_retrieve_out (32): notify_unique, nodeid, offset, size, padding.
NOTIFY_RETRIEVE_OUT = Struct("<QQQI4x")
#: fuse_notify_retrieve_in (40, the NOTIFY_REPLY request): dummy1, offset, size,
#: dummy2, dummy3, dummy4; followed by the data.
NOTIFY_RETRIEVE_IN = Struct("<8xQI4x16x")
#: fuse_notify_prune_out (16): count, padding, spare; then count x u64 nodeids.
NOTIFY_PRUNE_OUT = Struct("<I4x8x")

# -- passthrough and extensions -------------------------------------------------------

#: fuse_backing_map (16), the FUSE_DEV_IOC_BACKING_OPEN argument: fd, flags (0),
#: padding.
BACKING_MAP = Struct("<iI8x")
#: fuse_ext_header (8): size (including this header), type (EXT_*).
EXT_HEADER = Struct("<II")
#: fuse_secctx_header (8): size of all contexts, nr_secctx.
SECCTX_HEADER = Struct("<II")
#: fuse_secctx (8): size, padding; then the context name, NUL, the label.
SECCTX = Struct("<I4x")
#: fuse_supp_groups head (4): nr_groups; then that many u32 gids.
SUPP_GROUPS = Struct("<I")
