"""Build the synthetic motion-only dataset: `python scripts/make_motion_dataset.py data/motion --seed 0`."""

import argparse
from dataclasses import fields

from selfy_hf.motion_dataset import MotionDatasetSpec, make_motion_dataset


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("output_dir")
    for spec_field in fields(MotionDatasetSpec):
        parser.add_argument("--" + spec_field.name.replace("_", "-"), type=int, default=spec_field.default)
    args = vars(parser.parse_args(argv))
    output_dir = args.pop("output_dir")
    print(make_motion_dataset(output_dir, MotionDatasetSpec(**args)))


if __name__ == "__main__":
    main()
