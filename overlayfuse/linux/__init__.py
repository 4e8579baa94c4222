"""Linux itself: every raw syscall binding and Linux-specific helper, in one place.

- `syscalls`: libc calls Python's os module lacks (renameat2, sync_file_range, syncfs, umount2,
  name_to_handle_at) and the filesystem-uuid ioctl;
- `nowait`: openat2 with RESOLVE_CACHED and preadv2 with RWF_NOWAIT, for the event loop;
- `sockets`: unix socket addresses, abstract (``@name``) or paths;
- `namespaces`: setns and an fchroot, to enter a caller's namespaces and root by descriptor;
- `peers`: a socket peer's uid and privileges (capabilities, no_new_privs, seccomp, LSM label);
- `mounttable`: /proc/self/mountinfo, /proc/PID parsing, detaching dead FUSE mounts;
- `journal`: log lines journald files under the right priority;
- `ownwrite`: an owner's change to its own read-only object (a ``user.*`` xattr, a directory's move).

The bottom of the package: imports only the standard library (and `overlayfuse.errors`).
"""
