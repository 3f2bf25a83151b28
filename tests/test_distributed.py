"""Data-parallel training on CPU: `scripts/train.py` in two processes (gloo), launched the way `torchrun` launches it.

`accelerate launch --cpu --num_processes 2` starts a single process unless MPI is set up (multi-CPU goes through
`mpirun`), so the test uses `torch.distributed.run`; Accelerate reads its environment (RANK, WORLD_SIZE, ...) and,
with ACCELERATE_USE_CPU, uses the gloo backend.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from selfy_hf import SelfyForVideoClassification
from selfy_hf.motion_dataset import LABELS, MotionDatasetSpec, make_motion_dataset

REPO = Path(__file__).resolve().parents[1]
SPEC = MotionDatasetSpec(frames=4, size=32, train_per_class=2, validation_per_class=1, seed=3)
BATCH = 3  # per process; 8 validation videos are no multiple of 2 x 3, so the last batches are padded


@pytest.mark.slow
def test_two_process_training_splits_the_data_and_counts_each_validation_video_once(tmp_path):
    data = make_motion_dataset(tmp_path / "motion", SPEC, progress=False)
    output = tmp_path / "run"
    argv = ["--dataset", str(data), "--output-dir", str(output), "--model-preset", "selfynet-tiny"]
    argv += ["--num-frames", "4", "--crop-size", "32", "--resize-shortest-edge", "32", "--epochs", "1"]
    argv += ["--batch-size", str(BATCH), "--seed", "1"]
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "ACCELERATE_USE_CPU": "true",
        "TOKENIZERS_PARALLELISM": "false",
    }
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    done = subprocess.run(
        [*command, str(REPO / "scripts" / "train.py"), *argv],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-4000:]

    records = [json.loads(line) for line in (output / "log.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    validations = [r["validation"] for r in records if "validation" in r]
    train_videos = len(LABELS) * SPEC.train_per_class
    # One process would take 16 // 3 = 5 steps; two share the 5 batches (drop_last): 2 steps each.
    assert [r["step"] for r in steps] == [1, 2] == list(range(1, (train_videos // BATCH) // 2 + 1))
    # The learning rate is scaled for the global batch (2 x 3 clips; scratch recipe: 2e-3 per 16 clips) and the
    # one-epoch warmup ends with the epoch, although Accelerate steps the scheduler once per process.
    peak = 2e-3 * (2 * BATCH) / 16
    assert steps[-1]["lr"] == pytest.approx(peak)
    assert 0 < steps[0]["lr"] < peak
    # Validation ran once, on the main process's log, over every validation video exactly once (gather_for_metrics
    # drops the padding of the uneven last batches).
    assert len(validations) == 1
    assert validations[0]["num_samples"] == len(LABELS) * SPEC.validation_per_class
    checkpoint = output / "checkpoints" / "step-2"
    # Both processes' RNG states made it into the checkpoint before it was renamed into place (exact resume).
    assert {p.name for p in checkpoint.glob("random_states_*.pkl")} == {
        "random_states_0.pkl",
        "random_states_1.pkl",
    }
    assert not list((output / "checkpoints").glob("*.tmp"))

    model = SelfyForVideoClassification.from_pretrained(output)
    assert model.config.num_labels == len(LABELS) and model.config.num_frames == 4
