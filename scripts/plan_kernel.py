#!/usr/bin/env python
"""Extra memory and time of gem_fast's kernels at one shape, predicted (gem_fast/plan/kernel.py).

The same as the console script ``gem-fast-plan-kernel``: see :mod:`gem_fast.cli.plan_kernel` for the flags.
"""

import sys

from gem_fast.cli.plan_kernel import main

if __name__ == "__main__":
    sys.exit(main())
