#!/usr/bin/env python
"""Train a classifier of the paper's experiments (ResNet-34-DS on CIFAR-10, MobileNetV2 on ImageNet).

The job is :mod:`invseg.apps.train_classifier`, installed as ``invseg-train-classifier``; this wrapper runs the same ``main``
in a clone (``python scripts/train_classifier.py --help``).
"""

import sys

from invseg.apps.train_classifier import main

if __name__ == "__main__":
    sys.exit(main())
