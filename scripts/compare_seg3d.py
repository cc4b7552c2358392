"""IUNet (+SN), IUNet without SN and MONAI's UNet side by side on the same 3D data, patch and steps.

For each network: train ``--steps`` steps with the given config (default: the synthetic one), then
report the validation Dice, the median time per training step, and the peak memory of one training
step measured in a fresh process (:func:`invseg.analysis.memory.measure_step`: CUDA peak on a GPU,
peak RSS with the DESIGN §4 protocol on CPU). Writes ``results.json`` and ``results.md`` (a markdown
table with the machine it ran on) into ``--out``.

Example:
    python scripts/compare_seg3d.py                       # CPU, synthetic data, a few minutes
    python scripts/compare_seg3d.py --steps 300 --set train.device=cuda
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys
from pathlib import Path

import torch

from invseg.analysis.memory import format_bytes, measure_step
from invseg.config import add_config_arguments, config_from_args, to_dict
from invseg.train.seg import SegConfig, prepare_seg_data, seg_step_spec, train_seg

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "seg3d_synthetic.yaml"

# name -> model overrides (on top of the config's model section)
VARIANTS = {
    "iunet_sn": {"name": "iunet", "sn_method": "fft"},
    "iunet_nosn": {"name": "iunet", "sn_method": "none"},
    "monai_unet": {"name": "monai_unet", "num_res_units": 1},
}


def machine(device: str) -> str:
    if device == "cuda":
        return f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}"
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            cpu = next(line.split(":", 1)[1].strip() for line in fh if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"CPU {cpu} ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads), torch {torch.__version__}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_config_arguments(parser, default_config=DEFAULT_CONFIG)
    parser.add_argument("--steps", type=int, default=120, help="training steps per network (default 120)")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma list of {', '.join(VARIANTS)}")
    parser.add_argument("--out", default="outputs/compare_seg3d", help="output folder")
    parser.add_argument("--memory-steps", type=int, default=3, help="measured steps for the memory probe")
    args = parser.parse_args(argv)
    base = config_from_args(SegConfig, args)
    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in names if v not in VARIANTS]
    if unknown or args.steps < 1:
        print(f"error: unknown variants {unknown} (known: {', '.join(VARIANTS)}) or --steps < 1", file=sys.stderr)
        return 2
    if base.train.threads is not None:
        torch.set_num_threads(base.train.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    _, _, info = prepare_seg_data(base.data)
    device = "cuda" if base.train.device != "cpu" and torch.cuda.is_available() else "cpu"

    rows = []
    for name in names:
        cfg = copy.deepcopy(base)
        for key, value in VARIANTS[name].items():
            setattr(cfg.model, key, value)
        if cfg.model.name == "monai_unet":
            cfg.model.strides = [2] * (len(cfg.model.channels) - 1)
            cfg.guard.every = 0
        cfg.train.max_steps = args.steps
        cfg.train.val_every = args.steps
        cfg.output.run_dir = str(out / name)
        cfg.output.resume = "never"
        print(f"== {name}: training {args.steps} steps", flush=True)
        summary = train_seg(cfg)
        spec = seg_step_spec(cfg, int(info["num_modalities"]), int(info["num_classes"]), device=device,
                             steps=args.memory_steps, threads=cfg.train.threads)
        mem = measure_step(spec)
        rows.append({
            "model": name,
            "params": summary["num_params"],
            "mean_dice": summary["final"].get("val/mean_dice"),
            "median_step_s": summary["median_step_s"],
            "peak_step_bytes": mem.peak_bytes,
            "memory_method": mem.method,
            "probe_step_s": mem.step_time_s,
            "config": to_dict(cfg),
        })
        print(f"   Dice {rows[-1]['mean_dice']:.4f}, {summary['median_step_s']:.3f} s/step, "
              f"peak {format_bytes(mem.peak_bytes)}", flush=True)

    where = machine(device)
    patch = "x".join(map(str, base.data.patch_size))
    batch = base.train.batch_size * base.data.num_samples
    lines = [
        f"Same synthetic data, patch {patch}, {batch} patches per step, {args.steps} steps, "
        f"{base.train.optimizer} lr {base.train.lr}; machine: {where}.",
        "",
        "| model | params | val mean Dice | median time / step | peak memory of a training step |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        method = "CUDA peak" if r["memory_method"] == "cuda" else "peak RSS"
        lines.append(f"| {r['model']} | {r['params']:,} | {r['mean_dice']:.3f} | {r['median_step_s'] * 1000:.0f} ms | "
                     f"{format_bytes(r['peak_step_bytes'])} ({method}) |")
    table = "\n".join(lines)
    (out / "results.json").write_text(json.dumps({"machine": where, "steps": args.steps, "rows": rows}, indent=2))
    (out / "results.md").write_text(table + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
