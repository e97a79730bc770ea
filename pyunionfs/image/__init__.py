"""Images: an upper's changes, OCI layer tars out and in, OCI image layouts
and the layer store.  From :mod:`pyunionfs.fs` it takes the on-disk formats
only (markers, origins, safe paths)."""
