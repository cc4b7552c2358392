"""Measured memory of a 3D IUNet vs network depth, beside MONAI's UNet (``scripts/bench_memory.py``).

A 3D IUNet with memory-efficient recomputation, the same IUNet with plain autograd, and MONAI's ``UNet``
with the same channels, over network depths and volume sizes, each training step measured in a fresh
process (:func:`invseg.analysis.measure_step`; the runner and records are those of
:mod:`invseg.experiments.memory_compare`). ``depth`` is the number of invertible blocks of the IUNet core in
total (distributed over the levels by :func:`split_blocks`); MONAI's UNet gets about as many conv units
(:func:`monai_res_units`).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from invseg.experiments.memory_compare import (
    _IUNET_FACTORY,
    _POST_STEP,
    MeasureConfig,
    MemoryCase,
    MemoryRecord,
    _check_measure,
    _check_positive_list,
    _check_sizes,
    _effective_sizes,
    _figure,
    _fmt,
    _fmt_ratio,
    _iunet_levels,
    _ratio,
    _spec,
)

__all__ = [
    "DEPTH_NETWORKS",
    "DepthSweepConfig",
    "split_blocks",
    "monai_res_units",
    "depth_sweep_cases",
    "depth_summary",
    "format_depth_table",
    "plot_depth_sweep",
]

_MONAI_FACTORY = "monai.networks.nets:UNet"


DEPTH_NETWORKS = ("iunet", "iunet_plain", "monai_unet")


@dataclass
class DepthSweepConfig:
    """Peak memory and time of a training step vs network depth (issue 3, ``scripts/bench_memory.py``)."""

    depths: list[int] = field(default_factory=lambda: [5, 10, 20, 30])  # invertible blocks of the core in total
    sizes: list[int] = field(default_factory=lambda: [32])  # cubic volume edges (CPU)
    cuda_sizes: list[int] | None = field(default_factory=lambda: [32, 64, 128])  # edges on cuda (None: sizes)
    batch_size: int = 1  # volumes per step
    networks: list[Literal["iunet", "iunet_plain", "monai_unet"]] = field(
        default_factory=lambda: ["iunet", "iunet_plain", "monai_unet"]
    )  # iunet: memory-efficient; iunet_plain: same net, plain autograd; monai_unet: MONAI UNet
    channels: list[int] = field(default_factory=lambda: [8, 32])  # channels per level (all networks)
    coupling: Literal["additive", "affine"] = "additive"  # IUNet coupling
    K: float = 0.9  # IUNet sub-network Lipschitz bound
    sn_method: Literal["fft", "naive", "torch", "none"] = "fft"  # IUNet spectral normalization
    in_channels: int = 1  # input channels
    out_channels: int = 2  # classes (cross-entropy on random labels)
    measure: MeasureConfig = field(default_factory=MeasureConfig)  # measurement settings
    out_dir: str = "outputs/bench_memory"  # results.json, config.yaml, depth_sweep.png

    def effective_sizes(self) -> list[int]:
        """``cuda_sizes`` on CUDA when set, else ``sizes``."""
        return _effective_sizes(self.measure.device, self.sizes, self.cuda_sizes)


def split_blocks(depth: int, levels: int) -> list[int]:
    """Blocks per level of an IUNet core with ``depth`` invertible blocks in total.

    A level above the bottom appears twice in the core (down and up path), the bottom once, so
    ``depth == 2 * sum(n[:-1]) + n[-1]``. The blocks are spread as evenly as possible: every level gets
    ``depth // (2 * levels - 1)``, an odd remainder adds one to the bottom, the rest one per upper level
    from the top. E.g. two levels: 5 -> [2, 1], 10 -> [3, 4], 20 -> [7, 6], 30 -> [10, 10].

    Raises:
        ValueError: ``levels < 1`` or ``depth < 2 * levels - 1`` (every level needs a block).
    """
    if isinstance(levels, bool) or not isinstance(levels, int) or levels < 1:
        raise ValueError(f"levels must be a positive int, got {levels!r}")
    slots = 2 * levels - 1
    if isinstance(depth, bool) or not isinstance(depth, int) or depth < slots:
        raise ValueError(f"depth must be an int >= 2 * levels - 1 = {slots} (one block per level and path), "
                         f"got {depth!r}")
    base, rem = divmod(depth, slots)
    blocks = [base] * levels
    if rem % 2:
        blocks[-1] += 1
        rem -= 1
    for i in range(rem // 2):  # rem // 2 <= levels - 1
        blocks[i] += 1
    return blocks


def monai_res_units(depth: int, levels: int) -> int:
    """``num_res_units`` giving MONAI's ``UNet`` about ``depth`` residual sub-units (convs).

    MONAI's UNet has ``levels * num_res_units`` sub-units on the way down (bottom included) and
    ``levels - 1`` on the way up (plus the transposed convs), so ``num_res_units =
    max(1, round((depth - (levels - 1)) / levels))``.
    """
    split_blocks(depth, levels)  # same validation
    return max(1, int(math.floor((depth - (levels - 1)) / levels + 0.5)))


def depth_sweep_cases(cfg: DepthSweepConfig) -> list[MemoryCase]:
    """The grid of :class:`DepthSweepConfig`: sizes x depths x networks, batch ``cfg.batch_size``.

    Raises:
        ValueError: on an empty/invalid list, a depth below ``2 * levels - 1``, a size that is not a
            multiple of ``2**(levels - 1)``, or channels that break the IUNet channel rule.
    """
    _check_measure(cfg.measure)
    levels = _iunet_levels(cfg.channels)
    _check_positive_list("depths", cfg.depths)
    sizes = cfg.effective_sizes()
    _check_sizes(sizes, 2 ** (levels - 1))
    if not cfg.networks or any(n not in DEPTH_NETWORKS for n in cfg.networks):
        raise ValueError(f"networks must be a non-empty list from {DEPTH_NETWORKS}, got {cfg.networks!r}")
    if cfg.batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {cfg.batch_size}")
    if "monai_unet" in cfg.networks and levels < 2:
        raise ValueError(f"monai_unet needs at least 2 levels of channels, got {cfg.channels}")
    cases = []
    for size in sizes:
        shape = (cfg.batch_size, cfg.in_channels, size, size, size)
        for depth in cfg.depths:
            blocks = split_blocks(depth, levels)
            for net in cfg.networks:
                if net == "monai_unet":
                    units = monai_res_units(depth, levels)
                    kwargs = dict(spatial_dims=3, in_channels=cfg.in_channels, out_channels=cfg.out_channels,
                                  channels=list(cfg.channels), strides=[2] * (levels - 1), num_res_units=units)
                    spec = _spec(cfg.measure, _MONAI_FACTORY, kwargs, shape, None)
                    cases.append(MemoryCase(net, "-", cfg.batch_size, size, depth, [units], spec))
                    continue
                kwargs = dict(name="iunet", spatial_dims=3, in_channels=cfg.in_channels,
                              out_channels=cfg.out_channels, channels=list(cfg.channels), num_blocks=blocks,
                              coupling=cfg.coupling, K=cfg.K, sn_method=cfg.sn_method,
                              memory_efficient=net == "iunet")
                spec = _spec(cfg.measure, _IUNET_FACTORY, kwargs, shape, _POST_STEP)
                cases.append(MemoryCase(net, cfg.sn_method, cfg.batch_size, size, depth, blocks, spec))
    return cases


def depth_summary(records: Sequence[MemoryRecord]) -> list[dict]:
    """Per size: memory growth of each network from the smallest to the largest depth, and ratios.

    Returns:
        One dict per size: ``size``, ``depths`` (min, max), ``growth`` (``{network: peak(max)/peak(min) - 1}``),
        ``plain_over_efficient_peak`` and ``efficient_over_plain_time`` at the largest depth
        (``None`` where a point failed or a network is absent).
    """
    out = []
    for size in sorted({r.size for r in records}):
        rows = [r for r in records if r.size == size and r.ok]
        if not rows:
            continue
        d0, d1 = min(r.depth for r in rows), max(r.depth for r in rows)
        get = {(r.network, r.depth): r for r in rows}
        growth = {}
        for net in sorted({r.network for r in rows}):
            a, b = get.get((net, d0)), get.get((net, d1))
            growth[net] = None if a is None or b is None else _ratio(b.peak_bytes, a.peak_bytes) - 1
        eff, plain = get.get(("iunet", d1)), get.get(("iunet_plain", d1))
        out.append({
            "size": size,
            "depths": [d0, d1],
            "growth": growth,
            "plain_over_efficient_peak": _ratio(plain and plain.peak_bytes, eff and eff.peak_bytes),
            "efficient_over_plain_time": _ratio(eff and eff.step_time_s, plain and plain.step_time_s),
        })
    return out


def format_depth_table(records: Sequence[MemoryRecord]) -> str:
    """Markdown table of the depth sweep: one row per (size, depth), peak and time per network."""
    nets = [n for n in DEPTH_NETWORKS if any(r.network == n for r in records)]
    names = {"iunet": "IUNet (recompute)", "iunet_plain": "IUNet (plain)", "monai_unet": "MONAI UNet"}
    head = ["size", "depth", "IUNet blocks/level"]
    for n in nets:
        head += [f"{names[n]} peak", f"{names[n]} s/step"]
    both = "iunet" in nets and "iunet_plain" in nets
    if both:
        head += ["time recompute/plain", "peak plain/recompute"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    get = {(r.network, r.size, r.depth): r for r in records}
    for size, depth in sorted({(r.size, r.depth) for r in records}):
        blocks = next((r.blocks for r in records if r.size == size and r.depth == depth and r.network != "monai_unet"),
                      None)
        row = [f"{size}³", str(depth), str(blocks) if blocks else "-"]
        for n in nets:
            r = get.get((n, size, depth))
            if r is None or not r.ok:
                row += ["failed" if r is not None else "-", "-"]
            else:
                extra = f" (res units {r.blocks[0]})" if n == "monai_unet" else ""
                row += [_fmt(r.peak_bytes) + extra, f"{r.step_time_s:.2f}"]
        if both:
            e, p = get.get(("iunet", size, depth)), get.get(("iunet_plain", size, depth))
            ok = e is not None and p is not None and e.ok and p.ok
            row += [_fmt_ratio(_ratio(e.step_time_s, p.step_time_s) if ok else None),
                    _fmt_ratio(_ratio(p.peak_bytes, e.peak_bytes) if ok else None)]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def plot_depth_sweep(records: Sequence[MemoryRecord], path: str | os.PathLike, title: str = "") -> Path:
    """Peak memory (log scale) and step time vs depth, one column per volume size; saved as PNG."""
    sizes = sorted({r.size for r in records})
    if not sizes:
        raise ValueError("records is empty: nothing to plot")
    fig, axes = _figure(2, len(sizes), 4.2, 3.2)
    names = {"iunet": "IUNet (recompute)", "iunet_plain": "IUNet (plain autograd)", "monai_unet": "MONAI UNet"}
    for j, size in enumerate(sizes):
        for net in DEPTH_NETWORKS:
            rows = sorted((r for r in records if r.size == size and r.network == net and r.ok), key=lambda r: r.depth)
            if not rows:
                continue
            depths = [r.depth for r in rows]
            axes[0][j].plot(depths, [r.peak_bytes / 2**20 for r in rows], "o-", label=names[net])
            axes[1][j].plot(depths, [r.step_time_s for r in rows], "o-", label=names[net])
        axes[0][j].set_yscale("log")
        axes[0][j].set_title(f"{size}³, batch {records[0].batch}")
        axes[0][j].set_ylabel("step peak memory (MiB)")
        axes[1][j].set_ylabel("step time (s)")
        for ax in axes[:, j]:
            ax.set_xlabel("invertible blocks (depth)")
            ax.grid(True, which="both", alpha=0.3)
        axes[0][j].legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=9)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return path
