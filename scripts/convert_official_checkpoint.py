"""Convert an official SELFY (or mit-han-lab TSM) checkpoint into a `save_pretrained` directory.

    python scripts/convert_official_checkpoint.py --checkpoint SELFY_something_RGB_model_best.pth.tar \
        --output selfynet-tsm-r50-sthv1 --arch resnet50 --num-frames 8 --num-labels 174 --id2label labels.json
"""

from __future__ import annotations

import argparse
import logging

from selfy_hf.conversion import OFFICIAL_ARCHS, convert_official_checkpoint


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line arguments."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--checkpoint", required=True, help="official checkpoint ({'state_dict': ...}, .pth/.tar)"
    )
    parser.add_argument(
        "--output", required=True, help="directory to write the converted model and processor to"
    )
    parser.add_argument(
        "--arch", required=True, choices=sorted(OFFICIAL_ARCHS), help="backbone of the checkpoint"
    )
    parser.add_argument(
        "--num-frames", type=int, required=True, help="frames per clip (official --num_segments)"
    )
    parser.add_argument(
        "--num-labels", type=int, help="classes (default: read from the checkpoint's classifier)"
    )
    parser.add_argument("--id2label", help="JSON file: {index: name}, {name: index} or a list of class names")
    parser.add_argument(
        "--no-selfy", action="store_true", help="the checkpoint is the TSM baseline (no SELFY block)"
    )
    parser.add_argument("--shift-div", type=int, default=8, help="TSM shifts channels // shift_div each way")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    """Convert the checkpoint named on the command line."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    convert_official_checkpoint(
        args.checkpoint,
        arch=args.arch,
        num_frames=args.num_frames,
        num_labels=args.num_labels,
        id2label=args.id2label,
        selfy=not args.no_selfy,
        shift_div=args.shift_div,
        output_dir=args.output,
    )
    print(f"Saved the converted model and its video processor to {args.output}")


if __name__ == "__main__":
    main()
