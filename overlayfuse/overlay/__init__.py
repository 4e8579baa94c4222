"""The union semantics of kernel overlayfs, with no FUSE in it: testable on plain directories.

- `whiteout`: every on-disk form of whiteouts and opaque markers (devices, ``.wh.`` files, xattrs);
- `layers`: the layer stack, objects held by descriptor (`Branch`, `Fd`), resolution of one name;
- `links`: the hardlink index that keeps a copied-up lower file's names together;
- `inodes`: the node table: inode numbers (the xino scheme), lookup counts, each node's names;
- `copyup`: one object copied from a lower layer into the upper dir, staged and published atomically;
- `origin`: the kernel's ``overlay.origin`` xattr (an encoded file handle of the lower object);
- `ownership`: owners and modes as the layers store them, real or in fuse-overlayfs's override_stat
  xattrs (`DiskOwner`: how copy-up and create give an object its owner and mode);
- `upper`: the writable side as one object (`UpperDir`: workspace, marker style, hardlink index,
  feature xattrs), whose methods are every crash-safe change to the upper dir (create, remove,
  rename, whiteouts, copy-up, redirects, naming an index copy);
- `treecopy`: a directory's whole merged tree copied up, all or nothing (renames without redirects);
- `merged`: the merged namespace and every change to it (async; blocking work in worker threads),
  and the only writer of the node table;
- `workers`: the mount's worker threads, one limit for the tree's blocking calls and the handlers'.

May import `overlayfuse.linux` and `overlayfuse.errors`, and trio; never pyfuse3 nor anything above
(`daemon`, `images`, `containers`, `service`, `ctl`). The node table lives here, not in `daemon`,
because the merged tree keeps it: which node a name leads to is union semantics, and only the
numbers handed to the kernel are a FUSE concern.
"""
