"""The installed commands, ``overlayfuse`` and ``overlayctl``: the garbage collector off first.

Every container start runs ``overlayfuse`` and every listing runs ``overlayctl`` in a fresh
interpreter, so what they import is most of their time. Imports make tens of thousands of objects
that live as long as the process, and the cyclic collections they trigger (each full one walks
every object made so far) were ~25 ms of CPU of a ~200 ms daemon start on the 2-core VM (A/B of
the daemon's imports with and without ``gc.disable()``, 21 interleaved runs, load 3.3). So these
entry points turn the collector off before importing anything; the command turns it on again (and
freezes what the imports made, which is never garbage) once its imports are done: `daemon.cli`
after importing the daemon, `ctl` before running the subcommand (both with `collector.collector_on`),
while the fork server (`daemon.forkserver`) keeps it off and freezes its imports, and each daemon it
forks turns it on as `daemon.cli` does.

Here, and not at the top of those modules: a test or a tool that imports them must keep its
collector as it was.
"""

from __future__ import annotations

import gc
import sys


def overlayfuse() -> int:
    gc.disable()
    if sys.argv[1:2] == ["--fork-server"]:
        from .daemon import forkserver

        return forkserver.main(sys.argv[2:])
    # A fork server has the daemon imported already: hand it the mount, before importing anything
    # heavy here (see `daemon.forkclient`). None: no server; mount in this process.
    from .daemon import forkclient

    status = forkclient.run(sys.argv)
    if status is not None:
        return status
    from .daemon.cli import main

    return main()


def overlayctl() -> int:
    gc.disable()
    from .ctl import main

    return main()

