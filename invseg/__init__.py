"""invseg: memory-efficient invertible U-Nets from spectrally normalized depthwise-separable convs.

Sub-packages (dependencies point downwards only)::

    spectral  pure functions: depthwise FFT bound, pointwise power method, reference norms
    layers    SN depthwise / pointwise / DS conv and Linear modules, spectral-state updates
    blocks    invertible couplings, residual blocks, orthogonal resampling, memory-efficient backward
    nets      IUNet, MobileNetV2, ResNet34DS and a name registry
    data      Decathlon/NIfTI, synthetic 3D data, CIFAR-10 pickles, ImageNet folders
    train     training engines, checkpoints, distributed helpers
    analysis  inversion error, bound accuracy, memory and time measurements
    apps      the main jobs as commands (invseg-train-seg3d, ...); invseg.cli: configs, overrides, exit codes

Importing invseg has no global side effects (no warning filters, no seeding, no threads).
"""

__version__ = "0.1.0"
