"""Per-layer accuracy of the depthwise spectral-norm bounds for a MobileNetV2 ``state_dict`` (paper §3.3).

For each of the 17 depthwise convs, at the input size it sees for an ``--input-size``² image (224: 112,
56, 28, 14, 7), prints the exact norm, the paper's bound (single grid, ``||S|| <= ||K||`` for stride 2),
invseg's bound (min over grids, exact aliasing formula for stride 2) and their overestimations, then
mean ± std for the unit-stride and the stride-2 layers (the paper reports 2.80 % and 75.6 % for
ImageNet-pretrained weights). Accepts torchvision's key layout (``features.N.conv.M.weight``), invseg's
MobileNetV2 and invseg checkpoints; nothing is downloaded.

Examples:
    python scripts/bound_accuracy_mobilenetv2.py mobilenet_v2-b0353104.pth
    python scripts/bound_accuracy_mobilenetv2.py outputs/imagenet_mobilenetv2/K40/best.pt --out outputs/bound_accuracy
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from invseg import cli
from invseg.experiments.paper import format_bound_accuracy_table, mobilenetv2_bound_accuracy, summarize_bound_accuracy


def main(argv: list[str] | None = None) -> int:
    parser = cli.make_parser(__doc__)
    parser.add_argument("state_dict", help="file holding a MobileNetV2 state_dict (torch.save)")
    parser.add_argument("--input-size", type=int, default=224, help="image side (default 224)")
    parser.add_argument("--dense-limit", type=int, default=1024,
                        help="largest H*W evaluated by dense SVD; larger layers use Lanczos (default 1024)")
    parser.add_argument("--out", default=None, help="folder for bound_accuracy.json and .md (default: print only)")
    parser.add_argument("--quiet", action="store_true", help="no per-layer progress lines")
    return cli.run(_job, parser.parse_args(argv))


def _job(args: argparse.Namespace) -> int:
    rows = mobilenetv2_bound_accuracy(args.state_dict, input_size=args.input_size, dense_limit=args.dense_limit,
                                      progress=None if args.quiet else lambda m: print(m, file=sys.stderr, flush=True))
    table = format_bound_accuracy_table(rows)
    print(table)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        data = {"state_dict": str(args.state_dict), "input_size": args.input_size,
                "layers": [r.to_dict() for r in rows], "summary": summarize_bound_accuracy(rows)}
        (out / "bound_accuracy.json").write_text(json.dumps(data, indent=1))
        (out / "bound_accuracy.md").write_text(table + "\n")
        print(f"wrote {out / 'bound_accuracy.json'} and {out / 'bound_accuracy.md'}")
    return cli.ExitCode.OK


if __name__ == "__main__":
    sys.exit(main())
