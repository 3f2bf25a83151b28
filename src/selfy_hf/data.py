"""Video classification datasets (Hub datasets, class folders, official list files) and their collator."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils.data import Dataset

from .video_io import IMAGE_SUFFIXES

VIDEO_SUFFIXES = (".mp4", ".webm", ".mkv", ".avi", ".mov", ".m4v")


@dataclass
class VideoSplit:
    """The videos of one split (paths, bytes or frame folders), their label ids, and the label names in order."""

    videos: list
    labels: list[int]
    label_names: list[str] = field(default_factory=list)

    @property
    def id2label(self) -> dict[int, str]:
        return dict(enumerate(self.label_names))


def load_class_folder(root: str | Path, label_names: list[str] | None = None) -> VideoSplit:
    """
    `root/<class>/<video>` (video files of any common container, `.webm` included, or frame folders). Labels follow
    `label_names` when given (so the user's order is kept; unknown class folders are an error), else sorted names.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such dataset folder")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    names = list(label_names) if label_names is not None else classes
    unknown = sorted(set(classes) - set(names))
    if unknown:
        raise ValueError(f"{root}: class folders {unknown} are not among the given labels {names}")
    videos, labels = [], []
    for label, name in enumerate(names):
        folder = root / name
        if not folder.is_dir():
            continue
        for item in sorted(folder.iterdir()):
            if item.suffix.lower() in VIDEO_SUFFIXES or (
                item.is_dir() and any(f.suffix.lower() in IMAGE_SUFFIXES for f in item.iterdir())
            ):
                videos.append(str(item))
                labels.append(label)
    if not videos:
        raise ValueError(f"{root}: no videos found in the class folders")
    return VideoSplit(videos, labels, names)


def load_list_file(
    list_file: str | Path, root: str | Path | None = None, label_names: list[str] | None = None
) -> VideoSplit:
    """The official list format: one `path num_frames label` line per video, paths of frame folders (relative to
    `root`, default the list file's folder)."""
    list_file = Path(list_file)
    root = Path(root) if root is not None else list_file.parent
    videos, labels = [], []
    for number, line in enumerate(list_file.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        parts = line.split()
        if len(parts) < 3:
            raise ValueError(f"{list_file}:{number}: expected 'path num_frames label', got {line!r}")
        path = Path(parts[0]) if Path(parts[0]).is_absolute() else root / parts[0]
        if not path.exists():
            raise FileNotFoundError(f"{list_file}:{number}: {path} does not exist")
        videos.append(str(path))
        labels.append(int(parts[-1]))
    num_labels = max(labels) + 1
    return VideoSplit(
        videos, labels, list(label_names) if label_names else [str(i) for i in range(num_labels)]
    )


def load_hub_dataset(
    name: str, split: str, video_column: str = "video", label_column: str = "label"
) -> VideoSplit:
    """
    A `datasets.load_dataset` dataset (Hub id or local path) with a video column (paths or bytes) and a label
    column. The `Video` feature is read with `decode=False` (decoding it needs torchcodec); our processor decodes.
    """
    import datasets

    table = datasets.load_dataset(name, split=split)
    if video_column not in table.column_names or label_column not in table.column_names:
        raise ValueError(
            f"{name}: needs columns {video_column!r} and {label_column!r}, has {table.column_names}"
        )
    if isinstance(table.features[video_column], datasets.Video):
        table = table.cast_column(video_column, datasets.Video(decode=False))
    label_feature = table.features[label_column]
    names = label_feature.names if isinstance(label_feature, datasets.ClassLabel) else None
    videos = [v["bytes"] or v["path"] if isinstance(v, dict) else v for v in table[video_column]]
    labels = [int(x) for x in table[label_column]]
    return VideoSplit(videos, labels, names or [str(i) for i in range(max(labels) + 1)])


class VideoClassificationDataset(Dataset):
    """Runs the processor per item: random segment frames and augmentation for training (reproducible from the
    seed, the epoch and the index, so resumed runs see the same data), centre frames for evaluation."""

    def __init__(self, split: VideoSplit, processor, training: bool, seed: int = 0):
        self.split, self.processor, self.training, self.seed = split, processor, training, seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.split.videos)

    def __getitem__(self, index: int) -> dict:
        generator = torch.Generator().manual_seed(hash((self.seed, self.epoch, index)) % (2**63))
        features = self.processor(
            self.split.videos[index],
            labels=[self.split.labels[index]],
            training=self.training,
            generator=generator,
        )
        return {"pixel_values": features["pixel_values"][0], "labels": int(features["labels"][0])}


def collate_videos(batch: list[dict]) -> dict:
    """Stack items into `pixel_values` and `labels`: the collator for `Trainer` and for Accelerate loops."""
    return {
        "pixel_values": torch.stack([item["pixel_values"] for item in batch]),
        "labels": torch.tensor([item["labels"] for item in batch], dtype=torch.long),
    }


__all__ = [
    "VideoClassificationDataset",
    "VideoSplit",
    "collate_videos",
    "load_class_folder",
    "load_hub_dataset",
    "load_list_file",
]
