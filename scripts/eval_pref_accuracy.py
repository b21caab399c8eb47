#!/usr/bin/env python
"""Preference accuracy of a causal LM on a JSONL file of pairs, with the implicit reward β·log π(a|q).

The same as the console script ``gem-fast-eval``: see :mod:`gem_fast.cli.eval_pref_accuracy` for the flags.
"""

import sys

from gem_fast.cli.eval_pref_accuracy import main

if __name__ == "__main__":
    sys.exit(main())
