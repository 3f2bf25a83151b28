"""Reproduce the paper's ablations on the motion-only benchmark: `python scripts/reproduce.py` (about an hour on
2 CPU cores; `--quick` checks the pipeline in a minute). Writes docs/results/results.md and its plots."""

from selfy_hf.reproduce import main

if __name__ == "__main__":
    main()
