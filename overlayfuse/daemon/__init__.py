"""The FUSE side of the ``overlayfuse`` command: the daemon that serves an `overlay` tree.

- `cli`, `options`: the command line, parsed into a typed `MountOptions` and checked before anything
  is mounted (no trio, no pyfuse3 on that path: see `cli`); `compat`: fuse-overlayfs's own options
  (ID mapping, squash, xattr permissions, fsync...) parsed into a typed `ViewOptions`;
- `owners`: owners as the mount shows them and as callers' ids reach the disk (`compat`'s policy at
  run time; the on-disk override xattrs are `overlay.ownership`'s);
- `fs`: the `pyfuse3.Operations` handlers, and the one place where errors become errno values;
  `handles`: its open file and directory handles; `binding`: what the running pyfuse3 offers
  beyond its stock release (patches/pyfuse3: kernel-cached listings, symlink cache), found at run time;
  `passthrough`: which opens the kernel may serve from the upper file itself (FUSE passthrough);
- `mount`: mount, detach, readiness, signals, unmount; `inuse`: one writable mount per upper dir;
- `forkserver`, `forkclient`: ``overlayfuse --fork-server``, which forks a daemon per mount with the
  imports done once, and the command's side of it (run before anything heavy is imported);
- `notify`, `control`: the service manager's readiness protocol; the control socket that freezes the
  mount for a commit; `readahead`: the mount's readahead window.

May import `overlayfuse.overlay` and `overlayfuse.linux` (and pyfuse3, trio); never `images`,
`containers`, `service` or `ctl`. This ``__init__`` imports nothing, so that parsing options stays
free of trio and pyfuse3.
"""
