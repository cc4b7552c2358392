"""Benchmark of the depthwise spectral bound: (a) accuracy (paper's Figure-2 protocol), (b) time and memory.

Usage::

    python scripts/bench_spectral.py [--device cpu|cuda] [--out outputs/bench_spectral] [--quick]

Writes ``bench_spectral.json`` and ``bound_accuracy.png`` into ``--out`` and prints the tables: (a) accuracy of
the DFT bound, (c) what the SN layers use on tiny inputs (the exact path), (b) cost.
The protocol is documented in :mod:`invseg.analysis.bound_accuracy`.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import torch

from invseg import cli
from invseg.experiments.bound_accuracy import format_accuracy_table, format_cost_table, plot_bound_accuracy, write_json
from invseg.analysis.bound_accuracy import (
    bound_accuracy,
    bound_cost,
    dense_norms,
    gaussian_filters,
)
from invseg.spectral import depthwise_exact_small, depthwise_geometry, search_channels_full, use_exact_small

# (a) N values and filters per N; (b) layer shapes (spatial_dims, channels, N)
DEFAULT_SIZES = (7, 8, 12, 16, 24, 32, 64, 128)
QUICK_SIZES = (7, 12)
DEFAULT_COST = {"cpu": [(2, 32, 128), (2, 256, 64), (3, 32, 64), (3, 32, 128)],
                "cuda": [(2, 32, 128), (2, 256, 64), (3, 32, 64), (3, 32, 128), (3, 64, 128)]}
QUICK_COST = [(3, 4, 8)]


#: (c) input sizes of the small-input check and the layer width it assumes (MobileNetV2's 960 channels)
SMALL_SIZES = (4, 7)
LAYER_CHANNELS = 960


def small_input_accuracy(sizes=SMALL_SIZES, strides=(1, 2), count: int = 100, seed_offset: int = 0) -> list[dict]:
    """What an SN depthwise layer of ``LAYER_CHANNELS`` channels uses on tiny inputs, per Gaussian 3×3 filter.

    Where ``use_exact_small(LAYER_CHANNELS, N, pruned=True)`` holds, the layer's σ is the per-segment maximum of
    :func:`depthwise_exact_small`; each filter is its own segment here (``segments=[1]*count``), so the value is
    that filter's exact norm and its overestimation against the dense reference is measured, not assumed; the
    DFT bound of the same filters (the layer's value without that path) is listed beside it.
    """
    out = []
    for n in sizes:
        if not use_exact_small(LAYER_CHANNELS, (n, n), pruned=True):
            continue
        for s in strides:
            filters = gaussian_filters(count, 3, 2, seed=seed_offset + n)
            exact = dense_norms(filters, n, s)
            geom = depthwise_geometry(filters, n, s)
            layer = depthwise_exact_small(filters, geom, [1] * count)[0]
            dft = search_channels_full(filters, geom)[0]
            # one layer of LAYER_CHANNELS Gaussian filters through the pruned path: its σ against the exact maximum
            wide = gaussian_filters(LAYER_CHANNELS, 3, 2, seed=seed_offset + 1000 + n)
            wide_exact = dense_norms(wide, n, s).max()
            sigma = depthwise_exact_small(wide, depthwise_geometry(wide, n, s), [LAYER_CHANNELS])[0].max()
            out.append({"input_size": n, "stride": s, "filters": count,
                        "median_exact_path": float((layer / exact - 1).median()),
                        "max_exact_path": float((layer / exact - 1).abs().max()),
                        "median_dft": float((dft / exact - 1).median()),
                        "layer_sigma_over_exact": float(sigma / wide_exact - 1)})
    return out


def filters_for(n: int) -> int:
    """100 filters up to N = 32, 30 at N = 64 and 20 at N = 128 (dense exact norm up to N = 24, Lanczos beyond)."""
    return 100 if n <= 32 else (30 if n <= 64 else 20)


def parse_args(argv=None) -> argparse.Namespace:
    p = cli.make_parser(__doc__)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="device of the cost benchmark")
    p.add_argument("--out", default="outputs/bench_spectral", help="output directory")
    p.add_argument("--quick", action="store_true", help="small N list, few filters, no dense baseline (smoke test)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads (default 1: on a small shared CPU, oversubscribed threads slow "
                        "the many small ops of the protocol by 10x or more; 0 keeps torch's default)")
    p.add_argument("--skip-cost", action="store_true", help="only the accuracy part (a)")
    p.add_argument("--skip-accuracy", action="store_true", help="only the cost part (b)")
    args = p.parse_args(argv)
    if args.threads < 0:
        p.error(f"--threads must be >= 0, got {args.threads}")
    return args


def main(argv=None) -> int:
    return cli.run(_job, parse_args(argv))


def _job(args: argparse.Namespace) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)  # a script-level choice; the library never sets threads
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    log = lambda line: print(f"  [{time.perf_counter() - t0:6.1f}s] {line}", flush=True)  # noqa: E731

    if args.quick:
        sizes, count, dense_max, shapes, repeats = QUICK_SIZES, 6, 8, QUICK_COST, 1
    else:
        sizes, count, dense_max, shapes, repeats = DEFAULT_SIZES, filters_for, 24, DEFAULT_COST[args.device], 3

    accuracy = []
    if not args.skip_accuracy:
        print("(a) bound accuracy: Gaussian 3x3 filters, relative overestimation bound/exact - 1")
        accuracy = bound_accuracy(sizes, (1, 2), count, dense_max=dense_max, progress=log)
    small = []
    if not args.skip_accuracy:
        small = small_input_accuracy(QUICK_SIZES[:1] if args.quick else SMALL_SIZES,
                                     count=count if isinstance(count, int) else 100)
    cost = []
    if not args.skip_cost:
        print(f"(b) one bound evaluation (search + sigma + backward), device {args.device}")
        cost = bound_cost(shapes, args.device, repeats=repeats, dense=not args.quick, progress=log)

    meta = {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores"
        + (f", {torch.cuda.get_device_name()}" if args.device == "cuda" else ", no GPU used"),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "quick": args.quick,
        "protocol": (
            "Gaussian 3x3 filters (seed 0 + N), padding 1; exact norm: dense operator (float64) for "
            f"N <= {dense_max}, restarted Lanczos on A^T A (float64, converged, a lower bound of the truth) "
            "beyond; filters per N: " + (f"{count}" if isinstance(count, int) else filters_for.__doc__)
            + "; 'paper' = grid N+2p and ||PK|| <= ||K|| for strides; 'invseg' = depthwise_bound (min "
            "over grids, exact aliasing formula for strides). Cost: median time of depthwise_bound + "
            "backward (float32); peak transient memory in a fresh process (CPU: VmHWM - VmRSS with "
            "MALLOC_MMAP_THRESHOLD_=65536; CUDA: max_memory_allocated); dense = depthwise_bound_dense "
            "(paper grid, full FFT kept by autograd) + backward."
        ),
        "wall_time_s": None,
    }
    meta["wall_time_s"] = round(time.perf_counter() - t0, 1)
    meta["small_input_layers"] = small  # (c): per Gaussian filter, the SN layers' exact path vs the DFT bound
    json_path = write_json(out / "bench_spectral.json", accuracy, cost, meta)
    png_path = plot_bound_accuracy(accuracy, out / "bound_accuracy.png") if accuracy else None

    print()
    print(f"machine: {meta['machine']}; torch {meta['torch']}, {meta['torch_threads']} threads")
    if accuracy:
        print("(a) median [IQR] relative overestimation, %")
        print(format_accuracy_table(accuracy))
    if small:
        print()
        print(f"(c) SN layers of {LAYER_CHANNELS} channels on tiny inputs (exact path): overestimation, %")
        print(f"{'N':>4} {'s':>2} {'filters':>7} {'exact path median':>18} {'|max|':>9} {'DFT bound median':>17} "
              f"{'σ of one layer, pruned':>23}")
        for r in small:
            print(f"{r['input_size']:>4} {r['stride']:>2} {r['filters']:>7} {100 * r['median_exact_path']:>18.2e} "
                  f"{100 * r['max_exact_path']:>9.1e} {100 * r['median_dft']:>17.3f} "
                  f"{100 * r['layer_sigma_over_exact']:>23.1e}")
    if cost:
        print()
        print("(b) one bound evaluation: median time (s) and peak transient memory (MiB)")
        print(format_cost_table(cost))
    print(f"\nwrote {json_path}" + (f" and {png_path}" if png_path else "") + f" in {meta['wall_time_s']} s")
    return cli.ExitCode.OK


if __name__ == "__main__":
    sys.exit(main())
