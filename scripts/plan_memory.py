#!/usr/bin/env python
"""Per-GPU peak memory of a gem_fast training step, naive loss vs fused, before renting the GPUs.

The same as the console script ``gem-fast-plan-memory``: see :mod:`gem_fast.cli.plan_memory` for the flags.
"""

import sys

from gem_fast.cli.plan_memory import main

if __name__ == "__main__":
    sys.exit(main())
