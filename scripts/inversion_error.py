#!/usr/bin/env python
"""Inversion error vs K of IUNet cores: reconstruction error per precision, condition, gradient error.

The job is :mod:`invseg.apps.inversion_error`, installed as ``invseg-inversion-error``; this wrapper runs the same ``main``
in a clone (``python scripts/inversion_error.py --help``).
"""

import sys

from invseg.apps.inversion_error import main

if __name__ == "__main__":
    sys.exit(main())
