#!/usr/bin/env python
"""The GEM paper's ablation as one command (SFT only, full GEM, w/o terminal entropy, w/o branching entropy,
Cognitive Filtering + DPO, shuffled control) on the same held-out pairs.

The same as the console script ``gem-fast-ablation``: see :mod:`gem_fast.cli.ablation` for the flags.
"""

import sys

from gem_fast.cli.ablation import main

if __name__ == "__main__":
    sys.exit(main())
