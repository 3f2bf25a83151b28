import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from selfy_hf import SelfyConfig, SelfyForVideoClassification, SelfyVideoProcessor
from selfy_hf.data import (
    VideoClassificationDataset,
    collate_videos,
    load_class_folder,
    load_hub_dataset,
    load_list_file,
)
from selfy_hf.motion_dataset import LABELS, PAIRS, MotionDatasetSpec, make_motion_dataset
from selfy_hf.training import (
    TrainingConfig,
    build_optimizer_and_scheduler,
    parameter_groups,
    parse_args,
    train,
)
from selfy_hf.video_io import read_frames

SPEC = MotionDatasetSpec(frames=8, size=32, train_per_class=2, validation_per_class=1, seed=3)


@pytest.fixture(scope="module")
def motion(tmp_path_factory):
    return make_motion_dataset(tmp_path_factory.mktemp("motion"), SPEC, progress=False)


def folder(label: str) -> str:
    return label.replace(" ", "_")


def test_motion_dataset_is_deterministic_lossless_and_time_reversed(motion, tmp_path):
    again = make_motion_dataset(tmp_path / "again", SPEC, progress=False)
    first = motion / "train" / folder(PAIRS[0][0]) / "00001.mkv"
    assert first.read_bytes() == (again / first.relative_to(motion)).read_bytes()
    for forward, backward in PAIRS:
        ahead = read_frames(motion / "train" / folder(forward) / "00000.mkv", range(SPEC.frames))
        behind = read_frames(motion / "train" / folder(backward) / "00000.mkv", range(SPEC.frames))
        assert np.array_equal(
            ahead, behind[::-1]
        )  # same frames, opposite order: a frame-set model can't tell
        assert not np.array_equal(ahead, behind)
    assert json.loads((motion / "labels.json").read_text())["labels"] == LABELS


