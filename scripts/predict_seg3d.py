"""Segment NIfTI volumes with a trained checkpoint; writes <name>_seg.nii.gz with the input's affine.

--input takes NIfTI files, folders of them (hidden and macOS ._* files are skipped), or an MSD
dataset.json, whose "test" list is predicted.

Examples:
    python scripts/predict_seg3d.py --checkpoint outputs/seg3d_synthetic/best.pt \
        --input data_cache/synthetic_seg3d/imagesTr/synth_000.nii.gz --output outputs/pred
    python scripts/predict_seg3d.py --checkpoint outputs/seg3d_mni152/best.pt \
        --input data_cache/mni152_tissue/dataset.json --output outputs/pred_mni152   # the test list
    python scripts/predict_seg3d.py --checkpoint RUN/best.pt --input /data/Task01/imagesTs --output pred
"""

from __future__ import annotations

import argparse
import sys

from invseg.train.seg import predict_volumes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True, help="best.pt / last.pt of a train_seg3d.py run")
    parser.add_argument("--input", required=True, nargs="+",
                        help="NIfTI volume(s), folder(s) of them, or an MSD dataset.json (its 'test' list)")
    parser.add_argument("--output", required=True, help="output folder")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--sw-batch-size", type=int, default=None, help="windows per forward (default: config)")
    parser.add_argument("--overlap", type=float, default=None, help="sliding-window overlap (default: config)")
    args = parser.parse_args(argv)
    try:
        written = predict_volumes(args.checkpoint, args.input, args.output, device=args.device,
                                  sw_batch_size=args.sw_batch_size, overlap=args.overlap,
                                  progress=lambda line: print(line, flush=True))
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"{len(written)} label volume(s) written to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
