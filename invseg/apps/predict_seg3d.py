"""Segment NIfTI volumes with a trained checkpoint; writes <name>_seg.nii.gz with the input's affine.

--input takes NIfTI files, folders of them (hidden and macOS ._* files are skipped), or an MSD
dataset.json, whose "test" list is predicted.

Examples:
    invseg-predict-seg3d --checkpoint outputs/seg3d_synthetic/best.pt \\
        --input data_cache/synthetic_seg3d/imagesTr/synth_000.nii.gz --output outputs/pred
    invseg-predict-seg3d --checkpoint outputs/seg3d_mni152/best.pt \\
        --input data_cache/mni152_tissue/dataset.json --output outputs/pred_mni152   # the test list
    invseg-predict-seg3d --checkpoint RUN/best.pt --input /data/Task01/imagesTs --output pred
    (in a clone: python scripts/predict_seg3d.py ... runs the same job)
"""

from __future__ import annotations

import argparse
import sys

from invseg import cli


def _job(args: argparse.Namespace) -> int:
    from invseg.train.seg import predict_volumes  # here: `--help` answers without loading torch and MONAI

    written = predict_volumes(args.checkpoint, args.input, args.output, device=args.device,
                              sw_batch_size=args.sw_batch_size, overlap=args.overlap,
                              progress=lambda line: print(line, flush=True))
    print(f"{len(written)} label volume(s) written to {args.output}")
    return cli.ExitCode.OK


def main(argv: list[str] | None = None) -> int:
    parser = cli.make_parser(__doc__)
    parser.add_argument("--checkpoint", required=True, help="best.pt / last.pt of a invseg-train-seg3d run")
    parser.add_argument("--input", required=True, nargs="+",
                        help="NIfTI volume(s), folder(s) of them, or an MSD dataset.json (its 'test' list)")
    parser.add_argument("--output", required=True, help="output folder")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--sw-batch-size", type=int, default=None, help="windows per forward (default: config)")
    parser.add_argument("--overlap", type=float, default=None, help="sliding-window overlap (default: config)")
    return cli.run(_job, parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
