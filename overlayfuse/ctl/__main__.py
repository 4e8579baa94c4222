"""``python -m overlayfuse.ctl``: the ``overlayctl`` command without its console script."""

import sys

from . import main

sys.exit(main())
