"""``python -m benchmarks``: the whole bench (see :mod:`benchmarks.run`)."""

import sys

from benchmarks.run import main

sys.exit(main())
