"""IUNet: a fully invertible U-Net core (Etmann et al. 2020, "iUNet") with SN DS-conv couplings."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from invseg.blocks import (
    ACTIVATIONS,
    AdditiveCoupling,
    AffineCoupling,
    ChannelMerge,
    ChannelSplit,
    InvertibleChannelMixing,
    InvertibleModule,
    InvertibleResidual,
    InvertibleSequence,
    OrthogonalDownsample,
    OrthogonalUpsample,
    RESAMPLING_INITS,
    sn_ds_subnet,
)
from invseg.blocks.subnet import DEFAULT_K
from invseg.layers import METHODS, SCALINGS
from invseg.layers.base import check_mode
from invseg.nets.registry import register_model
from invseg.utils import (
    check_int,
    check_ints,
    check_spatial_dims,
    conv_module,
    conv_transpose_module,
    instance_norm_module,
    is_int,
)

__all__ = ["IUNet", "COUPLINGS", "iunet_channel_plan"]

#: Block types of the invertible core.
COUPLINGS = ("additive", "affine", "residual")


def iunet_channel_plan(spatial_dims: int, channels: Sequence[int]) -> list[tuple[int, int]]:
    """Skip/continue channel split of every level but the last of an IUNet.

    Going down from level ``i`` (``channels[i]`` channels) the features are split into a skip part
    kept for the up path and a part that is downsampled invertibly, which multiplies its channels by
    ``2**spatial_dims``. Hence ``channels[i + 1]`` must be a multiple of ``2**spatial_dims`` and
    ``r_i = channels[i + 1] / 2**spatial_dims`` must satisfy ``1 <= r_i < channels[i]``; the skip
    keeps ``channels[i] - r_i`` channels. The classic iUNet halving is
    ``channels[i + 1] = channels[i] * 2**spatial_dims / 2`` (2D: x2 per level, 3D: x4).

    Returns:
        ``[(skip_channels, down_channels), ...]`` for levels ``0 .. len(channels) - 2``.

    Raises:
        ValueError: naming the offending entry and the rule.
    """
    f = 2**spatial_dims
    plan = []
    for i in range(len(channels) - 1):
        c, nxt = channels[i], channels[i + 1]
        if nxt % f:
            raise ValueError(
                f"channels[{i + 1}] must be a multiple of 2**spatial_dims = {f} (invertible downsampling "
                f"multiplies channels by {f}), got {nxt}"
            )
        r = nxt // f
        if not r < c:
            raise ValueError(
                f"channels[{i + 1}] / {f} = {r} channels continue down from level {i}, which must be fewer than "
                f"channels[{i}] = {c} (the rest is the skip connection); e.g. channels[{i + 1}] = {c * f // 2}"
            )
        plan.append((c - r, r))
    return plan


@register_model("iunet")
class IUNet(nn.Module):
    """Invertible U-Net for 1D/2D/3D segmentation: input conv -> invertible core -> 1x1 head.

    The core follows iUNet (Etmann et al. 2020): at level ``i`` there are ``num_blocks[i]`` invertible
    blocks at ``channels[i]`` channels; going down, a channel split keeps a skip part and the rest is
    downsampled by a learnable orthogonal stride-2 transform (channels x ``2**spatial_dims``, see
    :func:`iunet_channel_plan`); going up, the orthogonal upsampling and the concatenation with the
    skip undo this, followed by ``num_blocks[i]`` more blocks per level (the bottom level has one
    set). The core maps ``(B, channels[0], *N)`` to the same shape and is invertible as a whole:
    ``model.core.forward`` / ``model.core.inverse``. The input layer (a ``3**d`` conv,
    ``in_channels -> channels[0]``) and the head (a 1x1 conv to ``out_channels`` logits) are not
    invertible.

    Blocks (``coupling``): ``"additive"`` / ``"affine"`` one-sided couplings whose sub-networks are two
    SN DS convs (:class:`~invseg.blocks.SNDSSubnet`, Lipschitz <= ``K``), alternating the transformed
    half and followed by an orthogonal channel mixing (``channel_mixing``); or ``"residual"``
    i-ResNet blocks ``x + g(x)`` with ``Lip(g) <= K < 1`` (fixed-point inverse).

    Memory: with ``memory_efficient=True`` the core is one
    :class:`~invseg.blocks.InvertibleSequence` whose backward rebuilds activations by inversion, so
    activation memory does not grow with ``num_blocks`` (it keeps the core output, the input and
    head activations, and during backward the skip tensors and one block's graph); the step costs
    about one extra forward of the core. ``memory_efficient=False`` is plain autograd through the
    same modules. Spectral state: call :func:`invseg.layers.update_spectral_state` after each
    optimizer step (or :func:`invseg.layers.attach_spectral_update`); ``sn_method="torch"`` updates in
    every forward and gives wrong gradients with ``memory_efficient=True`` (baseline only, DESIGN §1f).

    Args:
        spatial_dims: 1, 2 or 3.
        in_channels: input channels (>= 1).
        out_channels: output channels / classes of the logits (>= 1).
        channels: channels per level, e.g. ``(16, 32, 64)`` in 2D or ``(8, 32, 128)`` in 3D; the
            number of levels is ``len(channels)``; see :func:`iunet_channel_plan` for the rule.
            Couplings need even channels.
        num_blocks: blocks per level and per path (int or one per level). Default 2. A level other
            than the bottom one may have 0 blocks: it then only splits its skip part off and
            resamples (e.g. ``(0, 2, 2)`` leaves the full resolution to the input layer and head).
        coupling: ``"additive"`` (default), ``"affine"`` or ``"residual"``.
        K: Lipschitz bound of each sub-network (> 0; < 1 for residual blocks). Default
            :data:`invseg.blocks.subnet.DEFAULT_K` (0.9, valid for every block type).
        scaling: ``"hard"`` (default) or ``"soft"`` Lipschitz scaling.
        sn_method: ``"fft"`` (default), ``"naive"``, ``"torch"`` or ``"none"`` (not for residual).
        sn_mode: ``"reparam"`` (default) or ``"project"`` (the paper's protocol: weights rescaled in place
            after every optimizer step; see :mod:`invseg.layers.base`).
        memory_efficient: recompute activations by inversion in backward. Default True.
        hidden_channels: width inside the sub-networks: one int for every level, one per level, or
            None (default: the sub-network's larger side, i.e. half the level's channels for additive
            couplings).
        input_norm: normalise the input layer's output per channel and volume (``InstanceNorm``
            with affine parameters) before the core. Makes the net insensitive to the input's scale
            and offset, as the normalisation layers of a conventional U-Net do. Default False.
        head_channels: ``None`` (default): the head is one 1x1 conv; an int: a conv to this width
            (kernel ``head_kernel``), the activation, and a 1x1 conv to the logits.
        head_kernel: kernel of the head's first conv (odd, default 1). A 3 lets every voxel's logits
            see its neighbourhood at full resolution, as the last conv of a conventional U-Net does.
        stem_channels: ``None`` (default): the input layer is one 3**d conv to ``channels[0]``; an
            int: a 3**d conv to this width, InstanceNorm, the activation, and a 3**d conv to
            ``channels[0]`` -- a small non-invertible stem at full resolution (its activations are
            kept for the backward).
        stem_stride: stride of the input layer's first conv (1 or 2, default 1). With 2 the
            invertible core runs at half resolution and the head upsamples back with a 3**d
            transposed conv of stride 2 (as the last layer of MONAI's UNet): full-resolution work
            shrinks to the first conv and the head; inputs must then be multiples of
            ``2 * 2**(levels - 1)``.
        kernel_size: depthwise kernel size of the sub-networks (odd). Default 3.
        activation: nonlinearity of the sub-networks (key of :data:`invseg.blocks.ACTIVATIONS`).
        channel_mixing: orthogonal 1x1 channel mixing after every block. Default True.
        resampling_init: ``"haar"`` (default) or ``"squeeze"``.
        affine_clamp: bound of the affine log-scale. Default 2.0.
        residual_tol, residual_max_iter: fixed-point inverse settings. Defaults 1e-6, 200.

    Input: ``(B, in_channels, *N)`` with every ``N_j`` a multiple of ``2**(len(channels) - 1)``
    (ValueError naming the multiple otherwise). Output: logits ``(B, out_channels, *N)``.
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        out_channels: int,
        channels: Sequence[int],
        num_blocks: int | Sequence[int] = 2,
        coupling: str = "additive",
        K: float = DEFAULT_K,
        scaling: str = "hard",
        sn_method: str = "fft",
        sn_mode: str = "reparam",
        memory_efficient: bool = True,
        hidden_channels: int | Sequence[int] | None = None,
        kernel_size: int = 3,
        activation: str = "leaky_relu",
        channel_mixing: bool = True,
        resampling_init: str = "haar",
        affine_clamp: float = 2.0,
        residual_tol: float = 1e-6,
        residual_max_iter: int = 200,
        input_norm: bool = False,
        head_channels: int | None = None,
        head_kernel: int = 1,
        stem_channels: int | None = None,
        stem_stride: int = 1,
    ) -> None:
        super().__init__()
        check_spatial_dims(spatial_dims)
        check_int(in_channels, "in_channels")
        check_int(out_channels, "out_channels")
        channels = check_ints(tuple(channels), "channels")
        levels = len(channels)
        blocks = (num_blocks,) * levels if is_int(num_blocks) else tuple(num_blocks)
        if len(blocks) != levels or any(not is_int(b) or b < 0 for b in blocks) or blocks[-1] < 1:
            raise ValueError(
                f"num_blocks must be a positive int or {levels} ints >= 0 (one per level; the bottom level needs "
                f"at least one block), got {num_blocks!r}"
            )
        if coupling not in COUPLINGS:
            raise ValueError(f"coupling must be one of {COUPLINGS}, got {coupling!r}")
        if coupling in ("additive", "affine"):
            odd = [(i, c) for i, c in enumerate(channels) if c % 2 or c < 2]
            if odd:
                i, c = odd[0]
                raise ValueError(f"channels must be even for a coupling split, got channels[{i}] = {c}")
        if coupling == "residual":
            if not 0 < K < 1:
                raise ValueError(f"K must satisfy 0 < K < 1 for residual blocks, got {K}")
            if sn_method == "none":
                raise ValueError(
                    "coupling='residual' needs spectral normalization (Lip(g) <= K < 1), got sn_method='none'"
                )
        if not K > 0:
            raise ValueError(f"K must be > 0, got {K}")
        if scaling not in SCALINGS:
            raise ValueError(f"scaling must be one of {SCALINGS}, got {scaling!r}")
        if sn_method not in METHODS:
            raise ValueError(f"sn_method must be one of {METHODS}, got {sn_method!r}")
        check_mode(sn_mode, sn_method)
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
        if resampling_init not in RESAMPLING_INITS:
            raise ValueError(f"resampling_init must be one of {RESAMPLING_INITS}, got {resampling_init!r}")
        if hidden_channels is None or isinstance(hidden_channels, int):
            hidden = (hidden_channels,) * levels
        else:
            hidden = tuple(hidden_channels)
        if len(hidden) != levels or any(h is not None and (not is_int(h) or h < 1) for h in hidden):
            raise ValueError(
                f"hidden_channels must be None, a positive int or {levels} positive ints (one per level), "
                f"got {hidden_channels!r}"
            )
        check_int(head_channels, "head_channels", allow_none=True)
        check_int(stem_channels, "stem_channels", allow_none=True)
        if stem_stride not in (1, 2):
            raise ValueError(f"stem_stride must be 1 or 2, got {stem_stride!r}")
        if not (is_int(head_kernel) and head_kernel >= 1 and head_kernel % 2 == 1):
            raise ValueError(f"head_kernel must be an odd positive int (same padding), got {head_kernel!r}")
        plan = iunet_channel_plan(spatial_dims, channels)

        self.spatial_dims = spatial_dims
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.channels = channels
        self.num_blocks = blocks
        self.coupling = coupling
        self.size_multiple = stem_stride * 2 ** (levels - 1)
        self.stem_stride = stem_stride

        def level(c: int, n: int, width: int | None) -> InvertibleSequence:
            subnet = sn_ds_subnet(
                spatial_dims,
                hidden_channels=width,
                K=K,
                scaling=scaling,
                sn_method=sn_method,
                sn_mode=sn_mode,
                kernel_size=kernel_size,
                activation=activation,
            )
            steps: list[InvertibleModule] = []
            for j in range(n):
                if coupling == "additive":
                    steps.append(AdditiveCoupling(c, subnet, reverse=j % 2 == 1))
                elif coupling == "affine":
                    steps.append(AffineCoupling(c, subnet, reverse=j % 2 == 1, clamp=affine_clamp))
                else:
                    steps.append(InvertibleResidual(c, subnet, K=K, tol=residual_tol, max_iter=residual_max_iter))
                if channel_mixing:
                    steps.append(InvertibleChannelMixing(spatial_dims, c))
            # nested sequences run plainly: the core's backward walks into them step by step
            return InvertibleSequence(steps, memory_efficient=False)

        core: list[InvertibleModule] = []
        for i in range(levels):  # down path (the last level is the bottom)
            if blocks[i]:  # a level may have no blocks: then only its skip split and resampling remain
                core.append(level(channels[i], blocks[i], hidden[i]))
            if i < levels - 1:
                skip, down = plan[i]
                core += [ChannelSplit(skip), OrthogonalDownsample(spatial_dims, down, init=resampling_init)]
        for i in reversed(range(levels - 1)):  # up path
            skip, _ = plan[i]
            core += [OrthogonalUpsample(spatial_dims, channels[i + 1], init=resampling_init), ChannelMerge(skip)]
            if blocks[i]:
                core.append(level(channels[i], blocks[i], hidden[i]))

        conv = conv_module(spatial_dims)
        norm = instance_norm_module(spatial_dims)
        if stem_channels is None:
            self.input_layer: nn.Module = conv(in_channels, channels[0], kernel_size=3, padding=1, stride=stem_stride,
                                               bias=not input_norm)  # a norm follows: no bias before it
        else:
            self.input_layer = nn.Sequential(
                # no bias before the norm: it would be removed by it (its gradient is rounding noise that
                # Adam amplifies into real steps)
                conv(in_channels, stem_channels, kernel_size=3, padding=1, stride=stem_stride, bias=False),
                norm(stem_channels, affine=True), ACTIVATIONS[activation](),
                conv(stem_channels, channels[0], kernel_size=3, padding=1))
        if input_norm:
            self.input_layer = nn.Sequential(self.input_layer, norm(channels[0], affine=True))
        self.core = InvertibleSequence(core, memory_efficient=memory_efficient)

        def head_in(width: int) -> nn.Module:
            if stem_stride == 1:
                return conv(channels[0], width, kernel_size=head_kernel, padding=head_kernel // 2)
            return conv_transpose_module(spatial_dims)(channels[0], width, kernel_size=3, stride=stem_stride, padding=1,
                          output_padding=stem_stride - 1)

        if head_channels is None:
            self.head: nn.Module = head_in(out_channels)
        else:
            self.head = nn.Sequential(head_in(head_channels), ACTIVATIONS[activation](),
                                      conv(head_channels, out_channels, kernel_size=1))

    @property
    def memory_efficient(self) -> bool:
        """Whether the core recomputes its activations by inversion in backward."""
        return self.core.memory_efficient

    @memory_efficient.setter
    def memory_efficient(self, value: bool) -> None:
        self.core.memory_efficient = bool(value)

    def check_input(self, x: Tensor) -> None:
        """Raise ValueError unless ``x`` is ``(B, in_channels, *N)`` with N divisible by the multiple."""
        d = self.spatial_dims
        if x.ndim != d + 2 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"IUNet expects input (B, {self.in_channels}, *spatial) with {d} spatial dims, got {tuple(x.shape)}"
            )
        m = self.size_multiple
        if any(s % m for s in x.shape[2:]):
            why = f"2**(levels - 1) = {m} for {len(self.channels)} levels"
            if self.stem_stride > 1:
                why = f"stem_stride * 2**(levels - 1) = {m} for {len(self.channels)} levels"
            raise ValueError(
                f"every spatial size must be a multiple of {why}, got spatial size {tuple(x.shape[2:])}; pad or "
                "crop the input"
            )

    def forward(self, x: Tensor) -> Tensor:
        """``(B, in_channels, *N) -> (B, out_channels, *N)`` logits.

        With ``memory_efficient`` and a stem or a two-layer head, these full-resolution layers are
        recomputed in backward (``torch.utils.checkpoint``) instead of keeping their activations:
        the step then keeps no full-resolution tensor wider than ``channels[0]``.
        """
        self.check_input(x)
        if self.memory_efficient and torch.is_grad_enabled():
            h = self._maybe_checkpoint(self.input_layer, x)
            return self._maybe_checkpoint(self.head, self.core(h))
        return self.head(self.core(self.input_layer(x)))

    @staticmethod
    def _maybe_checkpoint(module: nn.Module, x: Tensor) -> Tensor:
        if not isinstance(module, nn.Sequential):  # a single conv keeps only its input: nothing to save
            return module(x)
        return checkpoint(module, x, use_reentrant=False)

    def extra_repr(self) -> str:
        return (
            f"spatial_dims={self.spatial_dims}, channels={self.channels}, num_blocks={self.num_blocks}, "
            f"coupling={self.coupling!r}, memory_efficient={self.memory_efficient}"
        )
