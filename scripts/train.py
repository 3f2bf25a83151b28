"""Train SELFYNet: `python scripts/train.py` (tiny SELFYNet on the synthetic motion dataset) or
`accelerate launch scripts/train.py --dataset ... --model-preset selfynet-tsm-r50 --recipe official`."""

from selfy_hf.training import main

if __name__ == "__main__":
    main()
