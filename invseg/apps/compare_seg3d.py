"""IUNet (+SN), IUNet without SN and MONAI's UNet side by side on the same 3D data, patch and steps.

For each network: train ``--steps`` steps with the given config (default: the synthetic one) and
report the validation Dice of every class, then the peak memory of one training step measured in a
fresh process (:func:`invseg.analysis.memory.measure_step`: CUDA peak on a GPU, peak RSS with the
DESIGN §4 protocol on CPU). At the end the training steps of all networks are timed interleaved,
round by round, in this one process (:func:`invseg.experiments.seg_compare.time_seg_steps`), so the ratios to
MONAI's UNet are free of the drifts of a shared machine. ``results.json`` and ``results.md`` (a
table headed by the data, the settings and the machine) are rewritten in ``--out`` after every
network, so a run cut short keeps what it measured.

Variants: the built-in ``iunet_sn``, ``iunet_nosn`` and ``monai_unet`` (``--variants``), and any
number of ``--variant "NAME: key=value key=value"`` (config overrides on top of ``--config``/``--set``;
a built-in name adds its overrides to the built-in's).

Examples:
    invseg-compare-seg3d                                        # CPU, synthetic spheres
    invseg-compare-seg3d --config seg3d_mni152                  # real MRI (pip install "invseg[examples]")
    invseg-compare-seg3d --config seg3d_mni152 --variants iunet_sn \\
        --variant "lr3: model.name=iunet train.lr=0.003" --no-memory --time-rounds 0
    (in a clone: python scripts/compare_seg3d.py ... runs the same job)
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
from pathlib import Path

from invseg import cli
from invseg.config import apply_overrides, from_dict, to_dict

# torch, invseg.analysis and invseg.train.seg (MONAI) are imported in the functions that use them: `--help`
# and argument errors answer without loading them.

# name -> config overrides (on top of the base config)
VARIANTS = {
    "iunet_sn": ["model.name=iunet", "model.kwargs.sn_method=fft"],
    "iunet_nosn": ["model.name=iunet", "model.kwargs.sn_method=none"],
    # MONAI's tutorial-sized UNet: four levels, residual units, instance norm
    "monai_unet": ["model.name=monai_unet", "model.kwargs={channels: [16, 32, 64, 128], num_res_units: 1}",
                   "guard.every=0"],
}
REFERENCE = "monai_unet"


def machine(device: str) -> str:
    import torch

    if device == "cuda":
        return f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}"
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            cpu = next(line.split(":", 1)[1].strip() for line in fh if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"CPU {cpu} ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads), torch {torch.__version__}"


def parse_variant(text: str) -> tuple[str, list[str]]:
    """``"NAME: k=v k=v"`` -> ``(NAME, [k=v, ...])``."""
    name, sep, rest = text.partition(":")
    name = name.strip()
    if not sep or not name or not all(c.isalnum() or c in "_-." for c in name):
        raise ValueError(f"--variant must read 'NAME: key=value key=value' (NAME of letters, digits, _-.), got {text!r}")
    overrides = rest.split()
    bad = [o for o in overrides if "=" not in o]
    if bad:
        raise ValueError(f"--variant {name}: override {bad[0]!r} is not key=value")
    return name, overrides


def variant_config(base, overrides: list[str]):
    """``base`` (a ``SegConfig``) with ``overrides`` (a MONAI UNet without ``strides`` gets stride 2 per down step)."""
    from invseg.train.seg import SegConfig, check_seg_config

    data = apply_overrides(to_dict(copy.deepcopy(base)), overrides, SegConfig)
    cfg = from_dict(SegConfig, data, where=f"overrides {overrides}")
    check_seg_config(cfg)
    return cfg


def _dice_cells(row: dict, names: list[str]) -> str:
    final = row.get("final") or {}
    return " | ".join(f"{final[f'val/dice_{n}']:.3f}" if f"val/dice_{n}" in final else "-" for n in names)


def write_results(out: Path, header: str, rows: list[dict], class_names: list[str], meta: dict) -> str:
    """Rewrite ``results.json`` and ``results.md`` from the rows measured so far; return the table."""
    from invseg.analysis.memory import format_bytes

    ref = next((r for r in rows if r["model"] == REFERENCE and r.get("step_s")), None)
    lines = [header, "",
             "| model | params | " + " | ".join(f"Dice {n}" for n in class_names)
             + " | mean Dice | median time / step | vs MONAI UNet | peak memory of a training step |",
             "|---|---|" + "---|" * len(class_names) + "---|---|---|---|"]
    for r in rows:
        step = r.get("step_s")
        ratio = f"{step / ref['step_s']:.2f}x" if step and ref else "-"
        peak = format_bytes(r["peak_step_bytes"]) + f" ({r['memory_method']})" if r.get("peak_step_bytes") else "-"
        mean = f"{r['mean_dice']:.3f}" if r.get("mean_dice") is not None else "-"
        lines.append(f"| {r['model']} | {r['params']:,} | {_dice_cells(r, class_names)} | {mean} | "
                     f"{step * 1000:.0f} ms | {ratio} | {peak} |" if step else
                     f"| {r['model']} | {r['params']:,} | {_dice_cells(r, class_names)} | {mean} | "
                     f"({r['train_median_step_s'] * 1000:.0f} ms in training) | - | {peak} |")
    table = "\n".join(lines)
    (out / "results.json").write_text(json.dumps({**meta, "rows": rows}, indent=2))
    (out / "results.md").write_text(table + "\n")
    return table


def _job(args: argparse.Namespace) -> int:
    import torch

    from invseg.analysis.memory import format_bytes, measure_step
    from invseg.experiments.seg_compare import seg_step_spec, time_seg_steps
    from invseg.train.seg import SegConfig, prepare_seg_data, resolve_dataset_json, train_seg

    base = cli.load_config(SegConfig, args)
    chosen = [(v.strip(), list(VARIANTS.get(v.strip(), []))) for v in args.variants.split(",") if v.strip()]
    unknown = [name for name, o in chosen if name not in VARIANTS]
    if unknown:
        raise cli.CLIError(f"unknown variants {unknown} (built-in: {', '.join(VARIANTS)})")
    for text in args.variant:
        name, overrides = parse_variant(text)
        chosen = [(n, o) for n, o in chosen if n != name] + [(name, VARIANTS.get(name, []) + overrides)]
    if not chosen:
        raise cli.CLIError("no variant to run: give --variants and/or --variant")
    if args.steps is not None and args.steps < 1:
        raise cli.CLIError(f"--steps must be >= 1, got {args.steps}")
    steps = args.steps or base.train.max_steps
    configs = {}
    for name, overrides in chosen:
        cfg = variant_config(base, overrides)
        cfg.train.max_steps = steps
        cfg.train.val_every = min(cfg.train.val_every, steps)
        cfg.output.run_dir = str(Path(args.out) / name)
        cfg.output.resume = "never"
        configs[name] = cfg
    if base.train.threads is not None:
        torch.set_num_threads(base.train.threads)
    dataset_json = resolve_dataset_json(base.data)
    train_list, val_list, info = prepare_seg_data(base.data)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = "cuda" if base.train.device != "cpu" and torch.cuda.is_available() else "cpu"
    class_names = list(info.get("label_names", []))[1:] or [f"class{c}" for c in range(1, int(info["num_classes"]))]
    where = machine(device)
    d, t = base.data, base.train
    header = (f"Data: {info.get('name')} ({dataset_json}), {len(train_list)} training / {len(val_list)} validation "
              f"cases, classes {', '.join(class_names)}; "
              f"{'resampled to ' + 'x'.join(f'{p:g}' for p in d.pixdim) + ' mm' if d.pixdim else 'native grid'}, intensity "
              f"{d.intensity}. Patch {'x'.join(map(str, d.patch_size))}, {t.batch_size * d.num_samples} patches per "
              f"step, {steps} steps, {t.optimizer} lr {t.lr:g} ({t.scheduler}) unless a variant sets it. Dice: "
              f"whole validation volumes, sliding window. Step time: median of interleaved rounds in one process. "
              f"Peak memory: one training step in a fresh process. Machine: {where}.")
    print(header, flush=True)
    meta = {"machine": where, "steps": steps, "data": str(dataset_json), "header": header}

    rows: list[dict] = []
    for name, cfg in configs.items():
        print(f"== {name}: training {steps} steps", flush=True)
        summary = train_seg(cfg)
        row = {"model": name, "overrides": dict(chosen)[name], "params": summary["num_params"],
               "mean_dice": summary["final"].get("val/mean_dice"), "final": summary["final"],
               "train_median_step_s": summary["median_step_s"], "config": to_dict(cfg)}
        rows.append(row)
        write_results(out, header, rows, class_names, meta)
        if not args.no_memory:
            spec = seg_step_spec(cfg, int(info["num_modalities"]), int(info["num_classes"]), device=device,
                                 steps=args.memory_steps, threads=cfg.train.threads)
            mem = measure_step(spec)
            row.update(peak_step_bytes=mem.peak_bytes, memory_method="CUDA peak" if mem.method == "cuda" else "peak RSS",
                       probe_step_s=mem.step_time_s)
        print(f"   Dice {row['mean_dice']:.4f} ({_dice_cells(row, class_names)}), "
              f"{summary['median_step_s']:.3f} s/step in training"
              + (f", peak {format_bytes(row['peak_step_bytes'])}" if row.get("peak_step_bytes") else ""), flush=True)
        write_results(out, header, rows, class_names, meta)

    if args.time_rounds > 0:
        print(f"== timing {len(configs)} networks interleaved, {args.time_rounds} rounds", flush=True)
        times = time_seg_steps(configs, int(info["num_modalities"]), int(info["num_classes"]),
                               rounds=args.time_rounds, device=device)
        for row in rows:
            row["step_s"] = statistics.median(times[row["model"]])
            row["step_times_s"] = times[row["model"]]
        if REFERENCE in times:
            for row in rows:  # per-round ratios: robust to slow drifts of a shared machine
                row["round_ratios"] = [a / b for a, b in zip(times[row["model"]], times[REFERENCE])]
    table = write_results(out, header, rows, class_names, meta)
    print(table)
    return cli.ExitCode.OK


def main(argv: list[str] | None = None) -> int:
    parser = cli.make_parser(__doc__)
    cli.add_config_arguments(parser, default="seg3d_synthetic")
    parser.add_argument("--steps", type=int, default=None, help="training steps per network (default: train.max_steps)")
    parser.add_argument("--variants", default=",".join(VARIANTS),
                        help=f"comma list of built-in variants ({', '.join(VARIANTS)}); empty for none")
    parser.add_argument("--variant", action="append", default=[], metavar="'NAME: k=v ...'",
                        help="an extra variant: config overrides on top of the base config (repeatable)")
    parser.add_argument("--out", default="outputs/compare_seg3d", help="output folder")
    parser.add_argument("--memory-steps", type=int, default=3, help="measured steps for the memory probe")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory probes")
    parser.add_argument("--time-rounds", type=int, default=10,
                        help="rounds of the interleaved step timing (0: only the training's own median)")
    return cli.run(_job, parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
