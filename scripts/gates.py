#!/usr/bin/env python
"""The gates before SEGA: whether Eq. 1 can guide it on a task, measured on labelled training rows.

The same as the console script ``gem-fast-gates``: see :mod:`gem_fast.cli.gates` for the flags.
"""

import sys

from gem_fast.cli.gates import main

if __name__ == "__main__":
    sys.exit(main())
