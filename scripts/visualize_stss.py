"""Show the motion a SELFY block sees: `python scripts/visualize_stss.py --model outputs/selfynet-tiny-motion
--video clip.mp4 --output stss.png --gif stss.gif [--query t,y,x] [--block 0]` (see `selfy_hf.visualization`)."""

from selfy_hf.visualization import main

if __name__ == "__main__":
    main()
