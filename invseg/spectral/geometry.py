"""Geometry of a depthwise conv and the candidate grids of its DFT bound (DESIGN §1a, §1b).

:func:`depthwise_geometry` validates the arguments of a bound once; :func:`candidate_grids` lists the grids ``M``
whose circulant embedding bounds the zero-padded conv (the paper's ``M = N + 2p`` and the smallest other multiples
of the stride that are ``>= N + p``); :func:`fold_strides` says on which axes a stride is folded exactly by the
aliasing formula. The bound itself: :mod:`invseg.spectral.depthwise`.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from invseg.utils import check_int, int_tuple, weight_spatial_dims

__all__ = [
    "DepthwiseGeometry",
    "depthwise_geometry",
    "DEFAULT_WORK_BUDGET",
    "grids_per_axis",
    "candidate_grids",
    "fold_strides",
]

#: Default number of candidate grids per axis, by number of spatial dims (the product is searched).
_DEFAULT_GRIDS = {1: 8, 2: 6, 3: 3}


@dataclass(frozen=True)
class DepthwiseGeometry:
    """Validated geometry of a depthwise conv (all tuples have one entry per spatial axis).

    Attributes:
        channels: number of filters C.
        kernel: kernel size k.
        input_size: input spatial size N.
        stride: stride s.
        padding: padding p (zeros or circular).
        dilation: dilation δ.
        mode: ``"zeros"`` (zero padding) or ``"circular"``.
    """

    channels: int
    kernel: tuple[int, ...]
    input_size: tuple[int, ...]
    stride: tuple[int, ...]
    padding: tuple[int, ...]
    dilation: tuple[int, ...]
    mode: str

    @property
    def spatial_dims(self) -> int:
        return len(self.kernel)

    @property
    def effective_kernel(self) -> tuple[int, ...]:
        return tuple(d * (k - 1) + 1 for k, d in zip(self.kernel, self.dilation))

    @property
    def output_size(self) -> tuple[int, ...]:
        return tuple(
            (n + 2 * p - ke) // s + 1
            for n, p, ke, s in zip(self.input_size, self.padding, self.effective_kernel, self.stride)
        )


def depthwise_geometry(
    weight: torch.Tensor,
    input_size: int | Sequence[int],
    stride: int | Sequence[int] = 1,
    padding: int | Sequence[int] | None = None,
    dilation: int | Sequence[int] = 1,
    mode: str = "zeros",
) -> DepthwiseGeometry:
    """Validate the arguments of a depthwise bound and return its geometry.

    Raises:
        ValueError: wrong weight shape, input smaller than the (dilated, padded) kernel, padding outside
            ``[0, k_eff - 1]``, non-positive stride/dilation, or an unknown mode — naming the value.
    """
    d = weight_spatial_dims(weight)
    if weight.shape[1] != 1:
        raise ValueError(
            f"a depthwise weight must have shape (C, 1, *kernel), got {tuple(weight.shape)} "
            "(dim 1 must be 1: one filter per channel)"
        )
    if mode not in ("zeros", "circular"):
        raise ValueError(f"mode must be 'zeros' or 'circular', got {mode!r}")
    kernel = tuple(int(k) for k in weight.shape[2:])
    n = int_tuple(input_size, d, "input_size", minimum=1)
    s = int_tuple(stride, d, "stride", minimum=1)
    dil = int_tuple(dilation, d, "dilation", minimum=1)
    k_eff = tuple(dl * (k - 1) + 1 for k, dl in zip(kernel, dil))
    p = tuple((ke - 1) // 2 for ke in k_eff) if padding is None else int_tuple(padding, d, "padding", minimum=0)
    for a in range(d):
        if p[a] > k_eff[a] - 1:
            raise ValueError(
                f"padding must be <= k_eff - 1 = {k_eff[a] - 1} on axis {a} (kernel {kernel[a]}, dilation "
                f"{dil[a]}), got padding {p}"
            )
        if mode == "zeros" and n[a] + 2 * p[a] < k_eff[a]:
            raise ValueError(
                f"input_size {n} is smaller than the kernel on axis {a}: N + 2p = {n[a] + 2 * p[a]} < "
                f"effective kernel size {k_eff[a]} (the convolution would have an empty output)"
            )
        if mode == "circular" and p[a] > n[a]:
            raise ValueError(f"circular padding {p[a]} exceeds input_size {n[a]} on axis {a}")
        if mode == "circular" and ((n[a] + 2 * p[a] - k_eff[a]) // s[a]) * s[a] >= n[a]:
            raise ValueError(
                f"circular padding {p[a]} on axis {a} gives more output rows than input_size {n[a]} (kernel "
                f"{kernel[a]}, stride {s[a]}): rows of the circulant repeat and max|Θ̂| is no bound; use "
                f"2p <= k_eff - 1 = {k_eff[a] - 1}"
            )
    return DepthwiseGeometry(int(weight.shape[0]), kernel, n, s, p, dil, mode)


#: Work budget (spectrum points, summed over channels and grids) that caps the default number of grids.
DEFAULT_WORK_BUDGET = 2**18


def grids_per_axis(geom: DepthwiseGeometry, grids: int | None = None) -> int:
    """Number of candidate grids per axis: ``grids`` if given, else the default for the dimension
    (8/6/3 for 1/2/3 dims), lowered until ``C · Π_a(g · M_a)`` spectrum points fit
    :data:`DEFAULT_WORK_BUDGET` (at least 1). Large inputs and wide layers therefore use one grid, the
    paper's ``M = N + 2p``: the gain of more grids shrinks like ``1/N`` while their cost grows like
    ``g^d``, and the search runs once per optimization step."""
    if geom.mode == "circular":
        return 1
    if grids is not None:
        return check_int(grids, "grids")
    g = _DEFAULT_GRIDS[geom.spatial_dims]
    while g > 1 and geom.channels * math.prod(g * (n + p + g) for n, p in zip(geom.input_size, geom.padding)) > DEFAULT_WORK_BUDGET:
        g -= 1
    return g


def candidate_grids(geom: DepthwiseGeometry, grids: int | None = None) -> list[tuple[int, ...]]:
    """The grids ``M`` searched for ``geom``: per axis ``g`` candidates (zeros; ``g`` from
    :func:`grids_per_axis`) — the paper's grid ``N + 2p`` and the smallest other multiples of ``s`` that are
    ``>= N + p`` — or exactly ``N`` (circular); all combinations over axes."""
    if geom.mode == "circular":
        return [geom.input_size]
    return list(itertools.product(*_grid_sizes(geom, grids_per_axis(geom, grids))))


def _grid_sizes(geom: DepthwiseGeometry, g: int) -> list[list[int]]:
    if geom.mode == "circular":
        return [[n] for n in geom.input_size]
    out = []
    for n, p, s in zip(geom.input_size, geom.padding, geom.stride):
        # The paper's grid N + 2p (rounded up to a multiple of s) is always a candidate, so the minimum is
        # never looser than the paper's bound; the other g - 1 candidates are the smallest valid grids.
        paper = -(-(n + 2 * p) // s) * s
        first = -(-(n + p) // s) * s  # smallest multiple of s that is >= N + p
        others = [m for m in (first + i * s for i in range(g)) if m != paper][: g - 1]
        out.append(sorted([paper] + others))
    return out


def _fold_strides(geom: DepthwiseGeometry, grid: Sequence[int]) -> tuple[int, ...]:
    # The exact fold needs s | M. In circular mode M = N is fixed; where s does not divide N the
    # subsampling on that axis is bounded by 1 (a row restriction) and the axis is treated as unit stride.
    return tuple(s if m % s == 0 else 1 for s, m in zip(geom.stride, grid))


def fold_strides(geom: DepthwiseGeometry) -> tuple[int, ...]:
    """The per-axis strides folded exactly by the aliasing formula (see :mod:`invseg.spectral.search`)."""
    if geom.mode == "circular":
        return tuple(s if n % s == 0 else 1 for s, n in zip(geom.stride, geom.input_size))
    return geom.stride
