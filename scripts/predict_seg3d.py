#!/usr/bin/env python
"""Segment NIfTI volumes with a trained checkpoint; writes <name>_seg.nii.gz with the input's affine.

The job is :mod:`invseg.apps.predict_seg3d`, installed as ``invseg-predict-seg3d``; this wrapper runs the same ``main``
in a clone (``python scripts/predict_seg3d.py --help``).
"""

import sys

from invseg.apps.predict_seg3d import main

if __name__ == "__main__":
    sys.exit(main())
