"""invseg.apps: the main jobs as commands, runnable without a clone of the repository.

Each module has a ``main(argv=None) -> int`` that parses the command line with :mod:`invseg.cli`
(configs, ``--set`` overrides, logging, the exit-code table). A job runs as a console command
installed by ``pip install``, as ``python -m invseg.apps.<module>``, or as ``python scripts/<module>.py``
in a clone (a thin wrapper calling the same ``main``)::

    invseg-train-seg3d        train_seg3d        3D segmentation training (IUNet or MONAI UNet)
    invseg-predict-seg3d      predict_seg3d      label volumes from a checkpoint
    invseg-compare-seg3d      compare_seg3d      IUNet (+SN), IUNet (no SN), MONAI UNet side by side
    invseg-train-classifier   train_classifier   the paper's classification training
    invseg-inversion-error    inversion_error    inversion error vs K
    invseg-memory-compare     memory_compare     SN memory: invseg vs the naive power method vs none

The shipped configs are found from the package (``--config seg3d_synthetic``, ``--list-configs``).
"""

#: console command -> module of invseg.apps (the [project.scripts] table of pyproject.toml lists the same)
COMMANDS = {
    "invseg-train-seg3d": "train_seg3d",
    "invseg-predict-seg3d": "predict_seg3d",
    "invseg-compare-seg3d": "compare_seg3d",
    "invseg-train-classifier": "train_classifier",
    "invseg-inversion-error": "inversion_error",
    "invseg-memory-compare": "memory_compare",
}