def _bright_pixels(frame: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Row and column coordinates (y down) of the pixels brighter than the darkened background can be."""
    rows, cols = np.nonzero(frame.astype(float).mean(axis=-1) > 0.6 * 255 + 1)
    return rows.astype(float), cols.astype(float)


def _orientation_degrees(frame: np.ndarray) -> float:
    """The principal axis of the bright pixels, as drawn on screen (counter-clockwise from the x axis, mod 180)."""
    rows, cols = _bright_pixels(frame)
    x, y = cols - cols.mean(), -(rows - rows.mean())  # y up, as a viewer reads angles
    return 0.5 * np.degrees(np.arctan2(2 * (x * y).mean(), (x * x).mean() - (y * y).mean())) % 180


def test_motion_labels_say_what_the_videos_show(motion):
    def video(label: str) -> np.ndarray:
        return read_frames(motion / "train" / folder(label) / "00000.mkv", range(SPEC.frames))

    first, last = video("moving right")[0], video("moving right")[-1]
    assert _bright_pixels(last)[1].mean() > _bright_pixels(first)[1].mean() + 3
    first, last = video("moving down")[0], video("moving down")[-1]
    assert _bright_pixels(last)[0].mean() > _bright_pixels(first)[0].mean() + 3
    first, last = video("approaching")[0], video("approaching")[-1]
    assert _bright_pixels(last)[0].size > 1.5 * _bright_pixels(first)[0].size
    frames = video("rotating clockwise")
    turns = [
        (_orientation_degrees(b) - _orientation_degrees(a) + 90) % 180 - 90
        for a, b in zip(frames, frames[1:])
    ]
    assert np.median(turns) < -4  # clockwise on screen: the angle a viewer reads decreases


def test_class_folder_keeps_the_given_label_order(motion):
    names = [folder(label) for label in LABELS]
    split = load_class_folder(motion / "train", names)
    assert split.label_names == names and len(split.videos) == 2 * len(LABELS)
    assert split.labels[:2] == [0, 0] and split.id2label[1] == names[1]
    with pytest.raises(ValueError, match="not among the given labels"):
        load_class_folder(motion / "train", names[:3])
    with pytest.raises(FileNotFoundError):
        load_class_folder(motion / "nowhere")


def test_list_file_of_frame_folders(tmp_path):
    from PIL import Image

    for video in ("a", "b"):
        (tmp_path / video).mkdir()
        for index in range(1, 6):
            Image.new("RGB", (16, 16), (index * 40, 0, 0)).save(tmp_path / video / f"img_{index:05d}.jpg")
    (tmp_path / "train.txt").write_text("a 5 0\nb 5 2\n")
    split = load_list_file(tmp_path / "train.txt")
    assert split.labels == [0, 2] and len(split.label_names) == 3
    (tmp_path / "bad.txt").write_text("c 5 1\n")
    with pytest.raises(FileNotFoundError, match="bad.txt:1"):
        load_list_file(tmp_path / "bad.txt")


def test_dataset_with_video_bytes_as_push_to_hub_writes_it(motion, tmp_path):
    videos = sorted((motion / "validation").rglob("*.mkv"))
    table = datasets.Dataset.from_dict(
        {
            "video": [{"bytes": v.read_bytes(), "path": None} for v in videos],
            "label": list(range(len(videos))),
        },
        features=datasets.Features(
            {
                "video": datasets.Video(decode=False),
                "label": datasets.ClassLabel(names=[str(i) for i in range(len(videos))]),
            }
        ),
    )
    (tmp_path / "data").mkdir()
    table.to_parquet(str(tmp_path / "data" / "validation-00000-of-00001.parquet"))
    split = load_hub_dataset(str(tmp_path), "validation")
    assert isinstance(split.videos[0], bytes) and split.labels == list(range(len(videos)))
    processor = SelfyVideoProcessor(crop_size=32, size={"shortest_edge": 32})
    item = VideoClassificationDataset(split, processor, training=False)[0]
    assert item["pixel_values"].shape == (8, 3, 32, 32)


def _write_hub_cache_repo(cache, repo_id: str, commit: str, files: dict[str, bytes]) -> Path:
    """A dataset repo in a Hub cache as `huggingface_hub` downloads it: content-addressed blobs (sha256 for LFS
    files such as parquet, the git blob sha1 for text files), the snapshot of `commit` as relative symlinks to
    them, and `refs/main` naming the commit. Returns the snapshot folder."""
    repo = cache / ("datasets--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / commit
    for path_in_repo, content in files.items():
        if path_in_repo.endswith(".parquet"):
            blob = hashlib.sha256(content).hexdigest()
        else:
            blob = hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()
        (repo / "blobs").mkdir(parents=True, exist_ok=True)
        (repo / "blobs" / blob).write_bytes(content)
        link = snapshot / path_in_repo
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(repo / "blobs" / blob, link.parent))
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    return snapshot


def _push_to_hub_files(splits: dict[str, datasets.Dataset], workdir) -> dict[str, bytes]:
    """The files `Dataset.push_to_hub(repo_id)` commits for each split in turn (datasets 5.x, default config, one
    shard each): `data/<split>-00000-of-00001.parquet` and a README.md whose YAML holds `dataset_info` and
    `configs`, built with the same `datasets` calls push_to_hub makes."""
    from datasets.info import DatasetInfo, DatasetInfosDict
    from datasets.splits import SplitDict, SplitInfo
    from datasets.utils.metadata import MetadataConfigs
    from huggingface_hub import DatasetCard, DatasetCardData

    files = {}
    features = next(iter(splits.values())).features
    info = DatasetInfo(
        config_name="default", features=features, splits=SplitDict(), download_size=0, dataset_size=0
    )
    for split, table in splits.items():
        shard = workdir / f"{split}.parquet"
        table.to_parquet(str(shard))
        files[f"data/{split}-00000-of-00001.parquet"] = shard.read_bytes()
        info.splits.add(SplitInfo(name=split, num_bytes=table.data.nbytes, num_examples=len(table)))
        info.download_size += shard.stat().st_size
        info.dataset_size += table.data.nbytes
    info.size_in_bytes = info.download_size + info.dataset_size
    card_data = DatasetCardData()
    DatasetInfosDict({"default": info}).to_dataset_card_data(card_data)
    configs = {"default": {"data_files": [{"split": s, "path": f"data/{s}-*"} for s in splits]}}
    MetadataConfigs(configs).to_dataset_card_data(card_data)
    files["README.md"] = str(DatasetCard(f"---\n{card_data}\n---\n")).encode()
    return files


def test_hub_dataset_loads_offline_from_the_hub_cache(motion, tmp_path):
    """A dataset pushed with `push_to_hub` (embedded video bytes, a ClassLabel) and downloaded into the Hub cache
    loads by its Hub id with HF_HUB_OFFLINE=1 (datasets itself only resolves Hub ids offline from its own prepared
    cache, so `load_hub_dataset` falls back to the cached snapshot), with the ClassLabel's names."""
    names = [folder(label) for label in LABELS]
    features = datasets.Features({"video": datasets.Video(), "label": datasets.ClassLabel(names=LABELS)})
    splits = {}
    for split in ("train", "validation"):
        videos = sorted((motion / split).rglob("*.mkv"))
        rows = {
            "video": [{"bytes": v.read_bytes(), "path": v.name} for v in videos],
            "label": [names.index(v.parent.name) for v in videos],
        }
        splits[split] = datasets.Dataset.from_dict(rows, features=features)
    files = _push_to_hub_files(splits, tmp_path)
    readme = files["README.md"].decode()
    assert "dataset_info:" in readme and "configs:" in readme and "path: data/train-*" in readme
    snapshot = _write_hub_cache_repo(tmp_path / "hub", "org/name", "0123456789abcdef" * 2 + "01234567", files)
    assert (snapshot / "data" / "train-00000-of-00001.parquet").is_symlink()

    script = (
        "import json; from selfy_hf.data import load_hub_dataset\n"
        "split = load_hub_dataset('org/name', 'train')\n"
        "print(json.dumps({'names': split.label_names, 'labels': split.labels,\n"
        "    'sizes': [len(v) if isinstance(v, bytes) else -1 for v in split.videos]}))"
    )
    env = {
        **os.environ,
        "HF_HOME": str(tmp_path / "home"),
        "HF_HUB_CACHE": str(tmp_path / "hub"),
        "HF_DATASETS_CACHE": str(tmp_path / "datasets"),
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
    }
    result = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    loaded = json.loads(result.stdout.strip().splitlines()[-1])
    assert loaded["names"] == LABELS
    assert loaded["labels"] == splits["train"]["label"]
    expected_sizes = [
        len(v["bytes"]) for v in splits["train"].cast_column("video", datasets.Video(decode=False))["video"]
    ]
    assert loaded["sizes"] == expected_sizes and min(expected_sizes) > 0


def test_label_names_for_int_string_and_class_label_columns(monkeypatch):
    tables = {
        "ints": datasets.Dataset.from_dict({"video": ["a.mp4", "b.mp4"], "label": [2, 0]}),
        "strings": datasets.Dataset.from_dict({"video": ["a.mp4", "b.mp4"], "label": ["push", "pull"]}),
        "class_label": datasets.Dataset.from_dict(
            {"video": ["a.mp4", "b.mp4"], "label": [0, 1]},
            features=datasets.Features(
                {"video": datasets.Value("string"), "label": datasets.ClassLabel(names=["pull", "push"])}
            ),
        ),
    }
    monkeypatch.setattr(datasets, "load_dataset", lambda name, split: tables[name])
    split = load_hub_dataset("ints", "train", label_names=["a", "b", "c"])
    assert split.labels == [2, 0] and split.label_names == ["a", "b", "c"]
    assert load_hub_dataset("ints", "train").label_names == ["0", "1", "2"]
    split = load_hub_dataset("strings", "train", label_names=["push", "pull", "turn"])
    assert split.labels == [0, 1] and split.id2label[0] == "push"
    split = load_hub_dataset("strings", "train")  # no names given: sorted
    assert split.labels == [1, 0] and split.label_names == ["pull", "push"]
    split = load_hub_dataset("class_label", "train")
    assert split.labels == [0, 1] and split.label_names == ["pull", "push"]
    split = load_hub_dataset("class_label", "train", label_names=["push", "pull"])  # reordered by name
    assert split.labels == [1, 0] and split.label_names == ["push", "pull"]
    with pytest.raises(ValueError, match=r"labels 'pull' are not among the given label_names"):
        load_hub_dataset("strings", "train", label_names=["push"])
    with pytest.raises(ValueError, match=r"labels 2 are not among the given label_names"):
        load_hub_dataset("ints", "train", label_names=["a", "b"])
    with pytest.raises(ValueError, match="not among the given label_names"):
        load_hub_dataset("class_label", "train", label_names=["push", "turn"])


def test_videofolder_reads_the_motion_dataset_in_our_label_order(motion, tmp_path, monkeypatch):
    """datasets' `videofolder` reads the class-folder layout (.mkv included), numbering classes in sorted order;
    `label_names` puts them back in the dataset's own order, the order `load_class_folder` gives."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "datasets"))
    names = [folder(label) for label in LABELS]
    sorted_order = load_hub_dataset(str(motion), "validation")
    assert sorted_order.label_names == sorted(names)
    split = load_hub_dataset(str(motion), "validation", label_names=names)
    ours = load_class_folder(motion / "validation", names)
    assert split.label_names == names
    assert sorted(zip(split.videos, split.labels)) == sorted(zip(ours.videos, ours.labels))


def test_items_are_reproducible_per_epoch_and_collate(motion):
    split = load_class_folder(motion / "train", [folder(label) for label in LABELS])
    processor = SelfyVideoProcessor(crop_size=24, size={"shortest_edge": 32})
    dataset = VideoClassificationDataset(split, processor, training=True, seed=1)
    first = dataset[3]["pixel_values"]
    assert torch.equal(first, dataset[3]["pixel_values"])
    dataset.set_epoch(1)
    assert not torch.equal(first, dataset[3]["pixel_values"])
    batch = collate_videos([dataset[0], dataset[5]])
    assert batch["pixel_values"].shape == (2, 8, 3, 24, 24) and batch["labels"].tolist() == [0, 2]


def test_no_weight_decay_on_batchnorm_and_biases():
    model = SelfyForVideoClassification(SelfyConfig.from_preset("selfynet-tiny", num_labels=3))
    decay, no_decay = parameter_groups(model, 5e-4)
    assert any(p is model.classifier.weight for p in decay["params"])
    assert any(p is model.classifier.bias for p in no_decay["params"])
    assert any(p is model.selfy.bn1.weight for p in no_decay["params"])
    assert all(p.dim() > 1 for p in decay["params"])


def test_official_recipe_scales_lr_and_steps_down():
    model = SelfyForVideoClassification(SelfyConfig.from_preset("tsn-tiny", num_labels=3))
    config = TrainingConfig(recipe="official", batch_size=8, epochs=50)
    optimizer, scheduler = build_optimizer_and_scheduler(model, config, steps_per_epoch=10, world_size=2)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.01 * 16 / 64)
    assert optimizer.defaults["nesterov"] and optimizer.param_groups[0]["weight_decay"] == 5e-4
    rates = []
    for _ in range(50 * 10):
        rates.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    assert (
        rates[299] == pytest.approx(0.0025)
        and rates[300] == pytest.approx(0.00025)
        and rates[400] == pytest.approx(0.000025)
    )


def test_official_recipe_with_a_cosine_schedule_warms_up_and_decays():
    model = SelfyForVideoClassification(SelfyConfig.from_preset("tsn-tiny", num_labels=3))
    config = TrainingConfig(recipe="official", schedule="cosine", batch_size=16, epochs=10, warmup_epochs=2)
    optimizer, scheduler = build_optimizer_and_scheduler(model, config, steps_per_epoch=10)
    assert isinstance(optimizer, torch.optim.SGD)
    rates = []
    for _ in range(100):
        rates.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    peak = 0.01 * 16 / 64
    assert rates[0] == pytest.approx(peak / 20) and rates[19] == pytest.approx(peak)
    assert rates[60] == pytest.approx(peak * 0.5 * (1 + np.cos(np.pi * 40 / 80)))
    assert all(a >= b for a, b in zip(rates[19:], rates[20:])) and rates[-1] < peak * 1e-3
    with pytest.raises(ValueError, match="schedule must be"):
        build_optimizer_and_scheduler(model, TrainingConfig(schedule="linear"), steps_per_epoch=10)


def _config(motion, output_dir, **overrides) -> TrainingConfig:
    base = {
        "output_dir": str(output_dir),
        "dataset": str(motion),
        "epochs": 2,
        "batch_size": 4,
        "crop_size": 32,
        "resize_shortest_edge": 32,
        "checkpoint_every_steps": 2,
        "seed": 5,
        "final_evaluation": False,
    }
    return TrainingConfig(**{**base, **overrides})


def test_training_writes_a_loadable_model_logs_and_plot(motion, tmp_path):
    metrics = train(_config(motion, tmp_path / "run", epochs=1, final_evaluation=True))
    assert 0.0 <= metrics["top1"] <= 1.0 and metrics["num_samples"] == len(LABELS)
    assert 0.0 <= metrics["pair_accuracy"] <= 1.0  # the motion dataset declares its reversal pairs
    from transformers import AutoModelForVideoClassification

    model = AutoModelForVideoClassification.from_pretrained(tmp_path / "run")
    assert model.config.id2label[0] == folder(LABELS[0])
    for name in (
        "training_curves.png",
        "log.jsonl",
        "video_preprocessor_config.json",
        "training_config.json",
        "README.md",
    ):
        assert (tmp_path / "run" / name).exists()
    assert any((tmp_path / "run" / "tensorboard").iterdir())
    card = (tmp_path / "run" / "README.md").read_text()
    assert "model-index" in card
    evaluation = json.loads((tmp_path / "run" / "evaluation" / "results.json").read_text())
    assert set(evaluation["models"]["run"]["views"]) == {"1x1", "2x1"}
    assert (tmp_path / "run" / "evaluation" / "robustness.png").exists()
    assert "2x1" in card and "occlusion" in card  # the card reports the final evaluation


def test_resuming_after_an_interruption_gives_the_same_weights(motion, tmp_path):
    train(_config(motion, tmp_path / "straight"))
    train(_config(motion, tmp_path / "interrupted", max_steps=2))  # stops mid-epoch right after a checkpoint
    assert (tmp_path / "interrupted" / "checkpoints" / "step-2").is_dir()
    train(_config(motion, tmp_path / "interrupted"))  # picks up at epoch 0, batch 2
    straight = load_file(tmp_path / "straight" / "model.safetensors")
    resumed = load_file(tmp_path / "interrupted" / "model.safetensors")
    for key, value in straight.items():
        torch.testing.assert_close(resumed[key], value, rtol=0, atol=1e-6, msg=key)
    assert not list((tmp_path / "interrupted" / "checkpoints").glob("*.tmp"))


def test_command_line_options():
    config = parse_args(
        ["--epochs", "3", "--config-overrides", "selfy_temporal_offsets=[1]", "--gradient-checkpointing"]
    )
    assert config.epochs == 3 and config.gradient_checkpointing and config.final_evaluation
    assert not parse_args(["--no-final-evaluation"]).final_evaluation
    assert config.config_overrides == {"selfy_temporal_offsets": [1]}
