"""Upload a saved SELFY model with its processor, code and model card: `python scripts/push_to_hub.py
--model outputs/selfynet-tiny-motion --repo-id org/name [--private] [--dry-run]` (see `selfy_hf.hub`)."""

from selfy_hf.hub import main

if __name__ == "__main__":
    main()
