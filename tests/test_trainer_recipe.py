"""Fine-tuning a saved checkpoint on a new label set with `transformers.Trainer` (selfy_hf.trainer_recipe)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from selfy_hf import SelfyConfig, SelfyForVideoClassification, SelfyVideoProcessor
from selfy_hf.data import load_class_folder
from selfy_hf.trainer_recipe import make_trainer
from selfy_hf.training import TrainingConfig

FRAMES = 4
CLASSES = ["pour", "stir", "wipe"]


def frame_folders(root, per_class: int, seed: int) -> None:
    """`root/<class>/<video>/img_0000k.png`: random frames, a different brightness per class."""
    rng = np.random.default_rng(seed)
    for label, name in enumerate(CLASSES):
        for video in range(per_class):
            folder = root / name / f"video{video}"
            folder.mkdir(parents=True)
            for index in range(1, FRAMES + 1):
                pixels = rng.integers(0, 100, size=(36, 40, 3)) + 70 * label
                Image.fromarray(pixels.astype(np.uint8)).save(folder / f"img_{index:05d}.png")


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A saved 8-class tiny SELFYNet and its processor."""
    path = tmp_path_factory.mktemp("base")
    torch.manual_seed(0)
    model = SelfyForVideoClassification(
        SelfyConfig.from_preset("selfynet-tiny", num_frames=FRAMES, num_labels=8)
    )
    model.save_pretrained(path)
    SelfyVideoProcessor(num_frames=FRAMES, crop_size=32, size={"shortest_edge": 32}).save_pretrained(path)
    return path


def test_trainer_fine_tunes_a_checkpoint_on_new_labels(base, tmp_path):
    from transformers import AutoModelForVideoClassification, AutoVideoProcessor

    frame_folders(tmp_path / "data" / "train", per_class=2, seed=0)
    frame_folders(tmp_path / "data" / "validation", per_class=1, seed=1)
    train = load_class_folder(tmp_path / "data" / "train", CLASSES)
    validation = load_class_folder(tmp_path / "data" / "validation", CLASSES)
    config = TrainingConfig(batch_size=2, epochs=1, max_steps=2, seed=0)
    output = tmp_path / "finetuned"
    trainer = make_trainer(
        base, train, validation, output, config=config, use_cpu=True, report_to=[], logging_steps=1
    )

    saved = load_file(base / "model.safetensors")
    model = trainer.model
    assert model.classifier.weight.shape == (3, model.config.hidden_sizes[-1])
    assert model.config.id2label == {0: "pour", 1: "stir", 2: "wipe"} and model.config.label2id["wipe"] == 2
    backbone = "selfy.selfy_blocks.layer2.integrator.project.conv.weight"
    assert torch.equal(model.state_dict()[backbone], saved[backbone])
    assert torch.equal(model.selfy.conv1.weight, saved["selfy.conv1.weight"])
    # The optimizer and schedule are the shared recipe's (scratch: AdamW, 2e-3 per 16 clips, no decay on BN/bias).
    assert isinstance(trainer.optimizer, torch.optim.AdamW)
    assert trainer.optimizer.param_groups[1]["weight_decay"] == 0.0
    assert trainer.lr_scheduler.base_lrs[0] == pytest.approx(2e-3 * 2 / 16)

    result = trainer.train()
    assert result.global_step == 2
    assert not torch.equal(model.selfy.conv1.weight.detach(), saved["selfy.conv1.weight"])  # it trained
    metrics = trainer.evaluate()
    assert 0.0 <= metrics["eval_top1"] <= 1.0 and metrics["eval_top5"] == 1.0  # top-5 of 3 classes
    assert metrics["eval_num_samples"] == len(CLASSES)

    trainer.save_model()
    reloaded = AutoModelForVideoClassification.from_pretrained(output)
    assert reloaded.config.num_labels == 3 and reloaded.config.id2label[1] == "stir"
    for key, value in reloaded.state_dict().items():
        assert torch.equal(value, model.state_dict()[key]), key
    processor = AutoVideoProcessor.from_pretrained(output)
    assert isinstance(processor, SelfyVideoProcessor) and processor.crop_size == 32
