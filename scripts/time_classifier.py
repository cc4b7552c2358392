"""Training time with and without spectral normalization (paper §4.4, Table 2).

Reads a classification config (``configs/cifar10_resnet34ds_timing.yaml``: ResNet-34-DS K=5 hard;
``configs/imagenet_mobilenetv2_timing.yaml``: MobileNetV2 K=40 soft s=0.5) and measures, for SN method
``model.kwargs.sn_method`` and ``none``: the median training-step time on synthetic tensors (methods interleaved
in one process) and, when the config's dataset is present, the time per epoch including data loading
(from ``--epoch-steps`` steps, scaled to the epoch). Without the dataset only the per-step table is made.

Examples:
    python scripts/time_classifier.py --config configs/cifar10_resnet34ds_timing.yaml --device cuda
    python scripts/time_classifier.py --config configs/imagenet_mobilenetv2_timing.yaml --device cuda --epoch-steps 200
    python scripts/time_classifier.py --config configs/cifar10_resnet34ds_timing.yaml --batch 16 --steps 8   # CPU
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

import torch

from invseg import cli
from invseg.config import to_dict
from invseg.experiments.paper import format_timing_table, time_classifier
from invseg.train.classify import ClassifyConfig, build_classification_data


def main(argv: list[str] | None = None) -> int:
    parser = cli.make_parser(__doc__)
    cli.add_config_arguments(parser)
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    parser.add_argument("--batch", type=int, default=None, help="images per step (default: train.batch_size)")
    parser.add_argument("--size", type=int, default=None, help="image side (default: 32 CIFAR, data.image_size ImageNet)")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per method (default 20)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per method (default 2)")
    parser.add_argument("--rounds", type=int, default=4, help="interleaving rounds (default 4)")
    parser.add_argument("--epoch-steps", type=int, default=None,
                        help="timed steps of the per-epoch measurement (default: the whole epoch)")
    parser.add_argument("--synthetic", action="store_true", help="synthetic tensors only, even if the data exist")
    parser.add_argument("--out", default=None, help="folder for timing.json and timing.md (default: print only)")
    return cli.run(_job, parser.parse_args(argv))


def _job(args: argparse.Namespace) -> int:
    cfg = cli.load_config(ClassifyConfig, args)
    if cfg.train.threads is not None:
        torch.set_num_threads(cfg.train.threads)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    imagenet = cfg.data.dataset in ("imagenet", "synthetic_imagenet")
    size = args.size or (cfg.data.image_size if imagenet else 32)
    batch = args.batch or cfg.train.batch_size
    num_classes = 1000 if imagenet else 10
    loader, note = None, "synthetic tensors only"
    if not args.synthetic:
        try:
            train_ds, _, num_classes, _ = build_classification_data(cfg.data)
            loader = torch.utils.data.DataLoader(train_ds, batch_size=batch, shuffle=True, drop_last=True,
                                                 num_workers=cfg.data.num_workers,
                                                 pin_memory=device.startswith("cuda"))
            note = f"per-epoch time over {cfg.data.dataset} at {cfg.data.root}"
            if len(loader) < 2:
                loader, note = None, f"{cfg.data.dataset} has fewer than 2 batches: synthetic tensors only"
        except FileNotFoundError as err:
            note = f"dataset not found ({err}); synthetic tensors only"
    print(note, file=sys.stderr)
    m = cfg.model
    kwargs = {k: v for k, v in m.kwargs.items() if k not in ("sn_method", "sn_mode")}
    sn_method, sn_mode = m.kwargs.get("sn_method", "fft"), m.kwargs.get("sn_mode", "reparam")
    variant = {"fft": sn_mode, "naive": f"naive:{sn_mode}", "torch": "torch"}.get(sn_method)
    methods = ["none", variant] if variant else ["none"]
    rows = time_classifier(m.name, kwargs, batch, size, num_classes, methods=methods, steps=args.steps,
                           device=device, precision=cfg.train.precision, data=loader, warmup=args.warmup,
                           rounds=args.rounds, lr=cfg.train.lr, sn_check_every=cfg.train.sn_check_every,
                           sn_search_every=cfg.train.sn_search_every,
                           epoch_steps=args.epoch_steps, seed=cfg.train.seed,
                           progress=lambda s: print(s, file=sys.stderr, flush=True))
    meta = {"device": device, "device_name": rows[0].device_name, "torch": torch.__version__,
            "threads": torch.get_num_threads(), "platform": platform.platform(), "data": note,
            "steps": args.steps, "rounds": args.rounds}
    table = format_timing_table(rows)
    print(f"# {m.name}: training time with and without SN on {meta['device_name']} "
          f"(torch {meta['torch']}, {meta['threads']} threads); {note}")
    print(table)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "timing.json").write_text(json.dumps(
            {"meta": meta, "config": to_dict(cfg), "rows": [r.to_dict() for r in rows]}, indent=1))
        (out / "timing.md").write_text(table + "\n")
        print(f"wrote {out / 'timing.json'} and {out / 'timing.md'}")
    return cli.ExitCode.OK


if __name__ == "__main__":
    sys.exit(main())
