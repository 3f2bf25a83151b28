"""Evaluate SELFY models: `python scripts/evaluate.py --model outputs/selfynet-tiny-motion --views 1x1 2x3
--robustness occlusion motion_blur` (see `selfy_hf.evaluation`)."""

from selfy_hf.evaluation import main

if __name__ == "__main__":
    main()
