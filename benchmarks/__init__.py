"""Benchmark kernel overlayfs, fuse-overlayfs and overlayfuse on one realistic layer stack.

Run it through `scripts/bench` (which runs scripts/setup first).  It is a benchmark, not a
test: it measures and prints, and asserts nothing about speed.

The stack, built once per run under --workdir:
  l1  bottom layer: a Debian minbase rootfs (`debootstrap --variant=minbase`, cached under
      /var/cache/overlayfuse-bench/RELEASE-minbase), or a generated tree of the same shape
      (--quick, --tiny, --no-debootstrap, or when debootstrap fails); plus opt/bench/big.bin
      (the "big" file, written in full with pseudo-random data, so every byte is real data and
      no extent is skipped by SEEK_DATA) and opt/bench/big2.bin (half as big, for `parallel`).
  l2  second layer: adds, replaces and whites out files (0:0 character devices), whites out a
      few whole directories and has one opaque directory (trusted.overlay.opaque=y): the kernel
      forms, which all three targets read.
Each target mounts `lowerdir=l2:l1` with a fresh upper and work dir for every measured job;
the lowers are shared read-only.  Before anything is timed, every target's merged view is
walked and compared (path, type, permissions, size, symlink target, device number).
"""
