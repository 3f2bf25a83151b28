"""Export a SELFY video classifier to ONNX (dynamic batch, fixed frames and image size) and check it against PyTorch.

python scripts/export_onnx.py --model path/to/checkpoint --output selfy.onnx --verify
python scripts/export_onnx.py --preset selfynet-tiny --num-labels 10 --image-size 64 --output tiny.onnx
"""

from __future__ import annotations

import argparse
import sys

from selfy_hf import SelfyConfig, SelfyForVideoClassification
from selfy_hf.export import DEFAULT_OPSET, export_onnx, onnx_parity

PARITY_TOLERANCE = 1e-4


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--model", help="a saved model folder or hub id (SelfyForVideoClassification.from_pretrained)"
    )
    source.add_argument("--preset", help="a SelfyConfig preset with random weights (for trying the export)")
    parser.add_argument("--num-labels", type=int, default=174, help="classes of a --preset model")
    parser.add_argument("--output", required=True, help="the .onnx file to write")
    parser.add_argument("--image-size", type=int, default=224, help="fixed input height and width")
    parser.add_argument("--opset", type=int, default=DEFAULT_OPSET)
    parser.add_argument(
        "--legacy-exporter",
        action="store_true",
        help="use the TorchScript exporter (dynamo=False) instead of torch.export",
    )
    parser.add_argument(
        "--verify", action="store_true", help="compare onnxruntime with PyTorch at batch sizes 1 and 3"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.model:
        model = SelfyForVideoClassification.from_pretrained(args.model)
    else:
        model = SelfyForVideoClassification(SelfyConfig.from_preset(args.preset, num_labels=args.num_labels))
    model.eval()
    path = export_onnx(
        model, args.output, image_size=args.image_size, opset=args.opset, dynamo=not args.legacy_exporter
    )
    print(
        f"wrote {path} (input pixel_values (batch, {model.config.num_frames}, 3, {args.image_size}, {args.image_size}))"
    )
    if args.verify:
        errors = onnx_parity(model, path, batch_sizes=(1, 3))
        for batch, error in errors.items():
            print(f"batch {batch}: max relative difference to PyTorch {error:.2e}")
        if max(errors.values()) > PARITY_TOLERANCE:
            print(f"onnxruntime output differs from PyTorch by more than {PARITY_TOLERANCE}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
