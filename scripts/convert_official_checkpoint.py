"""Convert an official SELFY (or mit-han-lab TSM) checkpoint into a `save_pretrained` directory.

    python scripts/convert_official_checkpoint.py --checkpoint SELFY_something_RGB_model_best.pth.tar \
        --output selfynet-tsm-r50-sthv1 --arch resnet50 --num-frames 8 --num-labels 174 --id2label labels.json

The same as the `selfy-convert` command; the options are in `selfy_hf.conversion.parse_args`.
"""

from selfy_hf.conversion import main

if __name__ == "__main__":
    main()
