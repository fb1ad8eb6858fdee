"""``python -m resilient_train.chaos``: the chaos proof (see :mod:`.orchestrator`)."""

import sys

from .orchestrator import main

sys.exit(main())
