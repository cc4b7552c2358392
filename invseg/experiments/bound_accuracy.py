"""Tables, plot and JSON of the depthwise-bound accuracy and cost (``scripts/bench_spectral.py``).

The measurements are the library checkers of :mod:`invseg.analysis.bound_accuracy`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

from invseg.analysis.bound_accuracy import BOUNDS, AccuracyRecord, CostRecord

__all__ = ["format_accuracy_table", "format_cost_table", "plot_bound_accuracy", "write_json"]


def _mib(b: int | None) -> str:
    return "-" if b is None else f"{b / 2**20:.1f}"


def format_accuracy_table(records: Sequence[AccuracyRecord]) -> str:
    """Plain-text table: per (N, stride), median [IQR] overestimation (%) of each bound."""
    head = f"{'N':>4} {'s':>2} {'filters':>7} {'exact by':>8} " + " ".join(
        f"{name + ' median [q25, q75] %':>34}" for name in BOUNDS) + f" {'min bound/exact':>16}"
    lines = [head, "-" * len(head)]
    for r in records:
        cells = " ".join(
            f"{100 * r.median[b]:>10.3f} [{100 * r.q25[b]:>9.3f}, {100 * r.q75[b]:>9.3f}]" for b in BOUNDS)
        lines.append(f"{r.input_size:>4} {r.stride:>2} {r.filters:>7} {r.reference:>8} {cells} "
                     f"{min(r.min_ratio.values()):>16.9f}")
    return "\n".join(lines)


def format_cost_table(records: Sequence[CostRecord]) -> str:
    """Plain-text table of the time and peak memory of one bound evaluation."""
    head = (f"{'dims':>4} {'C':>4} {'N':>4} {'dev':>4} {'chunked s':>10} {'chunked MiB':>11} "
            f"{'dense s':>9} {'dense MiB':>10} {'one FFT MiB':>11}")
    lines = [head, "-" * len(head)]
    for r in records:
        dt = "-" if r.dense_time_s is None else f"{r.dense_time_s:.3f}"
        lines.append(f"{r.spatial_dims:>4} {r.channels:>4} {r.input_size:>4} {r.device:>4} "
                     f"{r.chunked_time_s:>10.3f} {_mib(r.chunked_peak_bytes):>11} {dt:>9} "
                     f"{_mib(r.dense_peak_bytes):>10} {_mib(r.fft_bytes):>11}")
    return "\n".join(lines)


def plot_bound_accuracy(records: Sequence[AccuracyRecord], path: str | Path) -> Path:
    """Median (line) and IQR (band) of the overestimation vs N, one panel per stride; saves a PNG."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    strides = sorted({r.stride for r in records})
    fig, axes = plt.subplots(1, len(strides), figsize=(5 * len(strides), 4), squeeze=False)
    for ax, s in zip(axes[0], strides):
        rs = sorted((r for r in records if r.stride == s), key=lambda r: r.input_size)
        ns = [r.input_size for r in rs]
        for name in BOUNDS:
            med = [max(100 * r.median[name], 1e-6) for r in rs]
            lo = [max(100 * r.q25[name], 1e-6) for r in rs]
            hi = [max(100 * r.q75[name], 1e-6) for r in rs]
            label = {"paper": "paper (grid N+2p" + (", ||PK||<=||K||)" if s > 1 else ")"),
                     "invseg": "invseg (min over grids" + (", aliasing)" if s > 1 else ")")}[name]
            ax.plot(ns, med, marker="o", label=label)
            ax.fill_between(ns, lo, hi, alpha=0.25)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("input size N")
        ax.set_ylabel("relative overestimation (%)")
        ax.set_title(f"Gaussian 3x3 filters, stride {s}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_json(path: str | Path, accuracy: Sequence[AccuracyRecord], cost: Sequence[CostRecord],
               meta: dict) -> Path:
    """Write both result lists and ``meta`` (machine, protocol) as JSON."""
    path = Path(path)
    payload = {"meta": meta, "accuracy": [asdict(r) for r in accuracy], "cost": [asdict(r) for r in cost]}
    path.write_text(json.dumps(payload, indent=2))
    return path
