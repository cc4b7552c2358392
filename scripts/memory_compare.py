#!/usr/bin/env python
"""Spectral-normalization memory: invseg ("fft") vs the naive power method vs no SN, 3D IUNet and DS stack.

The job is :mod:`invseg.apps.memory_compare`, installed as ``invseg-memory-compare``; this wrapper runs the same ``main``
in a clone (``python scripts/memory_compare.py --help``).
"""

import sys

from invseg.apps.memory_compare import main

if __name__ == "__main__":
    sys.exit(main())
