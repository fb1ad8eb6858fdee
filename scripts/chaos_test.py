#!/usr/bin/env python3
"""`make chaos-test`: kill training many times, resume, and prove the result is bit-identical.

See resilient_train.orchestrator for the options (python scripts/chaos_test.py --help).
"""

import sys

from resilient_train.chaos.orchestrator import main

if __name__ == "__main__":
    sys.exit(main())
