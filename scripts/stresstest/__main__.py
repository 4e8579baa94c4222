"""`python -m stresstest`: what scripts/stress runs."""

import sys

from .cli import main

sys.exit(main(sys.argv[1:]))
