#!/usr/bin/env python
"""Train a 3D segmentation network (IUNet or MONAI UNet) on NIfTI data in the MSD layout.

The job is :mod:`invseg.apps.train_seg3d`, installed as ``invseg-train-seg3d``; this wrapper runs the same ``main``
in a clone (``python scripts/train_seg3d.py --help``).
"""

import sys

from invseg.apps.train_seg3d import main

if __name__ == "__main__":
    sys.exit(main())
