"""pyunionfs's own FUSE engine: the kernel protocol spoken from pure Python.

The subpackage holds, bottom up:

- the kernel protocol: :mod:`.abi` (numbers: opcodes, flags, ioctls),
  :mod:`.structs` (the byte layouts of ``include/uapi/linux/fuse.h``) and
  :mod:`.protocol` (requests parsed from bytes, replies built as bytes; no I/O);
- the transport: opening ``/dev/fuse``, mount(2), reading requests and writing
  replies (to come);
- the engine: the request loop that answers the kernel by calling the union
  core (to come), replacing pyfuse3 and libfuse.

Only the standard library is used (os, struct, fcntl, socket, ctypes).
"""
