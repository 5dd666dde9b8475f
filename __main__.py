"""`python -m mochi_xdit ...`: the same command line as the `mochi-xdit` console script."""

import sys

from .cli import main

sys.exit(main())
