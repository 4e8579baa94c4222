"""Stress overlayfuse with concurrent namespace changes and check that it never answers wrongly.

Run it through `scripts/stress` (which runs scripts/setup first).  It builds two lower layers
in a scratch dir, mounts overlayfuse on them with an empty upper dir, and runs worker processes
of nine kinds against the mount for --seconds: listers, staters, readers, writers, renamers,
exchangers (renameat2 RENAME_EXCHANGE, a file with a directory among others), linkers,
unlinkers and dirmakers (mkdir/rmdir).

Every name in the tree belongs to a class fixed by its first letter (names.py), so each
failed call can be judged on its own: ENOENT is always a legitimate outcome of a race, but
ENOTDIR from `lstat("d0/d1/f3")` is not, because `d0` and `d0/d1` are directories whenever they
exist.  The parent process never touches the mount itself (only killable children do), so a
hung daemon fails the run instead of freezing it.
"""
