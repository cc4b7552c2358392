#!/usr/bin/env python
"""IUNet (+SN), IUNet without SN and MONAI's UNet side by side on the same 3D data, patch and steps.

The job is :mod:`invseg.apps.compare_seg3d`, installed as ``invseg-compare-seg3d``; this wrapper runs the same ``main``
in a clone (``python scripts/compare_seg3d.py --help``).
"""

import sys

from invseg.apps.compare_seg3d import main

if __name__ == "__main__":
    sys.exit(main())
