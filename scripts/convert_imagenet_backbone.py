"""Start a SELFYNet from ImageNet ResNet weights (torchvision, timm or transformers) and save it for fine-tuning.

    python scripts/convert_imagenet_backbone.py --source timm/resnet50.a1_in1k --preset selfynet-tsm-r50 \
        --num-labels 174 --output selfynet-tsm-r50-imagenet
"""

from __future__ import annotations

import argparse
import logging

from selfy_hf import PRESETS
from selfy_hf.conversion import convert_imagenet_backbone


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line arguments."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--source",
        required=True,
        help="ResNet weights: a .pth/.pt/.safetensors file, a save_pretrained directory, or a Hub repo id "
        "(timm/resnet50.a1_in1k, microsoft/resnet-50)",
    )
    parser.add_argument("--output", required=True, help="directory to write the model and processor to")
    parser.add_argument(
        "--preset", default="selfynet-tsm-r50", choices=sorted(PRESETS), help="model to build"
    )
    parser.add_argument("--num-frames", type=int, default=8, help="frames per clip")
    labels = parser.add_mutually_exclusive_group(required=True)
    labels.add_argument("--num-labels", type=int, help="number of classes")
    labels.add_argument("--id2label", help="JSON file: {index: name}, {name: index} or a list of class names")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    """Build, initialise and save the model described on the command line."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    _, report = convert_imagenet_backbone(
        args.source,
        preset=args.preset,
        num_frames=args.num_frames,
        num_labels=args.num_labels,
        id2label=args.id2label,
        output_dir=args.output,
    )
    print(report.summary())
    print(f"Saved the model and its video processor to {args.output}")


if __name__ == "__main__":
    main()
