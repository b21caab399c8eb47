#!/usr/bin/env python
"""Convert a preference dataset to gem_fast train/test JSONL pairs, split by prompt.

The same as the console script ``gem-fast-prepare``: see :mod:`gem_fast.cli.prepare_data` for the flags.
"""

import sys

from gem_fast.cli.prepare_data import main

if __name__ == "__main__":
    sys.exit(main())
