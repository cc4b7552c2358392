"""invseg: memory-efficient invertible U-Nets from spectrally normalized depthwise-separable convs.

Sub-packages (dependencies point downwards only)::

    utils        leaf module: argument checks, tuples, the 1/2/3-D op dispatch, the precision names
    spectral     pure functions: depthwise FFT bound, pointwise power method, reference norms
    layers       SN depthwise / pointwise / DS conv and Linear modules, spectral-state updates
    blocks       invertible couplings, residual blocks, orthogonal resampling, memory-efficient backward,
                 and the inversion checkers (blocks.inversion: reconstruction, condition, gradient error)
    nets         IUNet, MobileNetV2, ResNet34DS, DSStack, MONAI's UNet and a name registry
    data         Decathlon/NIfTI, synthetic 3D data, MNI152, CIFAR-10 pickles, ImageNet folders
    train        the one training step (train.step), training engines, checkpoints, distributed helpers
    analysis     checkers: measured step memory and time, SN overhead and certificate slack, bound accuracy
    experiments  the drivers of the README's experiments: sweeps, tables, CSV, plots (nothing imports them)
    apps         the main jobs as commands (invseg-train-seg3d, ...); invseg.cli: configs, overrides, exit codes

``train`` never imports ``analysis`` or ``experiments``; ``analysis`` measures the step of ``train.step``.

Importing invseg has no global side effects (no warning filters, no seeding, no threads).
"""

__version__ = "0.1.0"
