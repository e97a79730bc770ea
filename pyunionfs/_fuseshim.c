/*
 * FUSE features that pyfuse3 3.5 does not expose, added under it.
 *
 * Why this exists: pyfuse3 builds its own table of libfuse handlers and hands
 * it to fuse_session_new().  It gives no way to ask for FUSE_CAP_POSIX_ACL
 * or FUSE_CAP_DONT_MASK (see init_wants), no way to answer OPENDIR with
 * FOPEN_CACHE_DIR (so the kernel re-asks for every listing: the main cost of
 * a warm `git status` or `find`), and it has no FALLOCATE handler (so
 * fallocate(2) on the mount fails with EOPNOTSUPP).
 *
 * How: this library is loaded with RTLD_GLOBAL before pyfuse3 (see
 * fuseshim.py), so pyfuse3's call to fuse_session_new() binds here.  We copy
 * its handler table, change two entries and pass the copy to libfuse's own
 * fuse_session_new().  Only libfuse's public API is used; pyfuse3 itself is
 * untouched.  If the binding does not happen (pyfuse3 loaded first), nothing
 * changes and active() says so.
 *
 * - opendir: the flags are set on the request's fuse_file_info before
 *   pyfuse3's handler copies it, so its reply carries them.  The kernel then
 *   keeps each directory's listing in its page cache until the directory
 *   changes through the mount (it drops the cache itself on create, unlink,
 *   rename, ...), which is exact for us: lowers do not change under a mount
 *   and the upper changes only through us.
 * - fallocate: pyunionfs's file handles are the upper file's own descriptor
 *   (a handle open for writing was copied up at open), so the call is made on
 *   it directly.  No path is resolved, so no symlink can be followed.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#define FUSE_USE_VERSION 34
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <fuse_lowlevel.h>
#include <string.h>

typedef struct fuse_session *(*session_new_fn)(struct fuse_args *, const struct fuse_lowlevel_ops *, size_t,
					       void *);

static struct fuse_lowlevel_ops wrapped_ops;
static void (*pyfuse3_init)(void *, struct fuse_conn_info *);
static void (*pyfuse3_opendir)(fuse_req_t, fuse_ino_t, struct fuse_file_info *);
static int cache_dirs = 1;
static int posix_acl = 1;
static int active;

static void opendir_cached(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
	if (cache_dirs) {
		fi->cache_readdir = 1;
		/* Without keep_cache the kernel drops the cached listing at every opendir. */
		fi->keep_cache = 1;
	}
	pyfuse3_opendir(req, ino, fi);
}

/*
 * init: ask for FUSE_CAP_POSIX_ACL, unless the mount says noacl.  Then the
 * kernel enforces ACLs as it does on the kernel's overlayfs (fetching each
 * inode's ACL once with getxattr and caching it; the daemon keeps the mode in
 * step, which the upper's filesystem does for it, and makes new entries
 * inherit default ACLs); without it, it checks the mode bits only.
 *
 * And ask for FUSE_CAP_DONT_MASK.  Without it the kernel applies the
 * caller's umask to the mode of every new file before we see it, also in a
 * directory with a default ACL, where the kernel's overlayfs (like any local
 * filesystem) ignores the umask and lets the ACL shape the mode.  With it the
 * mode arrives whole and the umask beside it (pyfuse3's ctx.umask): the union
 * applies one or the other, as posix_acl_create() does.
 */
static void init_wants(void *userdata, struct fuse_conn_info *conn)
{
	if (pyfuse3_init != NULL)
		pyfuse3_init(userdata, conn);
	if (conn->capable & FUSE_CAP_DONT_MASK)
		conn->want |= FUSE_CAP_DONT_MASK;
	if (posix_acl && (conn->capable & FUSE_CAP_POSIX_ACL))
		conn->want |= FUSE_CAP_POSIX_ACL;
}

static void fallocate_fh(fuse_req_t req, fuse_ino_t ino, int mode, off_t offset, off_t length,
			 struct fuse_file_info *fi)
{
	(void)ino;
	fuse_reply_err(req, fallocate((int)fi->fh, mode, offset, length) == 0 ? 0 : errno);
}

struct fuse_session *fuse_session_new(struct fuse_args *args, const struct fuse_lowlevel_ops *op, size_t op_size,
				      void *userdata)
{
	session_new_fn real = (session_new_fn)dlvsym(RTLD_NEXT, "fuse_session_new", "FUSE_3.0");

	if (real == NULL)
		real = (session_new_fn)dlsym(RTLD_NEXT, "fuse_session_new");
	if (real == NULL) {
		errno = ENOSYS;
		return NULL;
	}
	if (op_size > sizeof(wrapped_ops))
		/* A libfuse newer than our headers: do not guess its layout. */
		return real(args, op, op_size, userdata);
	memset(&wrapped_ops, 0, sizeof(wrapped_ops));
	memcpy(&wrapped_ops, op, op_size);
	if (wrapped_ops.opendir != NULL) {
		pyfuse3_opendir = wrapped_ops.opendir;
		wrapped_ops.opendir = opendir_cached;
	}
	if (wrapped_ops.fallocate == NULL)
		wrapped_ops.fallocate = fallocate_fh;
	pyfuse3_init = wrapped_ops.init;
	wrapped_ops.init = init_wants;
	active = 1;
	return real(args, &wrapped_ops, sizeof(wrapped_ops), userdata);
}

static PyObject *shim_active(PyObject *self, PyObject *unused)
{
	(void)self;
	(void)unused;
	return PyBool_FromLong(active);
}

static PyObject *shim_set_cache_dirs(PyObject *self, PyObject *arg)
{
	(void)self;
	int on = PyObject_IsTrue(arg);

	if (on < 0)
		return NULL;
	cache_dirs = on;
	Py_RETURN_NONE;
}

static PyObject *shim_set_posix_acl(PyObject *self, PyObject *arg)
{
	(void)self;
	int on = PyObject_IsTrue(arg);

	if (on < 0)
		return NULL;
	posix_acl = on;
	Py_RETURN_NONE;
}

static PyMethodDef shim_methods[] = {
	{"active", shim_active, METH_NOARGS, "Whether the last FUSE session was made through this shim."},
	{"set_cache_dirs", shim_set_cache_dirs, METH_O, "Whether opendir answers ask the kernel to cache listings."},
	{"set_posix_acl", shim_set_posix_acl, METH_O, "Whether INIT asks the kernel to enforce POSIX ACLs."},
	{NULL, NULL, 0, NULL},
};

static struct PyModuleDef shim_module = {
	PyModuleDef_HEAD_INIT, "_fuseshim", "FUSE features pyfuse3 does not expose (see _fuseshim.c).", -1,
	shim_methods,
};

PyMODINIT_FUNC PyInit__fuseshim(void)
{
	return PyModule_Create(&shim_module);
}
