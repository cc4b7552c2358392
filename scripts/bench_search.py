#!/usr/bin/env python
"""Time of the spectral searches of real networks: every depthwise group and the stem, before/after.

For each network the depthwise layers are grouped as the SN layers group them (equal kernel, stride, padding,
dilation, input size, grid count and exact-path flag: their channels concatenated, one search per group), and
each group's update is timed as the layers run it:

* DFT groups: ``search_channels_full`` + the per-layer arg-max + ``phase_from_tables``;
* exact small-input groups: ``depthwise_exact_small`` once per layer, every channel exact (today's layers), or
  once per group with ``segments`` (the layers' channel counts): the pruned search, exact for each layer's
  arg-max channel, DFT bounds certified below it elsewhere;
* the stem (``SNConv``): ``full_conv_search`` + ``full_conv_projection``.

Variants, interleaved round by round in one process (so machine load hits them alike):

* ``before``: ``invseg/spectral`` of a git revision (``--baseline``, default ``main``), extracted to a temporary
  directory and imported under another name, with its own grid policy and exact-path gate;
* ``after``: this tree, the exact path with the pruned gate and ``segments`` (what the layers run once they pass
  ``pruned=True`` to the gate and ``segments`` to the exact path);
* ``after-gate-off``: this tree with the unpruned gate (what today's layer code runs with this tree).

Weights are the networks' own initial weights (``sn_method="none"``: no search runs while the sizes are recorded).

    python scripts/bench_search.py                       # all cases, 2 threads
    python scripts/bench_search.py --cases mobilenetv2_128 --rounds 20 --groups

Writes ``bench_search.json`` into ``--out`` and prints a markdown table: per network the median over rounds of one
update of all its groups (wall clock, ms), the ratio before/after, the fastest round (the least disturbed by other
processes on a shared machine) and the process CPU time (with one thread, robust to time slices lost to others).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import invseg.spectral as current
from invseg import cli
from invseg.layers import SNConv, SNDepthwiseConv
from invseg.nets import create_model

REPO = Path(__file__).resolve().parents[1]

CASES = {
    "mobilenetv2_128": ("mobilenetv2", {"num_classes": 1000, "sn_method": "none"}, (1, 3, 128, 128)),
    "mobilenetv2_224": ("mobilenetv2", {"num_classes": 1000, "sn_method": "none"}, (1, 3, 224, 224)),
    "resnet34ds_32": ("resnet34ds", {"num_classes": 10, "sn_method": "none"}, (1, 3, 32, 32)),
    "iunet3d_32": ("iunet", {"spatial_dims": 3, "in_channels": 1, "out_channels": 2, "channels": [8, 16, 32],
                             "num_blocks": 2, "coupling": "additive", "sn_method": "none"}, (1, 1, 32, 32, 32)),
}


def load_baseline(rev: str, tmp: Path):
    """``invseg/spectral`` at git revision ``rev`` as a separate package (its relative imports stay inside it)."""
    archive = subprocess.run(["git", "-C", str(REPO), "archive", rev, "invseg/spectral"], check=True,
                             capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(tmp)], input=archive, check=True)
    pkg = tmp / "invseg" / "spectral"
    spec = importlib.util.spec_from_file_location("_baseline_spectral", pkg / "__init__.py",
                                                  submodule_search_locations=[str(pkg)])
    mod = importlib.util.module_from_spec(spec)
    sys.modules["_baseline_spectral"] = mod
    spec.loader.exec_module(mod)
    return mod


def collect(case: str):
    """The depthwise layers (weight, geometry arguments, input size) and stems of one network, in order."""
    name, kwargs, shape = CASES[case]
    torch.manual_seed(0)
    model = create_model(name, **kwargs).eval()
    sizes = {}
    hooks = [m.register_forward_pre_hook(lambda mod, args: sizes.__setitem__(mod, tuple(args[0].shape[2:])))
             for m in model.modules() if isinstance(m, (SNDepthwiseConv, SNConv))]
    with torch.no_grad():
        model(torch.randn(shape))
    for h in hooks:
        h.remove()
    dw = [(m.weight.detach().clone(), m.stride, m.padding, m.dilation, m.padding_mode, sizes[m])
          for m in model.modules() if isinstance(m, SNDepthwiseConv) and m in sizes]
    stems = [(m.weight.detach().clone(), m.stride, m.padding, sizes[m])
             for m in model.modules() if isinstance(m, SNConv) and m in sizes]
    return dw, stems


def _gate(spec, channels, size, pruned):
    if pruned:
        return spec.use_exact_small(channels, size, pruned=True)
    return spec.use_exact_small(channels, size)


def make_updates(spec, dw, stems, pruned: bool, segments: bool):
    """One callable per group (and stem) doing what the layers do at an update, with ``spec``'s functions."""
    groups: dict = {}
    for w, s, p, dil, mode, size in dw:
        geom = spec.depthwise_geometry(w, size, s, p, dil, mode)
        key = (tuple(w.shape[2:]), s, p, dil, mode, spec.grids_per_axis(geom), _gate(spec, w.shape[0], size, pruned),
               size)
        groups.setdefault(key, []).append(w)
    updates, extras = [], []
    for key, ws in groups.items():
        _, s, p, dil, mode, g, exact, size = key
        weights = torch.cat(ws)
        counts = [w.shape[0] for w in ws]
        geom = spec.depthwise_geometry(weights, size, s, p, dil, mode)
        d = len(size)
        label = (f"dw k{key[0][0]} s{s[0]} N{size[0]}{'^3' if d == 3 else ''} "
                 f"{len(ws)}x{counts[0] if len(set(counts)) == 1 else counts}")
        if exact:
            if segments:  # one pruned call for the group, a segment per layer
                def run(weights=weights, geom=geom, counts=counts):
                    spec.depthwise_exact_small(weights, geom, counts)
                extras.append((label, weights, geom, counts))
            else:  # as the layers do it today: one call per layer, every channel exact
                geoms = [spec.depthwise_geometry(w, size, s, p, dil, mode) for w in ws]

                def run(ws=ws, geoms=geoms):
                    for w, one in zip(ws, geoms):
                        spec.depthwise_exact_small(w, one)
            updates.append((label + " exact", run))
            continue
        one_geom = spec.depthwise_geometry(ws[0], size, s, p, dil, mode)
        budget = min(spec.DEFAULT_MEMORY_BUDGET, max(1, max(
            spec.search_transient_bytes(one_geom, g, weights.dtype) // counts[0] * c for c in set(counts))))

        def run(weights=weights, geom=geom, g=g, budget=budget, counts=counts, d=d):
            values, states, gidx, axes = spec.search_channels_full(weights, geom, g, budget)
            if len(set(counts)) == 1:
                _, ci = values.reshape(len(counts), counts[0]).max(dim=1)
                rows = ci + torch.arange(len(counts)) * counts[0]
            else:
                offsets = [sum(counts[:i]) for i in range(len(counts))]
                ci = torch.stack([values[o:o + n].max(dim=0)[1] for o, n in zip(offsets, counts)])
                rows = ci + torch.tensor(offsets)
            torch.cat([ci[:, None], states[rows]], dim=1)
            spec.phase_from_tables(axes, gidx[rows], states[rows, d:], torch.float32)
        updates.append((label + f" g{g}", run))
    full = importlib.import_module(spec.__name__ + ".full_conv")
    for w, s, p, size in stems:
        def run(w=w, s=s, p=p, size=size):
            _, state = full.full_conv_search(w, size, s, p)
            full.full_conv_projection(w, state, s)
        updates.append((f"stem {tuple(w.shape)} s{s[0]} N{size[0]}", run))
    return updates, extras


def exact_path_details(spec, extras, repeats: int) -> list[dict]:
    """Per pruned exact group: how many channels got an exact solve (the networks' own filters), and the worst
    case, every filter of the group identical (all of them candidates), timed."""
    try:
        dw = importlib.import_module(spec.__name__ + ".exact_small")
    except ModuleNotFoundError:  # a baseline revision from before spectral/depthwise.py was split
        dw = importlib.import_module(spec.__name__ + ".depthwise")
    out = []
    for label, weights, geom, counts in extras:
        solved = []
        norms = dw._channel_norms
        dw._channel_norms = lambda theta, *a: solved.append(theta.shape[0]) or norms(theta, *a)
        try:
            spec.depthwise_exact_small(weights, geom, counts)
        finally:
            dw._channel_norms = norms
        same = weights[:1].expand_as(weights).contiguous()
        near = same + 1e-6 * torch.randn(same.shape, generator=torch.Generator().manual_seed(0), dtype=same.dtype)
        row = {"group": label, "channels": sum(counts), "exact_solves": sum(solved)}
        for name, w in (("identical", same), ("near_identical", near)):
            spec.depthwise_exact_small(w, geom, counts)
            ts = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                spec.depthwise_exact_small(w, geom, counts)
                ts.append(time.perf_counter() - t0)
            row[f"worst_case_{name}_filters_ms"] = 1e3 * statistics.median(ts)
        out.append(row)
    return out


def time_case(case: str, variants: dict, rounds: int, repeats: int) -> dict:
    dw, stems = collect(case)
    built = {name: make_updates(spec, dw, stems, pruned, segments)
             for name, (spec, pruned, segments) in variants.items()}
    plans = {name: b[0] for name, b in built.items()}
    for ups in plans.values():  # warm-up: builds the cached tables (geometry only, once per training run)
        for _, run in ups:
            run()
            run()
    samples = {name: [[] for _ in ups] for name, ups in plans.items()}
    cpu = {name: [[] for _ in ups] for name, ups in plans.items()}
    totals = {name: [] for name in plans}
    for _ in range(rounds):
        for name, ups in plans.items():  # variants interleaved round by round
            total = 0.0
            for i, (_, run) in enumerate(ups):
                ts, cs = [], []
                for _ in range(repeats):
                    c0, t0 = time.process_time(), time.perf_counter()
                    run()
                    ts.append(time.perf_counter() - t0)
                    cs.append(time.process_time() - c0)
                t = statistics.median(ts)
                samples[name][i].append(t)
                cpu[name][i].append(statistics.median(cs))
                total += t
            totals[name].append(total)
    out = {"case": case, "variants": {}, "exact_path": {}}
    for name, (spec, _, segments) in variants.items():
        if segments:
            out["exact_path"][name] = exact_path_details(spec, built[name][1], repeats)
    for name, ups in plans.items():
        out["variants"][name] = {
            "total_ms": 1e3 * statistics.median(totals[name]),
            "total_ms_min": 1e3 * min(totals[name]),
            # process CPU time (all threads): with one thread, robust to the time slices other processes take
            "total_cpu_ms": 1e3 * sum(statistics.median(c) for c in cpu[name]),
            "groups": [{"group": label, "ms": 1e3 * statistics.median(samples[name][i]),
                        "cpu_ms": 1e3 * statistics.median(cpu[name][i])} for i, (label, _) in enumerate(ups)],
        }
    return out


def format_table(results: list[dict], names: list[str]) -> str:
    head = ("| network | " + " | ".join(f"{n} (ms)" for n in names) + " | before/after | fastest round: "
            + " / ".join(names) + " | CPU ms: " + " / ".join(names) + " |")
    lines = [head, "|" + "---|" * (len(names) + 4)]
    for r in results:
        v = r["variants"]
        ratio = (f"{v['before']['total_ms'] / v['after']['total_ms']:.1f}×"
                 if "before" in v and "after" in v else "—")
        lines.append(f"| {r['case']} | " + " | ".join(f"{v[n]['total_ms']:.2f}" for n in names) + f" | {ratio} | "
                     + " / ".join(f"{v[n]['total_ms_min']:.2f}" for n in names) + " | "
                     + " / ".join(f"{v[n]['total_cpu_ms']:.2f}" for n in names) + " |")
    return "\n".join(lines)


def format_groups(result: dict, names: list[str]) -> str:
    lines = [f"{result['case']}:", "| group (" + " / ".join(names) + ") | " + " | ".join(names) + " |",
             "|---|" + "---|" * len(names)]
    rows = {}
    for n in names:
        for g in result["variants"][n]["groups"]:
            rows.setdefault(n, []).append(g)
    for i in range(max(len(rows[n]) for n in names)):
        label = " / ".join(rows[n][i]["group"] if i < len(rows[n]) else "—" for n in names)
        lines.append(f"| {label} | " + " | ".join(f"{rows[n][i]['ms']:.3f}" if i < len(rows[n]) else "—"
                                                   for n in names) + " |")
    lines.append("(wall-clock medians, ms)")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = cli.make_parser(__doc__)
    p.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    p.add_argument("--baseline", default="main", help="git revision of the 'before' variant ('none': skip it)")
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default 2, the target's)")
    p.add_argument("--rounds", type=int, default=10, help="interleaved rounds (default 10)")
    p.add_argument("--repeats", type=int, default=5, help="timed calls per group and round (median; default 5)")
    p.add_argument("--groups", action="store_true", help="also print the per-group table")
    p.add_argument("--out", default="outputs/bench_search")
    args = p.parse_args(argv)
    for name in ("threads", "rounds", "repeats"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    return cli.run(_job, args)


def _job(args: argparse.Namespace) -> int:
    torch.set_num_threads(args.threads)  # a script-level choice; the library never sets threads
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        variants = {}
        if args.baseline != "none":
            variants["before"] = (load_baseline(args.baseline, Path(tmp)), False, False)
        variants["after"] = (current, True, True)
        variants["after-gate-off"] = (current, False, False)
        names = list(variants)
        results = []
        with torch.no_grad():
            for case in args.cases:
                results.append(time_case(case, variants, args.rounds, args.repeats))
                print(f"  {case}: " + ", ".join(f"{n} {results[-1]['variants'][n]['total_ms']:.2f} ms" for n in names),
                      flush=True)
    meta = {"machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, no GPU used", "torch": torch.__version__,
            "threads": torch.get_num_threads(), "baseline": args.baseline, "rounds": args.rounds,
            "repeats": args.repeats, "load_average": os.getloadavg()}
    (out / "bench_search.json").write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    print(f"\nmachine: {meta['machine']}; torch {meta['torch']}, {meta['threads']} threads; "
          f"load average {meta['load_average'][0]:.2f}")
    print("median time of one update of every depthwise group and the stem (ms)")
    print(format_table(results, names))
    if args.groups:
        for r in results:
            print()
            print(format_groups(r, names))
    for r in results:
        for name, rows in r["exact_path"].items():
            for e in rows:
                print(f"{r['case']} {name} {e['group']}: {e['exact_solves']} exact solves of {e['channels']} "
                      f"channels; worst cases: identical filters {e['worst_case_identical_filters_ms']:.2f} ms, "
                      f"identical + 1e-6 noise {e['worst_case_near_identical_filters_ms']:.2f} ms")
    print(f"\nwrote {out / 'bench_search.json'}")
    return cli.ExitCode.OK


if __name__ == "__main__":
    sys.exit(main())
