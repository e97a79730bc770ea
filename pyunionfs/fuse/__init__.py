"""The FUSE engines: how the union core is served to the kernel.

The default engine speaks the kernel's protocol from pure Python.  Bottom up:

- the kernel protocol: :mod:`.abi` (numbers: opcodes, flags, ioctls),
  :mod:`.structs` (the byte layouts of ``include/uapi/linux/fuse.h``) and
  :mod:`.protocol` (requests parsed from bytes, replies built as bytes; no I/O);
- the transport (:mod:`.transport`): opening ``/dev/fuse``, mount(2) or
  fusermount3, reading requests and writing replies;
- the engine (:mod:`.engine`): each request answered by one call into the
  core; passthrough (:mod:`.backing`); the daemon's life, worker threads and
  signals (:mod:`.server`).

Only the standard library is used (os, struct, fcntl, socket, ctypes).  The
reference engine, :mod:`.pyfuse3_engine`, serves the same core through
pyfuse3 and trio (the ``pyfuse3`` extra).
"""
